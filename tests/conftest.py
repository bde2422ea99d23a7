"""Shared fixtures: tiny checkpoints in the released key layouts, written once per test session."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from .tiny import write_tiny

# Tiny models are dominated by per-op overhead: one thread is faster, and stays fast when cores are shared.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the same for the `python -m sd` / app.py subprocesses of the tests


SESSION_DIR = "tiny-ckpts"   # the one folder under the basetemp that outlives its module


@pytest.fixture(scope="module", autouse=True)
def _module_folders_removed(tmp_path_factory):
    """What a module wrote under the basetemp (its module fixtures' folders, its tests' tmp_path) is removed when the
    module ends, the session's tiny checkpoints excepted: the suite's disk use stays one module's worth plus the
    tiny files, not the sum of every module (it was 8 GB; a CI disk can hold less). Set up before, and torn down
    after, the module's own fixtures (an autouse fixture of a wider conftest), so its servers are closed first."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    for p in set(base.iterdir()) - before:
        if not p.name.startswith(SESSION_DIR):
            shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> "callable":
    """tiny_files(name, suffix) -> Path of a tiny checkpoint of reference layout `name` (cached per session)."""
    root = tmp_path_factory.mktemp(SESSION_DIR)
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, suffix: str = ".safetensors") -> Path:
        if (name, suffix) not in cache:
            cache[(name, suffix)] = write_tiny(name, root / f"{name}{suffix}")
        return cache[(name, suffix)]

    return get
