"""The Gradio playground: one tab per model family, every tab calling `sd.pipeline` with the checkpoint it names.

    python app.py [--host 127.0.0.1] [--port 7860] [--share] [--auth user:pass] [--models-dir models]
                  [--outputs-dir outputs] [--device auto|cpu|cuda] [--dtype auto|float32|float16|bfloat16]

Checkpoints come from the models folder (`sd.models_dir`: --models-dir, $SD_MODELS_DIR or ./models; A1111's
`Stable-diffusion/` and ComfyUI's `checkpoints/` work as they are) and are listed in the tab of their detected
family; SD 1.x also offers the built-in demo model. Loaded models live in one `ModelCache` shared by all tabs.
Each tab's Generate is a named API endpoint (`/generate_sd1`, `/generate_sd2`, `/generate_sdxl`, with
`/stop_<tab>`), so `gradio_client` can drive it. Images go to the outputs folder with AUTOMATIC1111's `parameters`
text (`sd.pnginfo`), which the PNG Info tab reads back and sends to the right tab.
"""
from __future__ import annotations

import argparse
import inspect
import os
import queue
import random
import secrets
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from sd import families
from sd.checkpoint import CheckpointError
from sd.families import Family, Input
from sd.models_dir import Entry, ModelIndex, NotInModelsFolder, by_tab, resolve_models_dir
from sd.pipeline import GenerateParams, LoadedModel, ModelCache, generate, parse_dtype
from sd.pnginfo import build_parameters, guess_tab, parse_parameters, read_parameters, save_png, to_settings
from sd.presets import load_presets, preset_for
from sd.preview import preview_every, preview_image
from sd.samplers import DISPLAY_NAMES
from sd.schedules import SCHEDULE_DISPLAY_NAMES
from sd.tokenizer import CHUNK_TOKENS, encode as encode_tokens
from sd.vae_choice import AUTOMATIC, resolve_vae, vae_choices

import app_extras  # hires fix, clip skip, styles, the extra-networks picker (issue 12)
import app_inspect  # trajectory, schedules plot, checkpoint card (issue 13)
import app_attention  # cross-attention maps of a run (issue 13)
import app_grid  # the X/Y/Z comparison grid tab (issue 13)
from sd import perf  # --low-memory, --threads (issue 14)
import app_sd3  # SD3 / 3.5: the Preset picker (turbo: same layout as large), --t5-device, --keep-text-encoders

DEMO_LABEL = "Demo (built in)"
NO_REFINER = "None"
# Names of the generate tabs (a family's `tab` id); a tab id missing here is named after its first family.
TAB_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "inpaint": "Inpaint", "depth": "Depth to image",
             "upscale": "x4 upscaler", "unclip": "unCLIP", "sd3": "SD3 / 3.5", "ldm": "VQ-GAN / LDM"}
SAMPLER_OF_DISPLAY = {v: k for k, v in DISPLAY_NAMES.items()}
SCHEDULE_OF_DISPLAY = {"Automatic": "automatic",   # A1111's: the sampler's default (sd.samplers.resolve_schedule)
                       **{v: k for k, v in SCHEDULE_DISPLAY_NAMES.items()}}
COMMON_INPUTS = ("checkpoint", "prompt", "negative_prompt", "sampler", "schedule", "steps", "cfg", "seed", "width",
                 "height", "batch_size", "batch_count", "vae")
IMG2IMG_INPUTS = ("init_image", "strength")      # tabs whose families take no "image" input of their own
PREDICTION_INPUTS = ("prediction",)              # tabs with a family whose eps/v is settled by a probe
SDXL_INPUTS = ("original_width", "original_height", "crop_top", "crop_left", "target_width", "target_height",
               "refiner", "switch_at", "aesthetic_score", "negative_aesthetic_score")
OUTPUTS = ("gallery", "preview", "status", "infotext", "used_seed", "facts")
PRESET_FIELDS = ("facts", "preset", "shift", "width", "height", "steps", "sampler", "schedule", "cfg",
                 "original_width", "original_height", "target_width", "target_height", "crop_top", "crop_left")


def family_tabs() -> dict[str, tuple[Family, ...]]:
    """Generate tab id -> the runnable families it lists (tabs in TAB_NAMES order, then new ones; families in the
    order of the family table, read now, so a family added to the table gets a tab with no code of its own)."""
    tabs: dict[str, list[Family]] = {}
    for fam in families.FAMILIES:
        if fam.runs:
            tabs.setdefault(fam.tab, []).append(fam)
    order = [t for t in TAB_NAMES if t in tabs] + [t for t in tabs if t not in TAB_NAMES]
    return {t: tuple(tabs[t]) for t in order}


def tab_label(tab: str) -> str:
    fams = family_tabs().get(tab)
    return TAB_NAMES.get(tab) or (fams[0].label if fams else tab)


def tab_of_family(name: str) -> str | None:
    """The generate tab that runs a family, or None when no tab runs it (yet)."""
    return next((t for t, fams in family_tabs().items() if any(f.name == name for f in fams)), None)


def refiner_of(base: str) -> list[str]:
    """Families that may continue the latents of family `base` (the SDXL refiner continues the SDXL base)."""
    return [f.name for f in families.FAMILIES if base in f.refines]


def tab_inputs(tab: str) -> tuple[str, ...]:
    """The API parameter names of a tab's Generate, in order: the common ones, then what its families declare
    (img2img unless they take an image of their own, the eps/v override, SDXL's size conditioning and refiner,
    each family input and option)."""
    fams = family_tabs()[tab]
    names = list(COMMON_INPUTS)
    declared = [i for f in fams for i in (*f.inputs, *f.options)]
    if not any(i.kind == "image" for i in declared):
        names += IMG2IMG_INPUTS
    if any(f.v_size for f in fams):
        names += PREDICTION_INPUTS
    if any(refiner_of(f.name) for f in fams):
        names += SDXL_INPUTS
    for inp in declared:
        if inp.name not in names:
            names.append(inp.name)
    names += [n for n in app_extras.tab_params(fams) if n not in names]   # after the rest: old calls still work
    names += [n for n in app_inspect.tab_params(fams) if n not in names]  # `inspect` (trajectory), off by default
    return tuple(names)


def declared_input(tab: str, name: str) -> Input | None:
    return next((i for f in family_tabs()[tab] for i in (*f.inputs, *f.options) if i.name == name), None)


@dataclass
class AppContext:
    """What the callbacks share: the models folder index, the loaded-model cache and the run settings."""

    index: ModelIndex
    cache: ModelCache
    device: str
    dtype: str
    outputs_dir: Path
    demo_path: Path | None
    concurrency: int = 2                               # generations that may run at once (all tabs together)
    presets: dict = field(default_factory=load_presets)
    stops: dict = field(default_factory=dict)          # (session, tab) -> threading.Event of the running request
    lock: threading.Lock = field(default_factory=threading.Lock)
    extras: object = None                              # app_extras.Extras: --styles, --loras-dir, --vae-dir ...
    inspect: dict = field(default_factory=dict)        # (session, tab) -> app_inspect.Inspection of the last run

    def demo_available(self) -> bool:
        return self.demo_path is not None and self.demo_path.is_file()

    def demo_tab(self) -> str | None:
        """The tab that offers the built-in demo model (its family's), or None without one."""
        if not self.demo_available():
            return None
        entry = self.index.detect(self.demo_path)
        return tab_of_family(entry.family) if entry.family else None


@dataclass
class RunOutput:
    gallery: list
    infotext: str
    seed: int
    status: str
    facts: str
    inspection: object = None                          # app_inspect.Inspection when the request asked to inspect


# ------------------------------------------------------------------------------------------------
# Listing checkpoints and describing them


