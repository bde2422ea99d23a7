"""Shared fixtures: tiny checkpoints in the released key layouts, written once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from .tiny import write_tiny

# Tiny models are dominated by per-op overhead: one thread is faster, and stays fast when cores are shared.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the same for the `python -m sd` / app.py subprocesses of the tests


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> "callable":
    """tiny_files(name, suffix) -> Path of a tiny checkpoint of reference layout `name` (cached per session)."""
    root = tmp_path_factory.mktemp("tiny-ckpts")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, suffix: str = ".safetensors") -> Path:
        if (name, suffix) not in cache:
            cache[(name, suffix)] = write_tiny(name, root / f"{name}{suffix}")
        return cache[(name, suffix)]

    return get
