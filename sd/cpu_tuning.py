"""Process-wide CPU settings chosen by measurement (issue 14): glibc's allocator thresholds.

PyTorch's CPU allocator takes every tensor from malloc. glibc serves a block above M_MMAP_THRESHOLD (128 KiB at start,
raised dynamically up to 32 MiB) with a fresh mmap and unmaps it on free, so every large activation of a UNet step or
a VAE decode (one 512x512x128 float32 map is 128 MiB) is page-faulted and zero-filled again, op after op. Measured on
the full-size SD 1.5 VAE decode of a 256 px image, one thread (`bench/full_size.py` writes the file): 555k minor page
faults and 1.9 s of system time per decode beside 8.4 s of user time. With the mmap threshold at 1 GiB and the trim
threshold at 2 GiB the freed blocks stay in the heap for the next op: 0 page faults, 0.05 s of system time, the same
pixels (nothing numerical changes). The same cause is why AUTOMATIC1111's launcher preloads tcmalloc.

The price is memory: the heap keeps what it reused. Whole process, full-size SD 1.5, 512 px, 4 steps, float32, one
thread (`bench/full_size.py`): with the tuning 109 s sampling + 35.4 s decode and a peak RSS of 6844 MiB; without it
121 s + 40.5 s and 5781 MiB. So it is on by default and off with `--low-memory`.

Called by the entry points (`python -m sd`, `app.py`), never on import: a library should not change its host's
allocator. `SD_NO_MALLOPT=1` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # glibc <malloc.h> parameter numbers
MMAP_THRESHOLD = 1 << 30                         # blocks up to 1 GiB come from the heap and are reused
TRIM_THRESHOLD = 1 << 31                         # keep up to 2 GiB of free heap before returning it to the OS

_applied: bool | None = None


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds once per process (Linux with glibc only). True when applied."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or os.environ.get("SD_NO_MALLOPT") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # musl and other libcs have no mallopt: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
