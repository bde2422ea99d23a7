"""What was read from a file, cached by the file's (resolved path, size, mtime): a replaced or edited file is read
again, and the oldest entries go once there are more than `size`. The LoRA and embedding loaders use it. Thread-safe;
two threads that miss at once both read, and the second result is kept."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class FileCache(Generic[T]):
    def __init__(self, read: Callable[[Path], T], size: int):
        self._read, self._size = read, size
        self._items: dict[tuple[str, int, int], T] = {}
        self._lock = threading.Lock()

    def get(self, path: str | os.PathLike) -> T:
        path = Path(path)
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._items.get(key)
        if hit is None:
            hit = self._read(path)
            with self._lock:
                self._items[key] = hit
                while len(self._items) > self._size:
                    del self._items[next(iter(self._items))]
        return hit
