"""Per-family defaults read from `presets/*.json` (one file per family or variant).

A preset is a plain dict: name, label, families, status ("runs" or "not implemented yet"), width, height, steps,
sampler (internal name, see `sd.samplers.SAMPLERS`), schedule, cfg, prediction, expects (the checkpoints it is meant
for) and notes. The latent format is not here: it is the family's (`sd.families`, one source); presets of families
without a module yet (sd3, ldm) still carry a `latent` entry for their future tab. Which preset a family uses is the
family's `preset` / `preset_v` field. The app fills a tab from `preset_for(spec)` when its checkpoint changes; the
engine reads only `prediction` from here (`sd.families.preset_predictions`).
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import ModelSpec

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
REQUIRED = ("name", "label", "families", "status", "width", "height", "steps", "sampler", "schedule", "cfg",
            "prediction")


def load_presets(folder: str | Path = PRESETS_DIR) -> dict[str, dict]:
    """name -> preset dict for every `*.json` in `folder`; a file missing a required field is an error."""
    presets = {}
    for path in sorted(Path(folder).glob("*.json")):
        data = json.loads(path.read_text())
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise ValueError(f"{path.name}: preset is missing {', '.join(missing)}")
        presets[data["name"]] = data
    return presets


def preset_name(family: str, prediction: str | None = None, is_demo: bool = False) -> str:
    """Which preset a detected checkpoint uses: sd2 splits on its prediction type (512 eps / 768 v)."""
    if is_demo:
        return "demo"
    from .families import get_family

    try:
        return get_family(family).preset_for(prediction)
    except KeyError:
        return family  # sd3, ldm: presets of families without a module yet


def preset_for(spec: ModelSpec | None, presets: dict[str, dict], is_demo: bool = False,
               family: str | None = None) -> dict:
    """The preset of a spec (or of a bare family name when the spec is not known yet)."""
    fam = spec.family if spec is not None else (family or "sd1")
    pred = spec.prediction if spec is not None and spec.prediction_source != "probe" else None
    name = preset_name(fam, pred, is_demo)
    if name not in presets:
        raise KeyError(f"no preset for {name!r} in presets/")
    return presets[name]