def tab_choices(ctx: AppContext, tab: str, entries: list[Entry]) -> list[tuple[str, str]]:
    """(label, value) pairs of a tab's checkpoint dropdown; undetected .ckpt files appear in every tab."""
    groups = by_tab(entries)
    fams = family_tabs().get(tab, ())
    choices = [(DEMO_LABEL, DEMO_LABEL)] if tab == ctx.demo_tab() else []
    for e in groups.get(tab, []):
        main = bool(fams) and e.family == fams[0].name   # the tab's own family is listed by name alone
        choices.append((e.name if main else f"{e.name} ({e.family})", e.name))
    choices += [(f"{e.name} (.ckpt, detected when selected)", e.name) for e in groups.get("unsorted", [])]
    return choices


def refiner_choices(entries: list[Entry]) -> list[tuple[str, str]]:
    refiners = {f.name for f in families.FAMILIES if f.refines}
    return [(NO_REFINER, NO_REFINER)] + [(e.name, e.name) for e in entries if e.family in refiners]


def default_choice(ctx: AppContext, tab: str, entries: list[Entry]) -> str | None:
    """The demo model when the folder has nothing for the demo's tab, else the first listed file."""
    choices = tab_choices(ctx, tab, entries)
    real = [v for _, v in choices if v != DEMO_LABEL]
    if tab == ctx.demo_tab() and not any(e.tab == tab for e in entries):
        return DEMO_LABEL
    return real[0] if real else (choices[0][1] if choices else None)


NETWORK_NAMES = {"unet": "UNet", "mmdit": "MMDiT"}


def describe(spec, path: Path | None, is_demo: bool = False) -> str:
    """Markdown: the detected facts of a checkpoint (family, prediction type and why, latent format, ...)."""
    if spec is None:
        return "*no checkpoint selected*"
    lat = spec.latent
    pred = spec.prediction if spec.prediction_source != "probe" else "eps or v"
    why = ("decided by A1111's probe when the model loads" if spec.prediction_source == "probe"
           else spec.prediction_source)
    lines = [f"**family** `{spec.family}`" + (" (built-in demo)" if is_demo else ""),
             f"**prediction** `{pred}`: {why}",
             f"**latent** {lat.channels} ch, /{lat.factor}, scale {lat.scale:g}"
             + (f", shift {lat.shift:g}" if lat.shift else "")
             + f"; {NETWORK_NAMES.get(spec.network, spec.network)} in {spec.unet.in_channels} ch, "
             f"context {spec.unet.context_dim}" + (f", vector {spec.unet.adm_in_channels}"
                                                  if spec.unet.adm_in_channels else "")]
    if path is not None and path.exists():
        lines.append(f"**file** `{path.name}` ({path.stat().st_size / 2**30:.2f} GiB)")
    lines += [f"*{n}*" for n in spec.notes]
    lines += [f"*not run yet:* {u}" for u in spec.unsupported]
    return "  \n".join(lines)


def banner(ctx: AppContext, entries: list[Entry]) -> str:
    """What the models folder holds, and where to put files when it holds nothing."""
    root = ctx.index.root.resolve()
    groups = by_tab(entries)
    counts = ", ".join(f"{tab_label(t)}: {len(v)}" for t, v in groups.items() if t != "unusable")
    text = f"Models folder: `{root}`" + (f" ({counts})" if counts else "")
    if not ctx.demo_available():
        text += ("  \nThe built-in demo model is not available in this install "
                 f"(`{ctx.demo_path}` is missing; `python -m sd train` rebuilds it).")
    if not any(e.tab in (*family_tabs(), "unsorted") for e in entries):
        text += (f"  \n**No checkpoint found.** Put `.safetensors` or `.ckpt` files in `{root}` (or start with "
                 "`--models-dir` pointing at an AUTOMATIC1111 `models/Stable-diffusion` or ComfyUI "
                 "`models/checkpoints` folder), then press Refresh. To download an official one (needs a reachable "
                 "Hugging Face hub): `python -m sd download sd15` (also `sd21`, `sd21-base`, `sdxl`, `sdxl-refiner`; "
                 "`python -m sd download --list`).")
        if ctx.demo_available():
            text += f" Meanwhile the SD 1.x tab runs the **{DEMO_LABEL}** model with its example prompts."
    bad = groups.get("unusable", [])
    if bad:
        text += "  \nNot listed: " + "; ".join(f"`{e.name}`: {_without_name(e.error or '', e.path.name)}"
                                           for e in bad[:10])
        if len(bad) > 10:
            text += f"; and {len(bad) - 10} more"
    return text


def _without_name(error: str, file_name: str) -> str:
    """A file's error without the leading "NAME: " the checkpoint reader puts there (the banner names it already)."""
    return error[len(file_name) + 2:] if error.startswith(file_name + ": ") else error


# Shown to the user in one line and never logged with a traceback: bad files and requests, a missing file, a full or
# read-only outputs folder (OSError from save_png), out of memory after the tiled-decode fallback (MemoryError).
USER_ERRORS = (CheckpointError, ValueError, FileNotFoundError, OSError, MemoryError)


def selection(ctx: AppContext, value: str, prediction: str | None = None, probe: bool = True):
    """(path, spec, is_demo) of a dropdown value; detects a .ckpt now and, with `probe`, decides eps/v of an SD 2
    file by loading it into the shared cache (the generation that follows needs it loaded anyway)."""
    if value == DEMO_LABEL:
        if not ctx.demo_available():
            raise FileNotFoundError(f"the built-in demo model is missing ({ctx.demo_path})")
        return ctx.demo_path, ctx.index.detect(ctx.demo_path).spec, True
    path = ctx.index.resolve(value)
    entry = ctx.index.detect(path)
    if entry.spec is None:
        raise CheckpointError(entry.error or f"{path.name}: not a usable checkpoint")
    spec = entry.spec
    if probe and (spec.prediction_source == "probe" or prediction in ("eps", "v")):
        spec = ctx.cache.get(path, ctx.device, ctx.dtype, prediction if prediction in ("eps", "v") else None).spec
    return path, spec, False


def preset_updates(ctx: AppContext, value: str, prediction: str | None = None, probe: bool = True,
                   tab: str | None = None) -> dict:
    """Tab values from the preset of the selected checkpoint (and its facts; a warning when it belongs elsewhere)."""
    try:
        path, spec, is_demo = selection(ctx, value, prediction, probe)
    except USER_ERRORS as e:
        return {"facts": f"**cannot use this file:** {e}"}
    facts = describe(spec, path, is_demo)
    if tab is not None and tab_of_family(spec.family) != tab:
        right = tab_of_family(spec.family)
        facts = (f"**This is a `{spec.family}` checkpoint: "
                 + (f"use the {tab_label(right)} tab.**" if right else "this app cannot run it yet.**")
                 + "  \n" + facts)
        return {"facts": facts}
    p = preset_for(spec, ctx.presets, is_demo=is_demo, path=None if is_demo else path)   # "turbo" in the name
    facts += app_sd3.facts_note(p, spec.family, None if is_demo else path, ctx.presets)
    return {"facts": facts, **app_sd3.extra_fields(p), "width": p["width"], "height": p["height"],
            "steps": p["steps"],
            "sampler": DISPLAY_NAMES.get(p["sampler"], p["sampler"]),
            "schedule": SCHEDULE_DISPLAY_NAMES.get(p["schedule"], p["schedule"]), "cfg": p["cfg"],
            "original_width": p["width"], "original_height": p["height"], "target_width": p["width"],
            "target_height": p["height"], "crop_top": 0, "crop_left": 0}


def select_updates(ctx: AppContext, tab: str, value: str, touched, prediction: str = "auto") -> dict:
    """What picking a checkpoint changes in a tab: its facts, and the preset's values for the fields the user has
    not set by hand (`touched`: names of fields typed in, or sent from PNG Info, in this session)."""
    up = preset_updates(ctx, value, prediction if prediction in ("eps", "v") else None, tab=tab)
    return {k: v for k, v in up.items() if k == "facts" or k not in set(touched or ())}


