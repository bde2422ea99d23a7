"""sd.cpu_tuning: with glibc's mmap threshold raised, large tensors freed and allocated again reuse heap pages
instead of being page-faulted afresh (the measured cause of the system time in a CPU VAE decode)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = 64 * 2**20 // 4096          # pages of one 64 MiB float32 tensor
ROUNDS = 20

SCRIPT = f"""
import json, resource, sys
sys.path.insert(0, {str(ROOT)!r})
import torch
from sd.cpu_tuning import tune_allocator
applied = tune_allocator() if sys.argv[1] == "tuned" else False
total = 0.0
torch.ones(16 * 2**20).sum()           # warm-up: the first allocation faults its pages in either case
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range({ROUNDS}):
    x = torch.ones(16 * 2**20) * i     # 64 MiB, written: every page touched
    total += float(x[::4096].sum())
    del x
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps(dict(applied=applied, faults=faults, total=total)))
"""


def run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_raised_mmap_threshold_reuses_pages() -> None:
    plain, tuned = run("plain"), run("tuned")
    assert tuned["applied"] is True and plain["applied"] is False
    assert plain["total"] == tuned["total"]                      # same numbers either way
    # plain glibc: each 64 MiB block (x2: the product makes a second one) is a fresh mmap, every page faulted
    assert plain["faults"] >= ROUNDS * PAGES * 0.9
    # tuned: the heap blocks are reused, so only a few rounds' blocks fault (measured 3-6 blocks of the plain run's
    # 40; the kernel may reclaim idle heap pages now and then, so the bound leaves room for that)
    assert tuned["faults"] <= plain["faults"] / 4


def test_opt_out_and_once(monkeypatch) -> None:
    import sd.cpu_tuning as ct

    monkeypatch.setattr(ct, "_applied", None)
    monkeypatch.setenv("SD_NO_MALLOPT", "1")
    assert ct.tune_allocator() is False
    monkeypatch.setenv("SD_NO_MALLOPT", "0")
    assert ct.tune_allocator() is False          # decided once per process: the first answer stands
