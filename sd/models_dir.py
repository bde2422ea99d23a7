"""Finding checkpoints: scan a models folder and sort each file into the app tab of its detected family.

The folder is `--models-dir`, else the environment variable `SD_MODELS_DIR`, else `./models`. Existing installs
work as they are: when the folder holds AUTOMATIC1111's `Stable-diffusion/` or ComfyUI's `checkpoints/` (or is
the root above `models/`), those are scanned (recursively) together with the files directly in the folder;
otherwise the whole folder is scanned recursively.

`.safetensors` files are detected from their header only (`sd.checkpoint.open_checkpoint` + `sd.detect.detect`),
and the result is cached by (path, size, mtime), so a rescan of 50 unchanged files reads nothing. `.ckpt` files
are pickles whose shapes can only be known by opening the whole archive, so a scan lists them as "not detected
yet" (the app shows them in every runnable tab, marked `.ckpt`); `ModelIndex.detect(path)` detects one when it
is selected, and from then on the cache sorts it under its family like any other file.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CheckpointError, open_checkpoint
from .config import ModelSpec
from .detect import detect
from .families import tab_of
from .text_encoders import FOLDER_NAMES as TEXT_FOLDERS

SUFFIXES = (".safetensors", ".ckpt")
# Sub-folders of known UIs that hold full checkpoints (A1111, ComfyUI; also when given the folder above models/).
KNOWN_SUBFOLDERS = ("Stable-diffusion", "checkpoints", "models/Stable-diffusion", "models/checkpoints")



def resolve_models_dir(arg: str | os.PathLike | None = None, env: dict | None = None) -> Path:
    """--models-dir, else $SD_MODELS_DIR, else ./models."""
    env = os.environ if env is None else env
    return Path(arg or env.get("SD_MODELS_DIR") or "models")


@dataclass(frozen=True)
class Entry:
    """One checkpoint file as the app lists it."""

    path: Path
    name: str                    # path relative to the models folder, with forward slashes (the dropdown value)
    family: str | None           # detected family; None when not detected yet (.ckpt) or not recognised
    spec: ModelSpec | None
    error: str | None = None     # why the file is not usable (not a checkpoint, damaged, ...)

    @property
    def detected(self) -> bool:
        return self.family is not None or self.error is not None

    @property
    def tab(self) -> str | None:
        """The family's `tab` ("sd1" / "sd2" / "sdxl" / "inpaint" / "sd3" / ... / "variants"); "unsorted" for
        an undetected .ckpt; None if unusable."""
        if not self.detected:
            return "unsorted"
        return tab_of(self.family)


def checkpoint_files(root: Path) -> list[Path]:
    """Every .safetensors/.ckpt file the app should list, sorted by path (hidden files and folders skipped). A folder
    with none of the known checkpoint sub-folders is listed whole, except its LoRA / embedding / VAE sub-folders
    (`extra_files` lists those) and its text-encoder ones (SD3's clip_l / t5xxl files): they are not checkpoints,
    so the banner does not call them unusable."""
    if not root.is_dir():
        return []
    subs = [root / s for s in KNOWN_SUBFOLDERS if (root / s).is_dir()]
    found = [p for p in root.iterdir() if p.is_file()] if subs else []
    for folder in subs or [root]:
        found += [p for p in folder.rglob("*") if p.is_file()]
    others = ({s for folders, _ in EXTRA_FOLDERS.values() for s in folders if "/" not in s} | set(TEXT_FOLDERS)
              if not subs else set())
    files = {p.resolve(): p for p in found
             if p.suffix.lower() in SUFFIXES and not any(part.startswith(".") for part in p.relative_to(root).parts)
             and p.relative_to(root).parts[0] not in others}
    return sorted(files.values())


def detect_file(path: Path) -> tuple[str | None, ModelSpec | None, str | None]:
    """(family, spec, error) of one file from its tensor names and shapes (header only for .safetensors)."""
    try:
        spec = detect(open_checkpoint(path).shapes())
    except CheckpointError as e:
        return None, None, str(e)
    except Exception as e:  # a malformed header must not take the listing down
        return None, None, f"{path.name}: {type(e).__name__}: {e}"
    return spec.family, spec, None


class ModelIndex:
    """The checkpoints of one models folder; detection results cached by (path, size, mtime). Thread-safe."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._cache: dict[str, tuple[int, int, Entry]] = {}
        self._lock = threading.Lock()
        self.header_reads = 0          # how many files were actually opened (tests check the cache with it)

    def _stat_key(self, path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns

    def _cached(self, path: Path) -> Entry | None:
        size, mtime = self._stat_key(path)
        with self._lock:
            hit = self._cache.get(str(path.resolve()))
        return hit[2] if hit and hit[:2] == (size, mtime) else None

    def _name(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def detect(self, path: str | os.PathLike) -> Entry:
        """Detect one file now (also a .ckpt), caching the result."""
        path = Path(path)
        hit = self._cached(path)
        if hit is not None and hit.detected:
            return hit
        size, mtime = self._stat_key(path)
        family, spec, error = detect_file(path)
        entry = Entry(path, self._name(path), family, spec, error)
        with self._lock:
            self.header_reads += 1
            self._cache[str(path.resolve())] = (size, mtime, entry)
        return entry

    def scan(self) -> list[Entry]:
        """List the folder: safetensors detected (or taken from the cache), .ckpt left for `detect` unless cached."""
        entries = []
        for path in checkpoint_files(self.root):
            hit = self._cached(path)
            if hit is not None:
                entries.append(hit)
            elif path.suffix.lower() == ".safetensors":
                entries.append(self.detect(path))
            else:
                entries.append(Entry(path, self._name(path), None, None, None))
        return entries

    def resolve(self, name: str) -> Path:
        """A dropdown value, a bare file name or a stem -> a file the scan lists; nothing else.

        Only files listed by `checkpoint_files` (the models folder as its owner laid it out, symlinks included)
        can be named: `..`, absolute paths and anything outside the listing get one and the same answer, which
        names neither the server's folders nor whether the file exists, so a remote client cannot probe the disk.
        """
        return resolve_listed(name, self.root, checkpoint_files(self.root), "checkpoint")


class NotInModelsFolder(FileNotFoundError):
    """A requested name is not one of the listed files; the message is the same whatever the name points at."""


def resolve_listed(name: object, root: Path, files: list[Path], kind: str) -> Path:
    """`name` (relative path with forward slashes, file name or stem) -> the one listed file it names.

    Raises NotInModelsFolder with a message that repeats only the caller's own (shortened) name."""
    text = name if isinstance(name, str) else ""
    shown = repr(text[:80] + ("..." if len(text) > 80 else ""))
    if text:
        by_rel = {p.relative_to(root).as_posix(): p for p in files}
        if text in by_rel:
            return by_rel[text]
        matches = [p for p in files if text in (p.name, p.stem)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise NotInModelsFolder(f"{shown} matches several {kind}s in the models folder: "
                                    + ", ".join(p.relative_to(root).as_posix() for p in matches)
                                    + "; give the path shown in the list")
    raise NotInModelsFolder(f"no such {kind} in the models folder: {shown} (pick one from the list; after adding "
                            "files press Refresh)")

def by_tab(entries: list[Entry]) -> dict[str, list[Entry]]:
    """tab -> entries; "unusable" collects files that are not recognised checkpoints."""
    out: dict[str, list[Entry]] = {}
    for e in entries:
        out.setdefault(e.tab or "unusable", []).append(e)
    return out


# ---------------------------------------------------------------------------------------------- LoRA, embeddings, VAE
# The folders other UIs keep them in, relative to the models folder (A1111: models/Lora, models/VAE and the webui
# root's embeddings/, i.e. ../embeddings from its models/; ComfyUI: models/loras, models/vae, models/embeddings),
# plus our own loras/, vae/, embeddings/. A folder given explicitly (--loras-dir ...) is scanned as a whole.
EXTRA_FOLDERS = {
    "LoRA": (("loras", "Lora", "models/Lora", "models/loras"), (".safetensors", ".pt", ".ckpt")),
    "embedding": (("embeddings", "models/embeddings", "../embeddings"), (".safetensors", ".pt", ".bin")),
    "VAE": (("vae", "VAE", "models/VAE", "models/vae"), (".safetensors", ".pt", ".ckpt")),
}


def extra_files(kind: str, models_dir: str | os.PathLike | None = None,
                folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """{name: file} of one kind ("LoRA", "embedding", "VAE"): every matching file under `folder` (when given) and
    under the models folder's known sub-folders for that kind, recursively, hidden files and folders skipped. The
    name is the path relative to the folder it was found in, with forward slashes (what a dropdown shows); the
    first folder wins when two hold the same name. Sorted by name."""
    subs, suffixes = EXTRA_FOLDERS[kind]
    roots = [Path(folder)] if folder else []
    if models_dir:
        roots += [Path(models_dir) / s for s in subs]
    out: dict[str, Path] = {}
    seen: set[Path] = set()
    for root in roots:
        if not root.is_dir() or root.resolve() in seen:
            continue
        seen.add(root.resolve())
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root)
            if (p.is_file() and p.suffix.lower() in suffixes and not any(x.startswith(".") for x in rel.parts)
                    and rel.as_posix() not in out):
                out[rel.as_posix()] = p
    return dict(sorted(out.items()))


def resolve_extra(name: object, files: dict[str, Path], kind: str) -> Path:
    """A name from `extra_files` (its relative path, file name or stem: `<lora:NAME:1>` uses the stem) -> that file;
    nothing else. Refused like `resolve_listed`: one message whatever the name points at, repeating only the
    caller's own (shortened) name."""
    text = name if isinstance(name, str) else ""
    shown = repr(text[:80] + ("..." if len(text) > 80 else ""))
    if text:
        if text in files:
            return files[text]
        matches = [rel for rel, p in files.items() if text in (p.name, p.stem)]
        if len(matches) == 1:
            return files[matches[0]]
        if len(matches) > 1:
            raise NotInModelsFolder(f"{shown} matches several {kind} files: {', '.join(matches)}; give the path "
                                    "shown in the list")
    raise NotInModelsFolder(f"no such {kind} in the {kind} folders: {shown} (pick one from the list; after adding "
                            "files press Refresh)")
