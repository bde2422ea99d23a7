"""SD3 / 3.5 in the app: the preset picker and the text-encoder memory flags. Wired into app.py with a few lines.

Preset picker, on a tab whose families have variants shapes cannot tell apart (SD3.5 large and SD3.5 large turbo
share one layout): a "Preset" dropdown lists the tab's presets (presets/*.json); picking one fills steps, CFG,
sampler, schedule, size and shift with its values. Picking a checkpoint preselects the preset its file name hints at
(`file_name_hint`, sd.presets.hinted_preset: "turbo"), else its family's, and the facts say so (`build_view`,
`extra_fields`, `facts_note`).

Flags (`add_flags`, `text_sources`): `--t5-device cpu` runs T5-XXL on the CPU while the MMDiT is on the GPU;
`--keep-text-encoders` keeps CLIP-L/G and T5 loaded between requests instead of freeing them before the MMDiT runs
(sd.text_encoders.Resident). They become the model cache's default `TextSources`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import gradio as gr

from sd.presets import hinted_preset


def tab_presets(fams, presets: dict[str, dict]) -> list[dict]:
    """The presets of a tab's families, in preset-name order; empty when no preset of them has a file_name_hint
    (then the family alone decides the preset and no picker is shown)."""
    names = {f.name for f in fams}
    mine = sorted((p for p in presets.values() if names & set(p["families"])), key=lambda p: p["name"])
    return mine if any(p.get("file_name_hint") for p in mine) else []


def extra_fields(p: dict) -> dict:
    """Tab values of a preset beyond the common ones: the picker's value and the flow shift (SD3)."""
    out = {"preset": p["name"]}
    if "shift" in p:
        out["shift"] = p["shift"]
    return out


def facts_note(p: dict, family: str, path: Path | None, presets: dict[str, dict]) -> str:
    """A line for the facts when the file name chose the preset (shapes cannot), '' otherwise."""
    if path is None or hinted_preset(path, family, presets) is not p:
        return ""
    return (f"  \n**Preset: {p['label']}** ({p['steps']} steps, CFG {p['cfg']:g}, {p['sampler']}), because the file "
            f"name contains \"{p['file_name_hint']}\": its layout is the same as the other {family} presets'; choose "
            "another in Preset if that is wrong")


def build_view(ctx, tab: str, c: dict) -> None:
    """The Preset dropdown (only on tabs with variant presets) and its wiring: a pick fills the preset's values
    (even fields typed by hand: the pick is explicit)."""
    import app

    fams = app.family_tabs()[tab]
    choices = tab_presets(fams, ctx.presets)
    if not choices:
        return
    value = c["checkpoint"].value
    start = app.preset_updates(ctx, value, probe=False).get("preset") if value else None
    c["preset"] = gr.Dropdown([(p["label"], p["name"]) for p in choices], label="Preset",
                              value=start or choices[0]["name"], elem_id=f"{tab}-preset",
                              info="Defaults of a model variant; a file name with 'turbo' picks SD3.5 large turbo")
    keys = [k for k in ("steps", "cfg", "sampler", "schedule", "width", "height", "shift") if k in c]

    def fill_from_preset(name):
        p = ctx.presets.get(name)
        if p is None:
            return [gr.skip()] * len(keys)
        vals = {"steps": p["steps"], "cfg": p["cfg"], "sampler": app.DISPLAY_NAMES.get(p["sampler"], p["sampler"]),
                "schedule": app.SCHEDULE_DISPLAY_NAMES.get(p["schedule"], p["schedule"]), "width": p["width"],
                "height": p["height"], "shift": p.get("shift", gr.skip())}
        return [vals[k] for k in keys]

    c["preset"].input(fill_from_preset, c["preset"], [c[k] for k in keys], api_visibility="private", queue=False)


def add_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--t5-device", default=None, metavar="DEVICE",
                    help="SD3/3.5: run T5-XXL on this device, e.g. cpu while the MMDiT is on cuda (default: --device)")
    ap.add_argument("--keep-text-encoders", action="store_true",
                    help="SD3/3.5: keep CLIP-L/G and T5 loaded between requests (default: loaded to encode the "
                         "prompts, freed before the MMDiT runs)")


def text_sources(args: argparse.Namespace):
    """The cache's default sd.text_encoders.TextSources from the flags (ValueError in one line for a bad device)."""
    from sd.text_encoders import TextSources, check_device

    return TextSources(keep=bool(getattr(args, "keep_text_encoders", False)),
                       t5_device=check_device(getattr(args, "t5_device", None), "--t5-device"))