# ------------------------------------------------------------------------------------------------
# Running a request


def _name(display: str, table: dict[str, str], internal: dict) -> str:
    """A1111 display name or internal name -> internal name."""
    if display in table:
        return table[display]
    if display in internal:
        return display
    raise ValueError(f"unknown choice {display!r}; expected one of {', '.join(table)}")


MAX_PROMPT_CHARS = 20_000   # about 50 chunks of 75 tokens; longer texts are refused before tokenizing
MAX_BATCH_COUNT = 100
# What an API call that leaves a parameter out gets, after the checkpoint's preset (see fill_defaults).
PLAIN_DEFAULTS = {"prompt": "", "negative_prompt": "", "seed": -1, "batch_size": 1, "batch_count": 1, "vae": "Automatic",
                  "strength": 0.75, "prediction": "auto", "crop_top": 0, "crop_left": 0, "refiner": NO_REFINER,
                  "switch_at": 0.8, "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}
PLAIN_DEFAULTS.update(app_extras.DEFAULTS)   # hires / clip skip / styles: off when left out
PLAIN_DEFAULTS.update(app_inspect.DEFAULTS)  # inspect: off


def fill_defaults(ctx: AppContext, tab: str, s: dict) -> dict:
    """A request with every parameter it left out (None) filled in: the checkpoint the tab shows first, then that
    checkpoint's preset (size, steps, sampler, schedule, CFG), then the plain defaults above; SDXL's original and
    target sizes follow the output size, as in the form."""
    s = dict(s)
    for name in s:
        inp = declared_input(tab, name) if name not in COMMON_INPUTS else None
        if inp is not None and s[name] is None:
            s[name] = inp.default
    image, inp = s.get("image"), declared_input(tab, "image")
    if image is not None and hasattr(image, "size") and inp is not None and inp.scale:
        for side, v in zip(("width", "height"), output_size(image.size, inp.scale)):  # the image's size decides
            if s.get(side) is None:
                s[side] = v
    if not s.get("checkpoint"):
        s["checkpoint"] = default_choice(ctx, tab, ctx.index.scan())
        if s["checkpoint"] is None:
            raise ValueError(f"no checkpoint for the {tab_label(tab)} tab in the models folder; put one there "
                             "and press Refresh")
    if any(v is None for k, v in s.items() if k not in PLAIN_DEFAULTS and k != "init_image"):
        pred = s.get("prediction") if s.get("prediction") in ("eps", "v") else None
        preset = preset_updates(ctx, s["checkpoint"], pred, tab=tab)
        for k in ("width", "height", "steps", "sampler", "schedule", "cfg"):
            if s.get(k, 0) is None:
                if k not in preset:
                    raise ValueError(preset["facts"].replace("**", ""))
                s[k] = preset[k]
    for k, v in PLAIN_DEFAULTS.items():
        if k in s and s[k] is None:
            s[k] = v
    for side in ("width", "height"):
        for kind in ("original", "target"):
            if f"{kind}_{side}" in s and s[f"{kind}_{side}"] is None:
                s[f"{kind}_{side}"] = s[side]
    return s


def output_size(size: tuple[int, int], scale: int) -> tuple[int, int]:
    """The output size a pixel input of `size` asks for (its family's Input.scale: 1 inpaint/depth, 4 x4), rounded
    down to a multiple of 8 and at least 64."""
    return tuple(max(64, v * scale // 8 * 8) for v in size)


def _num(s: dict, key: str, kind=int):
    """s[key] as int/float, or a one-line error naming the parameter."""
    try:
        v = kind(s[key])
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key} must be a number, got {str(s[key])[:40]!r}") from None
    if kind is float and v != v:
        raise ValueError(f"{key} must be a number, got NaN")
    return v


def _text(s: dict, key: str) -> str:
    v = s[key]
    if not isinstance(v, str):
        raise ValueError(f"{key} must be text")
    if len(v) > MAX_PROMPT_CHARS:
        raise ValueError(f"{key} is {len(v)} characters long; at most {MAX_PROMPT_CHARS} are accepted")
    return v


def _params(s: dict, seed: int) -> GenerateParams:
    from sd.samplers import SAMPLERS
    from sd.schedules import SCHEDULES

    p = GenerateParams(prompt=_text(s, "prompt"), negative_prompt=_text(s, "negative_prompt"),
                       width=_num(s, "width"), height=_num(s, "height"), steps=_num(s, "steps"),
                       cfg=_num(s, "cfg", float), seed=seed, sampler=_name(s["sampler"], SAMPLER_OF_DISPLAY, SAMPLERS),
                       schedule=_name(s["schedule"], SCHEDULE_OF_DISPLAY, SCHEDULES),
                       batch_size=_num(s, "batch_size"))
    if s.get("init_image") is not None:
        p.init_image, p.strength = s["init_image"], _num(s, "strength", float)
    if "crop_top" in s:
        p.sdxl_original_size = (_num(s, "original_height"), _num(s, "original_width"))
        p.sdxl_crop = (_num(s, "crop_top"), _num(s, "crop_left"))
        p.sdxl_target_size = (_num(s, "target_height"), _num(s, "target_width"))
        p.aesthetic_score = _num(s, "aesthetic_score", float)
        p.negative_aesthetic_score = _num(s, "negative_aesthetic_score", float)
    return p


def token_note(prompt: str) -> str:
    """How the prompt was tokenized, for the status line: nothing is cut, long prompts run in 75-token chunks."""
    n = len(encode_tokens(prompt))
    chunks = max(1, -(-n // CHUNK_TOKENS))
    return f"prompt {n} tokens" + (f" in {chunks} chunks of {CHUNK_TOKENS} (A1111-style, nothing cut)"
                                   if chunks > 1 else "")


def text_sources(ctx: AppContext):
    """The TextSources a load passes: None (the cache's own: --t5-device, --keep-text-encoders, ...) unless
    --bert-vocab is set, then the cache's own with the vocabulary added (LDM text models, sd.ldm_bert.find_vocab)."""
    from dataclasses import replace

    from sd.text_encoders import TextSources

    bert_vocab = app_extras.extras_of(ctx).bert_vocab
    return replace(ctx.cache.sources or TextSources(), bert_vocab=str(bert_vocab)) if bert_vocab else None


def _load(ctx: AppContext, tab: str, s: dict) -> tuple[LoadedModel, LoadedModel | None]:
    """The request's checkpoint (and refiner), checked against the tab's families."""
    prediction = s.get("prediction") if s.get("prediction") in ("eps", "v") else None
    path, spec, _ = selection(ctx, s["checkpoint"], prediction)
    if tab_of_family(spec.family) != tab:
        right = tab_of_family(spec.family)
        where = f"use the {tab_label(right)} tab (/generate_{right})" if right else "this app cannot run it yet"
        raise ValueError(f"{path.name} is a {spec.family} checkpoint; {where}")
    vae = (resolve_vae(s.get("vae"), path, ctx.index.root, app_extras.extras_of(ctx).vae_dir)
           if path != ctx.demo_path else None)
    sources = text_sources(ctx)
    model = ctx.cache.get(path, ctx.device, ctx.dtype, prediction, vae=vae, **({"sources": sources} if sources else {}))
    refiner = None
    if s.get("refiner") and s["refiner"] != NO_REFINER:
        if not refiner_of(spec.family):
            raise ValueError(f"a {spec.family} checkpoint has no refiner: choose a base checkpoint the refiner "
                             "continues, or set refiner to None")
        rpath = ctx.index.resolve(s["refiner"])
        refiner = ctx.cache.get(rpath, ctx.device, ctx.dtype)
        if refiner.spec.family not in refiner_of(spec.family):
            raise ValueError(f"{rpath.name} is a {refiner.spec.family} checkpoint, not a refiner of {spec.family}")
    return model, refiner


class Abandoned(Exception):
    """The client went away during the run: nothing of it is saved."""


def run_request(ctx: AppContext, tab: str, s: dict, stop: threading.Event, report,
                abandoned: threading.Event | None = None) -> RunOutput:
    """Every image of a request (batch count x batch size), saved with its parameters. `report(kind, payload)`
    receives ("status", text) and ("step", (done, total, preview image or None)). Stop ends the run between steps
    and keeps what is done; `abandoned` (set when the client disconnected, together with `stop`) saves nothing."""
    report("status", "loading the model")
    s = app_extras.prepare(ctx, fill_defaults(ctx, tab, s))   # styles merged into the prompts
    seed = _num(s, "seed")
    seed = seed if seed >= 0 else random.randrange(2**32 - 1)
    count, steps = _num(s, "batch_count"), _num(s, "steps")
    if not 1 <= count <= MAX_BATCH_COUNT:
        raise ValueError(f"batch count must be between 1 and {MAX_BATCH_COUNT}, got {count}")
    _params(s, seed)  # refuse a malformed request before loading anything
    app_extras.check(ctx, s)
    model, refiner = _load(ctx, tab, s)
    inputs, finish, notes = family_inputs(model.family, s, _num(s, "width"), _num(s, "height"))
    every = preview_every(steps)
    gallery, texts, done_steps, stopped = [], [], 0, False
    shown: list = []
    recorded: list = []   # app_inspect: the recorder of the first run when the request inspects
    for n in range(count):
        p = _params(s, seed + n * int(s["batch_size"]))
        p.inputs = inputs
        p.models_dir = str(ctx.index.root)  # <lora:NAME:w> and embeddings resolve in its listings only
        base_done = done_steps

        def on_step(info: dict, base_done=base_done) -> None:
            i, total = info["step"] + 1, info["total"]
            prev = None
            if i % every == 0 and i < total:
                prev = preview_image(info["denoised"], model.spec.family, preview_size(p.width, p.height))
            report("step", (base_done + i, total * count, prev))

        on_step = app_inspect.recording(s, model, p, on_step, recorded) if n == 0 else on_step
        if refiner is not None:
            from sd.refiner import generate_with_refiner

            res = generate_with_refiner(model, refiner, p, float(s["switch_at"]), callback=on_step, stop=stop)
        else:
            res = app_extras.run(ctx, s, model, p, callback=on_step, stop=stop)   # hires fix, clip skip
        done_steps += res.steps_done
        notes += [n for n in res.info.get("notes", []) if n not in notes]
        shown = res.info.get("shown") or shown   # images the family shows beside the result (the depth map used)
        if abandoned is not None and abandoned.is_set():
            raise Abandoned(f"the client disconnected after {done_steps} steps; nothing was saved")
        options = {i.name: s.get(i.name) for i in model.family.options}
        for i, img in enumerate(res.images):
            img, img_seed = finish(img), p.seed + i   # image i of a batch has seed s + i (A1111's ImageRNG)
            text = build_parameters(
                prompt=p.prompt, negative_prompt=p.negative_prompt, steps=p.steps, sampler=p.sampler,
                schedule=p.schedule, cfg=p.cfg, seed=img_seed, width=p.width, height=p.height, model_name=model.name,
                model_hash=model.short_hash, family=model.spec.family,
                denoising_strength=p.strength if p.init_image is not None else (1.0 if "mask" in inputs else None),
                **{k: v for k, v in options.items() if k in BUILD_OPTIONS}, inputs=p.inputs,
                extra_fields=res.info.get("infotext"),
                sdxl_original_size=p.sdxl_original_size, sdxl_crop=p.sdxl_crop, sdxl_target_size=p.sdxl_target_size,
                aesthetic_score=p.aesthetic_score, negative_aesthetic_score=p.negative_aesthetic_score,
                refiner=refiner.name if refiner else None, refiner_hash=refiner.short_hash if refiner else None,
                refiner_switch_at=float(s["switch_at"]) if refiner else None, batch_size=p.batch_size)
            if res.stopped:  # the schedule stays the requested one; say how much of it ran
                text += f", Stopped at step: {res.steps_done}/{p.steps}"
            path = save_png(img, text, ctx.outputs_dir, img_seed)
            gallery.append((str(path), f"seed {img_seed}"))
            texts.append(text)
        if res.stopped or stop.is_set():
            stopped = True
            break
    status = (f"stopped after {done_steps} of {steps * count} steps" if stopped else
              f"done: {len(gallery)} image(s), {done_steps} steps") + f"; seed {seed}; {token_note(s['prompt'])}"
    status += "".join(f"  \n*{n}*" for n in notes)
    gallery += [(img, caption) for caption, img in shown]   # after the count in the status: not outputs
    facts = describe(model.spec, model.path, model.path == ctx.demo_path)
    return RunOutput(gallery, texts[0] if texts else "", seed, status, facts,
                     inspection=app_inspect.result(recorded, model))


BUILD_OPTIONS = ("mask_blur", "masked_content", "inpaint_area", "masked_padding")  # infotext fields of the options


def family_inputs(fam: Family, s: dict, width: int, height: int):
    """(inputs for GenerateParams.inputs, finish(image) -> image, notes) of a request for a family.

    The family's declared inputs are taken from the request. An image + mask pair (inpainting) goes through
    AUTOMATIC1111's options (sd.inpaint): the mask blurred by `mask_blur`; "only masked" crops the mask's box plus
    `masked_padding` at the output size and pastes the result back into the full image; otherwise the image is
    resized to the output size when it differs (the note says so); "fill" paints the masked area from its
    surroundings first; `paste_back` keeps the original pixels outside the mask."""
    from sd import inpaint

    inputs = {i.name: s[i.name] for i in fam.inputs if s.get(i.name) is not None}
    notes: list[str] = []
    if not {"image", "mask"} <= set(inputs):
        return inputs, (lambda img: img), notes
    image = inpaint.load_image(inputs["image"], "image").convert("RGB")
    mask = inpaint.load_image(inputs["mask"], "mask").convert("L")
    inpaint.check_mask(image, mask)
    blurred = inpaint.blur_mask(mask, float(s.get("mask_blur") or 0))
    box = None
    if s.get("inpaint_area") == "only masked":
        box = inpaint.masked_crop_box(mask, width, height, int(s.get("masked_padding") or 0))
        img_in, mask_in = inpaint.crop_to(image, box, width, height), inpaint.crop_to(blurred, box, width, height)
        notes.append(f"only masked: the box {box} of the {image.width}x{image.height} image was inpainted at "
                     f"{width}x{height} and pasted back")
    elif image.size != (width, height):
        img_in, mask_in = image.resize((width, height), Image.LANCZOS), blurred.resize((width, height), Image.LANCZOS)
        notes.append(f"the {image.width}x{image.height} image and its mask were resized to {width}x{height}")
    else:
        img_in, mask_in = image, blurred
    if s.get("masked_content") == "fill":
        img_in = inpaint.fill_masked(img_in, mask_in)
    back = box is not None or bool(s.get("paste_back"))

    def finish(result):
        return inpaint.paste_back(image, result, blurred, box) if back else result

    return {**inputs, "image": img_in, "mask": mask_in}, finish, notes


def preview_size(width: int, height: int, short: int = 256) -> tuple[int, int]:
    """The live preview's size: the output's aspect, upscaled by a whole factor until its short side is >= `short`."""
    k = max(1, -(-short // max(1, min(width, height))))
    return width * k, height * k


def stream_run(ctx: AppContext, tab: str, s: dict, request: gr.Request | None, progress):
    """Run a request on a worker thread and stream its progress: status text, preview, then the images.
    The Stop button sets the request's event; the sampler checks it between steps and returns what is done."""
    key = (getattr(request, "session_hash", None), tab)
    stop, abandoned, q = threading.Event(), threading.Event(), queue.Queue()
    with ctx.lock:
        ctx.stops[key] = stop

    def work() -> None:
        try:
            q.put(("done", run_request(ctx, tab, s, stop, lambda kind, payload: q.put((kind, payload)), abandoned)))
        except Abandoned as e:
            print(f"note: {e}", file=sys.stderr)
        except USER_ERRORS as e:  # the user's to fix: one line to them, none in the log
            q.put(("error", str(e).splitlines()[0] if str(e) else type(e).__name__))
        except Exception as e:  # noqa: BLE001 - shown to the user, logged with its traceback
            traceback.print_exc()
            q.put(("error", f"{type(e).__name__}: {e}"))

    threading.Thread(target=work, daemon=True, name=f"generate-{tab}").start()
    finished = False
    skip = gr.skip()
    try:
        while True:
            kind, payload = q.get()
            if kind == "status":
                yield skip, skip, payload, skip, skip, skip
            elif kind == "step":
                done, total, prev = payload
                progress((done, total), desc=f"step {done}/{total}", unit="steps")
                yield skip, (prev if prev is not None else skip), f"step {done}/{total}", skip, skip, skip
            elif kind == "error":
                finished = True
                yield skip, skip, f"**error:** {payload}", skip, skip, skip
                raise gr.Error(payload, print_exception=False)
            else:
                finished = True
                out: RunOutput = payload
                app_inspect.keep(ctx, key, out)
                yield out.gallery, skip, out.status, out.infotext, out.seed, out.facts
                return
    finally:
        if not finished:  # the client went away: end the worker at its next step, and keep nothing of the run
            abandoned.set()
            stop.set()
        with ctx.lock:
            if ctx.stops.get(key) is stop:
                del ctx.stops[key]


def stop_run(ctx: AppContext, tab: str, request: gr.Request | None) -> str:
    with ctx.lock:
        ev = ctx.stops.get((getattr(request, "session_hash", None), tab))
    if ev is None:
        return "nothing is running"
    ev.set()
    return "stopping after the current step"


# ------------------------------------------------------------------------------------------------
# The UI


def _size_slider(label: str, value: int, elem_id: str, step: int = 8) -> gr.Slider:
    return gr.Slider(64, 2048, value=value, step=step, label=label, elem_id=elem_id)


def build_generate_tab(ctx: AppContext, tab: str, entries: list[Entry]) -> dict:
    """The components of one family tab, keyed by name (also the API parameter names). The form is the common one
    plus what `tab_inputs` derives from the tab's families; every declared family input gets a component."""
    c: dict = {"touched": gr.State([])}
    names = tab_inputs(tab)
    fams = family_tabs()[tab]
    value = default_choice(ctx, tab, entries)
    start = preset_updates(ctx, value, probe=False) if value else {"facts": "*no checkpoint for this tab in the models folder*"}
    fallback = ctx.presets[fams[0].preset_for(None)]
    get = lambda k: start.get(k, fallback.get(k))  # noqa: E731
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                c["checkpoint"] = gr.Dropdown(tab_choices(ctx, tab, entries), value=value, label="Checkpoint",
                                              allow_custom_value=True, elem_id=f"{tab}-checkpoint", scale=5)
                c["refresh"] = gr.Button("Refresh", scale=0, min_width=80, elem_id=f"{tab}-refresh")
                c["vae"] = gr.Dropdown(vae_choices(ctx.index.root, app_extras.extras_of(ctx).vae_dir), value=AUTOMATIC, label="VAE", scale=2,
                                       elem_id=f"{tab}-vae",
                                       info="Automatic: NAME.vae.safetensors beside the checkpoint, else its own")
                if "prediction" in names:
                    c["prediction"] = gr.Dropdown(["auto", "eps", "v"], value="auto", label="Prediction type",
                                                  scale=1, elem_id=f"{tab}-prediction")
        with gr.Column(scale=2):
            c["facts"] = gr.Markdown(start["facts"], elem_id=f"{tab}-facts")
            app_inspect.build_card(ctx, tab, c, value)
    c["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id=f"{tab}-prompt")
    c["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=1, elem_id=f"{tab}-negative")
    if tab == ctx.demo_tab():
        from sd.demo import EXAMPLE_PROMPTS

        gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[c["prompt"]], label="Example prompts (demo model)")
    with gr.Row():
        with gr.Column():
            _family_input_controls(c, tab)
            with gr.Row():
                c["sampler"] = gr.Dropdown(list(DISPLAY_NAMES.values()), label="Sampler", elem_id=f"{tab}-sampler",
                                           value=DISPLAY_NAMES.get(get("sampler"), get("sampler")))
                c["schedule"] = gr.Dropdown(list(SCHEDULE_OF_DISPLAY), label="Schedule type",
                                            elem_id=f"{tab}-schedule",
                                            value=SCHEDULE_DISPLAY_NAMES.get(get("schedule"), get("schedule")))
            with gr.Row():
                c["steps"] = gr.Slider(1, 150, value=get("steps"), step=1, label="Steps", elem_id=f"{tab}-steps")
                c["cfg"] = gr.Slider(1, 30, value=get("cfg"), step=0.5, label="CFG scale", elem_id=f"{tab}-cfg")
            with gr.Row():
                step = fallback.get("size_step", 8)   # the preset's (SD3: 16, patch 2 on an f8 latent)
                c["width"] = _size_slider("Width", get("width"), f"{tab}-width", step)
                c["height"] = _size_slider("Height", get("height"), f"{tab}-height", step)
            with gr.Row():
                c["seed"] = gr.Number(-1, label="Seed (-1 = random)", precision=0, elem_id=f"{tab}-seed", scale=3)
                c["dice"] = gr.Button("Random", scale=0, min_width=80, elem_id=f"{tab}-dice")
                c["reuse"] = gr.Button("Reuse", scale=0, min_width=80, elem_id=f"{tab}-reuse")
                c["batch_size"] = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id=f"{tab}-batch-size")
                c["batch_count"] = gr.Slider(1, 16, value=1, step=1, label="Batch count",
                                             elem_id=f"{tab}-batch-count")
            if "init_image" in names:
                with gr.Accordion("img2img", open=False):
                    c["init_image"] = gr.Image(type="pil", label="Init image (optional)", elem_id=f"{tab}-init-image")
                    c["strength"] = gr.Slider(0, 1, value=0.75, step=0.01, label="Denoising strength",
                                              elem_id=f"{tab}-strength")
            if "refiner" in names:
                _sdxl_controls(c, get, entries, tab)
            _family_option_controls(c, tab)
            app_sd3.build_view(ctx, tab, c)   # SD3 / 3.5: the Preset dropdown (large vs large turbo)
            app_extras.build_controls(ctx, tab, c, fams)
        with gr.Column():
            with gr.Row():
                c["generate"] = gr.Button("Generate", variant="primary", elem_id=f"{tab}-generate")
                c["stop"] = gr.Button("Stop", variant="stop", elem_id=f"{tab}-stop")
            c["status"] = gr.Markdown("", elem_id=f"{tab}-status")
            c["preview"] = gr.Image(label="Preview (latent approximation)", interactive=False, height=256,
                                    elem_id=f"{tab}-preview")
            c["gallery"] = gr.Gallery(label="Images", columns=2, elem_id=f"{tab}-gallery", format="png")
            c["used_seed"] = gr.Number(None, label="Used seed", precision=0, interactive=False, visible=False,
                                       elem_id=f"{tab}-used-seed")  # shown once a run has used one
            c["infotext"] = gr.Textbox(label="Parameters (PNG info)", lines=3, interactive=False,
                                       elem_id=f"{tab}-infotext")
            app_inspect.build_view(ctx, tab, c)
    _wire_tab(ctx, tab, c)
    app_attention.build_view(ctx, tab, c)   # its own button and /attention_<tab>; every other run unchanged
    return c


def input_component(inp: Input, elem_id: str):
    """The Gradio component of one declared family input (its kind, label, default, bounds, choices, help)."""
    kw = dict(label=inp.label, elem_id=elem_id, info=inp.help or None)
    if inp.kind in ("image", "mask"):
        kw.pop("info")
        return gr.Image(type="pil", image_mode="L" if inp.kind == "mask" else "RGB", sources=["upload", "clipboard"],
                        format="png", **kw)  # lossless: the pixels shown are the pixels used
    if inp.kind == "number":
        if inp.min is not None and inp.max is not None:
            step = 1 if float(inp.default or 0).is_integer() and float(inp.min).is_integer() else 0.01
            return gr.Slider(inp.min, inp.max, value=inp.default, step=step, **kw)
        return gr.Number(inp.default, **kw)
    if inp.kind == "choice":
        return gr.Dropdown(list(inp.choices), value=inp.default, **kw)
    if inp.kind == "text" and inp.choices:   # suggestions (the ImageNet class picker); other values typed are kept
        return gr.Dropdown(list(inp.choices), value=inp.default, allow_custom_value=True, filterable=True, **kw)
    if inp.kind == "bool":
        return gr.Checkbox(value=bool(inp.default), **kw)
    return gr.Textbox(value=inp.default or "", **kw)


def _declared_components(c: dict, tab: str, inputs: list[Input]) -> None:
    """One component per declared input of the tab's families (the first declaration of a name wins), in a row."""
    with gr.Row():
        for inp in inputs:
            if inp.name not in c:
                c[inp.name] = input_component(inp, f"{tab}-{inp.name.replace('_', '-')}")


def _family_input_controls(c: dict, tab: str) -> None:
    """The tab's declared pixel and value inputs. An image + mask pair also gets an editor to paint the mask on the
    image in the browser; the painted strokes become the `mask` input (white = repaint)."""
    inputs = [i for f in family_tabs()[tab] for i in f.inputs]
    if {"image", "mask"} <= {i.kind for i in inputs}:
        c["editor"] = gr.ImageEditor(type="pil", label="Paint the area to repaint over the image",
                                     brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=24),
                                     layers=False, elem_id=f"{tab}-editor", height=420, format="png")
    _declared_components(c, tab, inputs)


def _family_option_controls(c: dict, tab: str) -> None:
    """The options the tab's families declare (applied around the model, recorded in the infotext)."""
    options = [i for f in family_tabs()[tab] for i in f.options]
    if options:
        with gr.Accordion("Options", open=True):
            _declared_components(c, tab, options)


def editor_to_inputs(value) -> tuple:
    """An ImageEditor value -> (image, mask): the background as RGB and the painted strokes as an L mask (white
    where painted). (None, None) while nothing is loaded."""
    if not isinstance(value, dict) or value.get("background") is None:
        return None, None
    bg = value["background"].convert("RGB")
    mask = np.zeros((bg.height, bg.width), dtype=np.uint8)
    for layer in value.get("layers") or []:
        a = np.asarray(layer.convert("RGBA").resize(bg.size))[..., 3]
        mask = np.maximum(mask, np.where(a > 0, 255, 0).astype(np.uint8))
    return bg, Image.fromarray(mask, "L")


def _sdxl_controls(c: dict, get, entries: list[Entry], tab: str) -> None:
    with gr.Accordion("SDXL size conditioning", open=True):
        with gr.Row():
            c["original_width"] = _size_slider("Original width", get("width"), "sdxl-original-width")
            c["original_height"] = _size_slider("Original height", get("height"), "sdxl-original-height")
        with gr.Row():
            c["crop_top"] = gr.Slider(0, 2048, value=0, step=8, label="Crop top", elem_id=f"{tab}-crop-top")
            c["crop_left"] = gr.Slider(0, 2048, value=0, step=8, label="Crop left", elem_id=f"{tab}-crop-left")
        with gr.Row():
            c["target_width"] = _size_slider("Target width", get("width"), "sdxl-target-width")
            c["target_height"] = _size_slider("Target height", get("height"), "sdxl-target-height")
    with gr.Accordion("Refiner", open=False):
        c["refiner"] = gr.Dropdown(refiner_choices(entries), value=NO_REFINER, label="Refiner checkpoint",
                                   allow_custom_value=True, elem_id=f"{tab}-refiner")
        c["switch_at"] = gr.Slider(0, 1, value=0.8, step=0.05, label="Switch at (fraction of the steps)",
                                   elem_id=f"{tab}-switch-at")
        with gr.Row():
            c["aesthetic_score"] = gr.Slider(0, 10, value=6.0, step=0.5, label="Aesthetic score",
                                             elem_id=f"{tab}-aesthetic")
            c["negative_aesthetic_score"] = gr.Slider(0, 10, value=2.5, step=0.5, label="Negative aesthetic score",
                                                      elem_id=f"{tab}-negative-aesthetic")


def _generate_fn(ctx: AppContext, tab: str, names: tuple[str, ...]):
    """The tab's generate callback. Its signature names every input (the API's keyword arguments), each with the
    default None, so an API call may leave any of them out: `fill_defaults` fills them from the tab's first
    checkpoint and its preset."""

    def generate_tab(*args):  # Gradio passes the inputs, then the request and the progress tracker (see below)
        s, (request, progress) = dict(zip(names, args)), args[len(names):]
        yield from stream_run(ctx, tab, s, request, progress)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    generate_tab.__signature__ = inspect.Signature(
        [inspect.Parameter(n, kind, default=None) for n in names]
        + [inspect.Parameter("request", kind, default=None, annotation=gr.Request),
           inspect.Parameter("progress", kind, default=gr.Progress())])
    generate_tab.__annotations__ = {"request": gr.Request}
    generate_tab.__name__ = generate_tab.__qualname__ = f"generate_{tab}"
    return generate_tab


def _wire_tab(ctx: AppContext, tab: str, c: dict) -> None:
    names = tab_inputs(tab)
    outputs = [c[k] for k in OUTPUTS]
    run = c["generate"].click(_generate_fn(ctx, tab, names), [c[k] for k in names], outputs,
                              api_name=f"generate_{tab}", concurrency_id="generate",
                              concurrency_limit=ctx.concurrency, show_progress_on=[c["status"]])
    app_inspect.wire(ctx, tab, c, run, first=tab == next(iter(family_tabs())))
    run.then(lambda seed: gr.Number(visible=seed is not None), c["used_seed"], c["used_seed"],
             api_visibility="private", queue=False)
    def stop(request: gr.Request) -> str:
        return stop_run(ctx, tab, request)

    c["stop"].click(stop, None, c["status"], api_name=f"stop_{tab}",
                    concurrency_limit=None, queue=False)
    c["dice"].click(lambda: -1, None, c["seed"], api_visibility="private", queue=False)
    c["reuse"].click(lambda s: s, c["used_seed"], c["seed"], api_visibility="private", queue=False)
    keys = [k for k in PRESET_FIELDS if k in c]
    # Fields the user set by hand (or PNG Info sent) in this session: picking a checkpoint leaves them alone.
    for k in keys:
        if k != "facts":
            c[k].input(lambda touched, k=k: sorted({*touched, k}), c["touched"], c["touched"],
                       api_visibility="private", queue=False)

    def on_select(value, touched, prediction="auto"):
        up = select_updates(ctx, tab, value, touched, prediction)
        return [up.get(k, gr.skip()) for k in keys]

    pred = [c["prediction"]] if "prediction" in c else []
    fill = [c[k] for k in keys]
    c["checkpoint"].input(on_select, [c["checkpoint"], c["touched"], *pred], fill, api_visibility="private")
    if pred:
        c["prediction"].input(on_select, [c["checkpoint"], c["touched"], *pred], fill, api_visibility="private")
    if "editor" in c:  # the painted editor fills the image and mask inputs, and the size follows the image
        def from_editor(value):
            image, mask = editor_to_inputs(value)
            if image is None:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return (image, mask, *output_size(image.size, 1))

        c["editor"].change(from_editor, c["editor"], [c["image"], c["mask"], c["width"], c["height"]],
                           api_visibility="private", queue=False)
    inp = declared_input(tab, "image")
    if "image" in c and "editor" not in c and inp is not None and inp.scale:  # the size follows the image
        def size_of(image, scale=inp.scale):
            return output_size(image.size, scale) if image is not None else (gr.skip(), gr.skip())

        c["image"].change(size_of, c["image"], [c["width"], c["height"]], api_visibility="private", queue=False)
    if "original_width" in c:  # original and target size follow the output size when the user changes it
        c["width"].input(lambda w: (w, w), c["width"], [c["original_width"], c["target_width"]],
                         api_visibility="private", queue=False)
        c["height"].input(lambda h: (h, h), c["height"], [c["original_height"], c["target_height"]],
                          api_visibility="private", queue=False)


def tab_views(ctx: AppContext, tab: str) -> None:
    """Views a tab shows besides its generate form: the VQ-GAN / LDM tab starts with the first-stage round trip."""
    if tab == "ldm":
        from app_first_stage import build_first_stage_view

        with gr.Accordion("First stages (VQ-GAN, LDM and SD autoencoders): round-trip an image", open=True):
            build_first_stage_view(ctx)


def build_future_tabs(ctx: AppContext, entries: list[Entry]) -> gr.Markdown:
    """The tab of the detected families that do not run yet: what they are and which files of theirs were found."""
    groups = by_tab(entries)
    with gr.Tab("Detected, not run yet", id="variants"):
        md = gr.Markdown(_future_text(ctx, waiting_presets(), groups.get("variants", [])))
    return md


def waiting_presets() -> list[str]:
    """Presets of the families that are detected but do not run yet (one entry per preset)."""
    return list(dict.fromkeys(f.preset_for(None) for f in families.FAMILIES if not f.runs))


def _future_text(ctx: AppContext, preset_names: list[str], files: list[Entry]) -> str:
    lines = ["**Not implemented yet.** These checkpoints are detected and listed, but this app cannot run them "
             "yet; the tab will get its form when the engine supports them.", ""]
    for name in preset_names:
        p = ctx.presets[name]
        lines.append(f"- **{p['label']}**: {p['notes']} Expected files: {', '.join(p['expects'])}.")
    lines.append("")
    if files:
        lines.append("Found in the models folder:")
        for e in files:
            why = "; ".join(e.spec.unsupported) if e.spec is not None and e.spec.unsupported else (e.error or "")
            lines.append(f"- `{e.name}` ({e.family}): {why}")
    else:
        lines.append("No such file in the models folder.")
    return "\n".join(lines)


def known_models(ctx: AppContext | None) -> dict[str, str]:
    """{file stem or short hash: tab} of the models folder's detected files (hashes of the loaded ones only: hashing
    every file on each upload would read gigabytes), for PNG Info's tab guess."""
    if ctx is None:
        return {}
    out = {Path(e.name).stem: tab_of_family(e.family) for e in ctx.index.scan()
           if e.family is not None and tab_of_family(e.family)}
    out.update({h: tab_of_family(f) for h, f in ctx.cache.known_hashes().items() if tab_of_family(f)})
    return out


def png_info(image_path: str | None, ctx: AppContext | None = None) -> tuple[str, dict, str]:
    """Read the `parameters` text of an uploaded image: (text, settings, suggested tab as markdown). The tab is the
    checkpoint's when the models folder has it (by `Model hash`, then `Model`), else guessed from the fields and
    the size; what cannot be honoured (an unknown sampler or schedule type) is said in the hint."""
    if not image_path:
        return "", {}, ""
    text = read_parameters(image_path)
    if not text:
        return "", {}, "This image carries no generation parameters."
    settings = to_settings(parse_parameters(text))
    tab = guess_tab(settings, known_models(ctx))
    hint = f"Looks like **{tab_label(tab)}** settings (model: `{settings.get('model', '?')}`)."
    return text, settings, hint + "".join(f"  \n*warning: {w}*" for w in settings.get("warnings", []))


def send_values(ctx: AppContext, tab: str, settings: dict) -> tuple[dict, str]:
    """PNG-info settings -> {component name: value} for a tab (the checkpoint only if it is in the folder)."""
    names = tab_inputs(tab)
    up: dict = {k: settings[k] for k in ("prompt", "negative_prompt", "steps", "cfg", "seed", "width", "height",
                                         "batch_size", "strength") if k in settings}
    for k in names:  # the family's declared options the infotext carries (mask blur, masked content, ...)
        inp = declared_input(tab, k)
        if inp is not None and inp.kind not in ("image", "mask") and k in settings:
            up[k] = settings[k]
    if "sampler" in settings:
        up["sampler"] = DISPLAY_NAMES[settings["sampler"]]
    if "schedule" in settings:
        up["schedule"] = SCHEDULE_DISPLAY_NAMES[settings["schedule"]]
    if "original_width" in names:
        size = (settings.get("height", 1024), settings.get("width", 1024))
        up["original_height"], up["original_width"] = settings.get("sdxl_original_size", size)
        up["target_height"], up["target_width"] = settings.get("sdxl_target_size", size)
        up["crop_top"], up["crop_left"] = settings.get("sdxl_crop", (0, 0))
        for src, dst in (("refiner_switch_at", "switch_at"), ("aesthetic_score", "aesthetic_score"),
                         ("negative_aesthetic_score", "negative_aesthetic_score")):
            if src in settings:
                up[dst] = settings[src]
    up.update(app_extras.send_values(settings, names))
    note = ""
    entries = ctx.index.scan()
    model = settings.get("model")
    if model and ctx.demo_available() and model == ctx.demo_path.stem and tab == ctx.demo_tab():
        up["checkpoint"] = DEMO_LABEL
    elif model:
        match = [e for e in entries if Path(e.name).stem == model and e.tab in (tab, "unsorted")]
        if match:
            up["checkpoint"] = match[0].name
        else:
            note = f"Checkpoint `{model}` is not in the models folder; the tab keeps its current one."
    if "refiner" in names and settings.get("refiner"):
        refiners = {f.name for f in families.FAMILIES if f.refines}
        match = [e for e in entries if Path(e.name).stem == settings["refiner"] and e.family in refiners]
        if match:
            up["refiner"] = match[0].name
        else:
            note += f" Refiner `{settings['refiner']}` is not in the models folder."
    return up, note.strip()


def send_keys(tab: str) -> list[str]:
    """The components PNG Info may set in a tab: its inputs except pixels and the batch count."""
    return [k for k in tab_inputs(tab) if k not in ("batch_count", "init_image", "prediction")
            and not (declared_input(tab, k) and declared_input(tab, k).kind in ("image", "mask"))]


def build_pnginfo_tab(ctx: AppContext, tabs: gr.Tabs, gen_tabs: dict[str, dict]) -> None:
    with gr.Tab("PNG Info", id="pnginfo"):
        with gr.Row():
            image = gr.Image(type="filepath", image_mode=None, label="Image (PNG from this app or AUTOMATIC1111)",
                             sources=["upload", "clipboard"], elem_id="pnginfo-image")
            with gr.Column():
                text = gr.Textbox(label="parameters", lines=6, interactive=False, elem_id="pnginfo-text")
                settings = gr.JSON(label="Settings", elem_id="pnginfo-settings")
                hint = gr.Markdown(elem_id="pnginfo-hint")
                with gr.Row():
                    buttons = {t: gr.Button(f"Send to {label}", elem_id=f"pnginfo-send-{t}")
                               for t, label in ((t, tab_label(t)) for t in gen_tabs)}
        def read_info(image_path: str | None) -> tuple[str, dict, str]:
            return png_info(image_path, ctx)

        image.change(read_info, image, [text, settings, hint], api_name="png_info")
        for t, btn in buttons.items():
            keys = [k for k in send_keys(t) if k in gen_tabs[t]]

            def send(s, touched, t=t, keys=keys):
                up, note = send_values(ctx, t, s if isinstance(s, dict) else {})
                sent = sorted({*touched, *(k for k in up if k != "checkpoint")})
                return [up.get(k, gr.skip()) for k in keys] + [sent, gr.Tabs(selected=t), note]

            btn.click(send, [settings, gen_tabs[t]["touched"]],
                      [gen_tabs[t][k] for k in keys] + [gen_tabs[t]["touched"], tabs, hint], api_visibility="private")


def refresh_all(ctx: AppContext, gen_tabs: dict[str, dict]):
    """Rescan the models folder: new choices for every checkpoint and refiner dropdown, the banner, the list of
    files waiting for their family."""
    entries = ctx.index.scan()
    ups = [gr.Dropdown(choices=tab_choices(ctx, t, entries)) for t in gen_tabs]
    ups += [gr.Dropdown(choices=refiner_choices(entries)) for t in gen_tabs if "refiner" in gen_tabs[t]]
    ups += [gr.Dropdown(choices=vae_choices(ctx.index.root, app_extras.extras_of(ctx).vae_dir)) for t in gen_tabs]
    return ups + [banner(ctx, entries), _future_text(ctx, waiting_presets(), by_tab(entries).get("variants", []))]


def default_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        parse_dtype(dtype)
        return dtype
    return "float16" if device.startswith("cuda") else "float32"


def build_app(models_dir: str | os.PathLike | None = None, device: str = "cpu", dtype: str = "float32",
              cache: ModelCache | None = None, outputs_dir: str | os.PathLike = "outputs",
              demo_path: Path | None | str = "default", concurrency: int = 2, queue_size: int = 32,
              extras: app_extras.Extras | None = None) -> gr.Blocks:
    """The whole playground. `cache` may be shared (tests pass one); `demo_path` None disables the demo model.
    At most `queue_size` requests wait in Gradio's queue; past it a request is refused at once ("Queue is full")."""
    if demo_path == "default":
        from sd.demo import DEMO_CHECKPOINT

        demo_path = DEMO_CHECKPOINT
    device = default_device(device)
    ctx = AppContext(index=ModelIndex(resolve_models_dir(models_dir)), cache=cache or ModelCache(), device=device,
                     dtype=default_dtype(dtype, device), outputs_dir=Path(outputs_dir),
                     demo_path=Path(demo_path) if demo_path else None, concurrency=concurrency,
                     extras=extras or app_extras.Extras())
    entries = ctx.index.scan()
    with gr.Blocks(title="Stable Diffusion playground") as demo:
        gr.Markdown("## Stable Diffusion series playground")
        info = gr.Markdown(banner(ctx, entries), elem_id="models-banner")
        with gr.Tabs() as tabs:
            gen_tabs = {}
            for t in family_tabs():
                with gr.Tab(tab_label(t), id=t, elem_id=f"tab-{t}"):
                    tab_views(ctx, t)
                    gen_tabs[t] = build_generate_tab(ctx, t, entries)
            variants_md = build_future_tabs(ctx, entries)
            app_grid.build_grid_tab(ctx)
            build_pnginfo_tab(ctx, tabs, gen_tabs)
        outs = ([gen_tabs[t]["checkpoint"] for t in gen_tabs]
                + [gen_tabs[t]["refiner"] for t in gen_tabs if "refiner" in gen_tabs[t]]
                + [gen_tabs[t]["vae"] for t in gen_tabs] + [info, variants_md])
        for i, t in enumerate(gen_tabs):
            gen_tabs[t]["refresh"].click(lambda: refresh_all(ctx, gen_tabs), None, outs,
                                         api_name="refresh" if i == 0 else None,
                                         api_visibility="public" if i == 0 else "private")
    demo.queue(max_size=queue_size)
    demo.sd_context = ctx  # for tests and tools; the app itself never reads it back
    return demo


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Stable Diffusion series playground (Gradio).")
    on_space = bool(os.environ.get("SPACE_ID"))
    ap.add_argument("--host", default="0.0.0.0" if on_space else "127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    ap.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    ap.add_argument("--auth", default=None, help="user:pass required to open the page")
    ap.add_argument("--models-dir", default=None, help="checkpoint folder (default $SD_MODELS_DIR or ./models)")
    ap.add_argument("--outputs-dir", default="outputs", help="where generated PNGs are saved")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, mps")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                    help="auto: float16 on cuda, float32 elsewhere")
    ap.add_argument("--cache-gb", type=float, default=None, help="memory budget of loaded models (default 8)")
    ap.add_argument("--concurrency", type=int, default=2, help="generations that may run at once")
    ap.add_argument("--queue-size", type=int, default=32, help="requests that may wait; past it: 'Queue is full'")
    ap.add_argument("--max-upload-mb", type=float, default=32, help="largest file a client may upload")
    app_extras.add_flags(ap)
    app_sd3.add_flags(ap)   # --t5-device, --keep-text-encoders
    perf.add_flags(ap)      # --low-memory, --threads (sd/perf.py)
    return ap.parse_args(argv)


SHARE_USER = "sd"


def share_auth(share: bool, auth: str | None) -> tuple[tuple[str, str] | None, str | None]:
    """(auth pair for Gradio, line to print once). A public --share link always has a login: --auth user:pass,
    or else a random password made now (user "sd"), printed once to the console and never stored."""
    if auth:
        if ":" not in auth or not auth.split(":", 1)[0] or not auth.split(":", 1)[1]:
            raise ValueError("--auth expects user:pass (both non-empty)")
        return tuple(auth.split(":", 1)), None
    if not share:
        return None, None
    password = secrets.token_urlsafe(12)
    return (SHARE_USER, password), (f"--share without --auth: the public link asks for a login; user {SHARE_USER}, "
                                    f"password {password} (made for this run only; give --auth user:pass to choose)")


def main(argv: list[str] | None = None) -> int:
    from sd.cpu_tuning import tune_allocator

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.low_memory:   # freed blocks stay in the heap: faster, ~1 GB more at the peak (sd/cpu_tuning.py)
        tune_allocator()
    try:
        auth, say = share_auth(args.share, args.auth)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if say:
        print(say, flush=True)
    try:
        sources = app_sd3.text_sources(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        perf.apply_threads(args.threads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cache = ModelCache(int(args.cache_gb * 2**30) if args.cache_gb else None, sources=sources,
                       low_memory=args.low_memory)
    demo = build_app(args.models_dir, args.device, args.dtype, cache=cache, outputs_dir=args.outputs_dir,
                     concurrency=args.concurrency, queue_size=args.queue_size, extras=app_extras.from_args(args))
    Path(args.outputs_dir).mkdir(parents=True, exist_ok=True)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                max_file_size=f"{int(args.max_upload_mb * 1024)}kb",
                allowed_paths=[str(Path(args.outputs_dir).resolve())],
                # gradio 6.31's launch probes the page with HEAD requests of 3 s timeout and refuses to start when
                # they time out; the page config of nine tabs is ~1.7 MB and took ~4 s to serve on a loaded 2-core
                # machine, so the probe is skipped (its only effect: pinned gradio, Blocks.launch `_frontend`)
                _frontend=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
