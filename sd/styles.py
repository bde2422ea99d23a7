"""Prompt styles: AUTOMATIC1111's `styles.csv` (`modules/styles.py`), read and applied.

The file has a header row with the columns `name`, `prompt`, `negative_prompt` (A1111's older `text` column is read
as the prompt); it is parsed with the `csv` module (quoted fields may hold commas and newlines), UTF-8 with or
without a BOM. A style's text is merged into a prompt as A1111's `merge_prompts` does: a `{prompt}` placeholder is
replaced by the prompt; without one, the style is appended after ", " (empty parts dropped). Several styles apply
in the order they are given, each to the result of the one before. Where the file is: `--styles FILE`, else
`styles.csv` in the models folder's parent (an A1111 install's root, beside its `models/`).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

MAX_STYLES_BYTES = 4 * 2**20     # a styles file larger than this is refused (a few thousand styles are < 1 MiB)


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


def default_styles_file(models_dir: str | os.PathLike | None) -> Path | None:
    """styles.csv in the models folder's parent (A1111 keeps it in the webui root, beside models/), or None."""
    if not models_dir:
        return None
    return Path(models_dir).resolve().parent / "styles.csv"


def read_styles(path: str | os.PathLike) -> dict[str, Style]:
    """{name: Style} of a styles.csv, in file order. Raises ValueError in one line naming the file and the fault."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_STYLES_BYTES:
            raise ValueError(f"styles file {path.name}: larger than {MAX_STYLES_BYTES // 2**20} MiB; is it a styles.csv?")
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"styles file {path.name}: no such file; give an A1111 styles.csv with --styles") from None
    except UnicodeDecodeError:
        raise ValueError(f"styles file {path.name}: not UTF-8 text; save it as a UTF-8 csv") from None
    except OSError as e:
        raise ValueError(f"styles file {path.name}: cannot read it ({e.strerror or e})") from None
    try:
        reader = csv.DictReader(text.splitlines(keepends=True), skipinitialspace=True)
        fields = reader.fieldnames or []
        if "name" not in fields or not ({"prompt", "text"} & set(fields)):
            raise ValueError(f"styles file {path.name}: the header row must name the columns name, prompt, "
                             f"negative_prompt (found {', '.join(f for f in fields if f) or 'none'})")
        styles: dict[str, Style] = {}
        for row in reader:
            name = (row.get("name") or "").strip()
            if not name:
                continue
            prompt = row.get("prompt") if row.get("prompt") is not None else row.get("text")
            styles[name] = Style(name, prompt or "", row.get("negative_prompt") or "")
    except csv.Error as e:
        raise ValueError(f"styles file {path.name}: not a valid csv ({e})") from None
    return styles


def load_styles(path: str | os.PathLike | None, models_dir: str | os.PathLike | None = None) -> dict[str, Style]:
    """The styles of `path`, else of the default file beside the models folder ({} when there is none)."""
    if path:
        return read_styles(path)
    default = default_styles_file(models_dir)
    return read_styles(default) if default is not None and default.is_file() else {}


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """A1111's merge_prompts: `{prompt}` in the style is replaced by the prompt, else "prompt, style"."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, styles: dict[str, Style], names) -> tuple[str, str]:
    """(prompt, negative prompt) with the named styles merged in, in order. An unknown name is one line."""
    for name in names or ():
        style = styles.get(name)
        if style is None:
            have = ", ".join(list(styles)[:20]) or "none: no styles file"
            raise ValueError(f"no such style {str(name)[:80]!r} (styles: {have})")
        prompt = merge_prompts(style.prompt, prompt)
        negative_prompt = merge_prompts(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt
