"""Per-family defaults read from `presets/*.json` (one file per family or variant).

A preset is a plain dict: name, label, families, status ("runs" or "not implemented yet"), width, height, steps,
sampler (internal name, see `sd.samplers.SAMPLERS`), schedule, cfg, prediction, expects (the checkpoints it is meant
for) and notes, optionally size_step (the UI's size slider step; SD3: 16) and file_name_hint (a variant picked
when the checkpoint's file name contains it: SD3.5 large turbo). The latent format is not here: it is the family's
(`sd.families`, one source); presets of families
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


def hinted_preset(path, family: str, presets: dict[str, dict]) -> dict | None:
    """The preset of `family` whose `file_name_hint` the checkpoint's file name contains (case-insensitive): for
    variants shapes cannot tell apart (SD3.5 large turbo has SD3.5 large's layout). None when no hint matches."""
    name = Path(path).name.lower()
    hits = [p for p in presets.values() if family in p["families"] and p.get("file_name_hint")
            and str(p["file_name_hint"]).lower() in name]
    return hits[0] if hits else None


def family_presets(family: str, presets: dict[str, dict]) -> list[dict]:
    """Every preset made for `family` (what a preset picker offers), in name order."""
    return sorted((p for p in presets.values() if family in p["families"]), key=lambda p: p["name"])


def pick_preset(name: str | None, family: str, path, presets: dict[str, dict]) -> tuple[dict | None, str]:
    """(preset, note) for the command line: `--preset NAME` (it must be one of `family`'s; ValueError in one line
    otherwise), else the variant the file name hints at (with a note saying so), else (None, "")."""
    if name:
        if name not in presets:
            raise ValueError(f"--preset {name}: no such preset; known: {', '.join(sorted(presets))}")
        if family not in presets[name]["families"]:
            mine = ", ".join(p["name"] for p in family_presets(family, presets)) or "none"
            raise ValueError(f"--preset {name} is for {'/'.join(presets[name]['families'])} checkpoints; this is a "
                             f"{family} checkpoint (its presets: {mine})")
        return presets[name], ""
    hinted = hinted_preset(path, family, presets)
    if hinted is None:
        return None, ""
    return hinted, (f"preset {hinted['name']} ({hinted['steps']} steps, CFG {hinted['cfg']:g}, {hinted['sampler']}): "
                    f"the file name contains \"{hinted['file_name_hint']}\"; --preset NAME chooses another")


def preset_for(spec: ModelSpec | None, presets: dict[str, dict], is_demo: bool = False,
               family: str | None = None, path=None) -> dict:
    """The preset of a spec (or of a bare family name when the spec is not known yet); with the checkpoint's
    `path`, a variant preset its file name hints at (`hinted_preset`) comes first."""
    fam = spec.family if spec is not None else (family or "sd1")
    if path is not None and not is_demo and hinted_preset(path, fam, presets) is not None:
        return hinted_preset(path, fam, presets)
    pred = spec.prediction if spec is not None and spec.prediction_source != "probe" else None
    name = preset_name(fam, pred, is_demo)
    if name not in presets:
        raise KeyError(f"no preset for {name!r} in presets/")
    return presets[name]
