"""The A1111 habits of the text-to-image tabs (issue 12): the "Hires. fix" accordion (sd.hires), clip skip, the
style picker (sd.styles) and the extra-networks picker (the LoRAs and embeddings found, with a click inserting
`<lora:NAME:1>` or the embedding's name into the prompt), plus the app flags `--styles`, `--loras-dir`,
`--embeddings-dir` and `--vae-dir`.

app.py calls in here at a few places: `tab_params` (the API parameters these controls add, appended after the tab's
own so old positional calls still work; each defaults to None = off / the plain default in DEFAULTS),
`build_controls` (the components), `prepare` (styles merged into the prompts before the request is checked),
`run` (plain generate or hires fix, with `Clip skip` in the infotext), and `send_values` (PNG Info back to the
controls). Which tabs get the controls follows from the family table: tabs whose families all take a prompt and no
image of their own (txt2img tabs: SD 1.x, SD 2.x, SDXL, SD3).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
from PIL import Image

from sd.hires import UPSCALERS, Hires, generate_hires
from sd.models_dir import extra_files
from sd.pipeline import generate
from sd.styles import apply_styles, load_styles

HIRES_PARAMS = ("hires", "hires_upscaler", "hires_scale", "hires_resize_x", "hires_resize_y", "hires_steps",
                "hires_denoise")
PARAMS = ("clip_skip", "styles", *HIRES_PARAMS, "sdxl_clip_l_skip")   # each new one appended: old calls still work
# What an API call that leaves one out gets (app.PLAIN_DEFAULTS is updated with these): everything off.
DEFAULTS = {"clip_skip": 1, "styles": (), "hires": False, "hires_upscaler": "Latent", "hires_scale": 2.0,
            "hires_resize_x": 0, "hires_resize_y": 0, "hires_steps": 0, "hires_denoise": 0.7,
            "sdxl_clip_l_skip": False}
MAX_CLIP_SKIP = 12
PREVIEW_NAMES = ("{stem}.png", "{stem}.preview.png")     # A1111's preview files beside a LoRA / embedding
# Cross-attention context width -> the model line a LoRA / embedding of that width fits (a display hint only;
# the released text towers: CLIP-L 768, OpenCLIP-H 1024, CLIP-L + bigG 2048)
CONTEXT_FITS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


@dataclass(frozen=True)
class Extras:
    """Folders and files the app's flags name (None: the models folder's own sub-folders only)."""

    styles_file: Path | None = None       # --styles FILE; default styles.csv in the models folder's parent
    loras_dir: Path | None = None         # --loras-dir
    embeddings_dir: Path | None = None    # --embeddings-dir
    vae_dir: Path | None = None           # --vae-dir
    bert_vocab: Path | None = None        # --bert-vocab: BERT's uncased vocab.txt (LDM text models, issue 11)


def add_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--styles", default=None, metavar="FILE",
                    help="A1111 styles.csv (default: styles.csv in the models folder's parent)")
    ap.add_argument("--loras-dir", default=None, metavar="DIR", help="a LoRA folder besides the models folder's")
    ap.add_argument("--embeddings-dir", default=None, metavar="DIR",
                    help="a textual-inversion folder besides the models folder's")
    ap.add_argument("--vae-dir", default=None, metavar="DIR", help="a VAE folder besides the models folder's")
    ap.add_argument("--bert-vocab", default=None, metavar="FILE",
                    help="LDM txt2img-f8-large / text2img256: BERT's uncased vocab.txt (default: vocab.txt beside the "
                         "checkpoint, in the models folder or its text_encoders/ folder)")


def from_args(args: argparse.Namespace) -> Extras:
    path = lambda v: Path(v) if v else None  # noqa: E731
    return Extras(path(args.styles), path(args.loras_dir), path(args.embeddings_dir), path(args.vae_dir),
                  path(getattr(args, "bert_vocab", None)))


def extras_of(ctx) -> Extras:
    return getattr(ctx, "extras", None) or Extras()


def takes_extras(fams) -> bool:
    """Text-to-image tabs: every family takes a prompt and none takes an image input of its own."""
    return bool(fams) and all(f.text and not any(i.kind == "image" for i in f.inputs) for f in fams)


def tab_params(fams) -> tuple[str, ...]:
    return PARAMS if takes_extras(fams) else ()


# ------------------------------------------------------------------------------------------------ requests


def styles_of(ctx) -> dict:
    """The styles of --styles, else of styles.csv beside the models folder ({} without one)."""
    return load_styles(extras_of(ctx).styles_file, ctx.index.root)


def style_names(ctx) -> list[str]:
    try:
        return list(styles_of(ctx))
    except ValueError:     # a broken file lists nothing; a request naming a style then says what is wrong
        return []


def prepare(ctx, s: dict) -> dict:
    """The request with its styles merged into prompt and negative prompt (A1111 writes the merged prompts into
    the infotext). Refuses hires fix with a refiner in one line."""
    names = s.get("styles") or ()
    if isinstance(names, str):
        names = [names]
    if names:
        prompt, negative = apply_styles(s.get("prompt") or "", s.get("negative_prompt") or "", styles_of(ctx), names)
        s = {**s, "prompt": prompt, "negative_prompt": negative}
    if s.get("hires") and s.get("refiner") not in (None, "", "None"):
        raise ValueError("hires fix and the refiner do not run together yet: turn one of them off")
    return s


def upscaler_models(ctx) -> dict[str, Path]:
    """{listed name: file} of the models folder's image-upscaler checkpoints: families whose image input makes a
    larger output (Input.scale > 1: the SD 2 x4 upscaler), offered as hires-fix upscalers by their listed name."""
    from sd.families import get_family

    def scale(family: str) -> int:
        try:
            fam = get_family(family)
        except KeyError:
            return 1
        return max((i.scale for i in fam.inputs if i.kind == "image"), default=1) if fam.runs else 1

    return {e.name: e.path for e in ctx.index.scan() if e.family and scale(e.family) > 1}


def model_upscaler(ctx, path: Path, s: dict):
    """An sd.hires image upscaler running an upscaler checkpoint (cached like any model) at its preset's steps,
    sampler, schedule and CFG on the request's prompts (LoRA tags removed: they are the base model's), its image
    input at the pass-1 image and its other inputs at their defaults; the 4x result is resized to the target size
    with Lanczos when it differs (as A1111 does after a fixed-scale upscaler)."""
    from sd.lora import parse_prompt
    from sd.pipeline import GenerateParams
    from sd.presets import preset_for

    def up(image: Image.Image, size: tuple[int, int], seed: int) -> Image.Image:
        model = ctx.cache.get(path, ctx.device, ctx.dtype)
        inp = max((i for i in model.family.inputs if i.kind == "image"), key=lambda i: i.scale)
        pre = preset_for(model.spec, ctx.presets)
        q = GenerateParams(prompt=parse_prompt(s.get("prompt") or "")[0],
                           negative_prompt=parse_prompt(s.get("negative_prompt") or "")[0],
                           width=image.width * inp.scale, height=image.height * inp.scale, steps=pre["steps"],
                           cfg=pre["cfg"], seed=seed, sampler=pre["sampler"], schedule=pre["schedule"],
                           inputs={inp.name: image.convert("RGB")})
        out = generate(model, q).images[0]
        return out if out.size == size else out.resize(size, Image.LANCZOS)

    return up


def hires_of(s: dict, external: tuple[str, ...] = ()) -> Hires | None:
    """The request's hires fix, or None when it is off. `external`: upscaler names besides sd.hires' own."""
    if not s.get("hires"):
        return None
    num = lambda k, kind: kind(DEFAULTS[k] if s.get(k) is None else s[k])  # noqa: E731
    try:
        h = Hires(scale=num("hires_scale", float), resize_x=num("hires_resize_x", int),
                  resize_y=num("hires_resize_y", int), steps=num("hires_steps", int),
                  denoise=num("hires_denoise", float), upscaler=str(s.get("hires_upscaler") or "Latent"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"hires fix: the sizes, steps and strength must be numbers ({e})") from None
    h.check(external)
    return h


def clip_skip_of(s: dict) -> int:
    try:
        k = int(DEFAULTS["clip_skip"] if s.get("clip_skip") is None else s["clip_skip"])
    except (TypeError, ValueError):
        raise ValueError(f"clip_skip must be a whole number, got {str(s.get('clip_skip'))[:40]!r}") from None
    if not 1 <= k <= MAX_CLIP_SKIP:
        raise ValueError(f"clip skip must be between 1 and {MAX_CLIP_SKIP}, got {k}")
    return k


def sdxl_clip_l_skip_of(s: dict) -> bool:
    """A1111's "Clip skip SDXL" option (None = off); anything but a yes/no is refused in one line."""
    v = s.get("sdxl_clip_l_skip")
    if v is None:
        return False
    if v not in (True, False):    # True / False (and 1 / 0, which equal them)
        raise ValueError(f"sdxl_clip_l_skip must be true or false, got {str(v)[:40]!r}")
    return bool(v)


def check(ctx, s: dict) -> None:
    """Refuse malformed extras before anything loads."""
    hires_of(s, tuple(upscaler_models(ctx)) if s.get("hires") else ())
    clip_skip_of(s)
    sdxl_clip_l_skip_of(s)


def run(ctx, s: dict, model, p, callback=None, stop=None):
    """generate, or the hires-fix two passes; the request's clip skip applied (infotext `Clip skip` when not 1,
    as A1111 writes it on every model), the extra folders of the app's flags searched for LoRAs / embeddings."""
    ex = extras_of(ctx)
    k = clip_skip_of(s)
    p = replace(p, clip_skip=k, sdxl_clip_l_skip=sdxl_clip_l_skip_of(s),
                loras_dir=str(ex.loras_dir) if ex.loras_dir else p.loras_dir,
                embeddings_dir=str(ex.embeddings_dir) if ex.embeddings_dir else p.embeddings_dir)
    models = upscaler_models(ctx) if s.get("hires") else {}
    h = hires_of(s, tuple(models))
    external = {h.upscaler: model_upscaler(ctx, models[h.upscaler], s)} if h and h.upscaler in models else {}
    res = (generate_hires(model, p, h, callback=callback, stop=stop, external=external) if h
           else generate(model, p, callback=callback, stop=stop))
    if k != 1:
        res.info = {**res.info, "infotext": {**res.info.get("infotext", {}), "Clip skip": str(k)}}
    return res


def send_values(settings: dict, names) -> dict:
    """PNG-info settings -> values of these controls (those in `names`): clip skip 1 and hires off when the
    infotext does not say otherwise (A1111's paste does the same)."""
    up = {"clip_skip": settings.get("clip_skip", 1), "hires": bool(settings.get("hires", False)),
          "hires_resize_x": settings.get("hires_resize_x", 0), "hires_resize_y": settings.get("hires_resize_y", 0)}
    for k in ("hires_scale", "hires_steps", "hires_denoise", "hires_upscaler"):
        if k in settings:
            up[k] = settings[k]
    if settings.get("hires"):
        up.setdefault("hires_steps", 0)
    return {k: v for k, v in up.items() if k in names}


# ------------------------------------------------------------------------------------------------ extra networks


@dataclass(frozen=True)
class Network:
    kind: str               # "LoRA" or "embedding"
    name: str               # the listed name (path relative to its folder)
    insert: str             # what a click adds to the prompt
    fits: str               # the model line it fits, when its keys tell ("" otherwise)
    preview: Path | None    # NAME.png / NAME.preview.png beside it


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} from a .safetensors header (nothing else is read); {} for other files or a bad header."""
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # noqa: BLE001 - a damaged file is refused with its reason when used; the list shows it plain
        return {}


def lora_fits(shapes: dict[str, tuple[int, ...]]) -> str:
    """The model line a LoRA fits from its keys: two text towers (kohya lora_te1_/lora_te2_, diffusers
    text_encoder_2) mean SDXL; else the input width of a cross-attention key projection (to_k's down / A matrix)."""
    if any(k.startswith(("lora_te1_", "lora_te2_")) or "text_encoder_2." in k for k in shapes):
        return "SDXL"
    for k, shape in shapes.items():
        if "attn2" in k and "to_k" in k and ("lora_down" in k or "lora_A" in k) and len(shape) >= 2:
            return CONTEXT_FITS.get(shape[1], "")
    return ""


def embedding_fits(shapes: dict[str, tuple[int, ...]]) -> str:
    """SDXL embeddings carry clip_l + clip_g; A1111's emb_params width tells SD 1.x (768) from SD 2.x (1024)."""
    if "clip_g" in shapes and "clip_l" in shapes:
        return "SDXL"
    emb = shapes.get("emb_params")
    return CONTEXT_FITS.get(emb[-1], "") if emb else ""


def _preview(path: Path) -> Path | None:
    return next((q for q in (path.with_name(n.format(stem=path.stem)) for n in PREVIEW_NAMES) if q.is_file()), None)


def list_networks(models_dir, loras_dir=None, embeddings_dir=None) -> list[Network]:
    """The LoRAs and embeddings the request resolver would find (sd.models_dir.extra_files), LoRAs first."""
    out = []
    for name, path in extra_files("LoRA", models_dir, loras_dir).items():
        out.append(Network("LoRA", name, f"<lora:{path.stem}:1>", lora_fits(_shapes(path)), _preview(path)))
    for name, path in extra_files("embedding", models_dir, embeddings_dir).items():
        out.append(Network("embedding", name, path.stem, embedding_fits(_shapes(path)), _preview(path)))
    return out


def insert(prompt: str | None, text: str) -> str:
    """The prompt with `text` appended after a space (A1111's extra-networks separator); unchanged if it is there."""
    prompt = prompt or ""
    if text in prompt:
        return prompt
    return f"{prompt} {text}" if prompt.strip() else text


PLACEHOLDER = {"LoRA": (70, 90, 140), "embedding": (90, 130, 80)}


def gallery_items(nets: list[Network]) -> list[tuple[Image.Image, str]]:
    """(thumbnail, caption) per network: its preview file (at most 256 px), else a plain tile in its kind's colour."""
    items = []
    for n in nets:
        img = None
        if n.preview is not None:
            try:
                with Image.open(n.preview) as im:
                    img = im.convert("RGB")
                    img.thumbnail((256, 256))
            except OSError:
                img = None
        if img is None:
            img = Image.new("RGB", (128, 128), PLACEHOLDER[n.kind])
        items.append((img, f"{n.name} ({n.kind}{', ' + n.fits if n.fits else ''})"))
    return items


# ------------------------------------------------------------------------------------------------ the UI


def build_controls(ctx, tab: str, c: dict, fams) -> None:
    """Clip skip, styles, the Hires. fix accordion and the extra-networks picker of a txt2img tab (into `c`)."""
    if not takes_extras(fams):
        return
    with gr.Row():
        c["styles"] = gr.Dropdown(style_names(ctx), value=[], multiselect=True, label="Styles",
                                  elem_id=f"{tab}-styles", scale=3,
                                  info="A1111 styles.csv: {prompt} is replaced by the prompt, else appended")
        c["clip_skip"] = gr.Slider(1, MAX_CLIP_SKIP, value=1, step=1, label="Clip skip", elem_id=f"{tab}-clip-skip",
                                   scale=2, info="SD 1.x: CLIP layer counted from the end. SD 2.x / SDXL towers "
                                                 "use their fixed penultimate layer (as A1111: no effect there; "
                                                 "SDXL's CLIP-L follows it with Clip skip SDXL)")
        c["sdxl_clip_l_skip"] = gr.Checkbox(False, label="Clip skip SDXL", elem_id=f"{tab}-sdxl-clip-l-skip", scale=1,
                                            info="Enable Clip skip for the secondary clip model in SDXL (its "
                                                 "CLIP-L). Has no effect on SD 1.x, SD 2.x, SD3 or the refiner")
    with gr.Accordion("Hires. fix", open=False, elem_id=f"{tab}-hires-accordion"):
        with gr.Row():
            c["hires"] = gr.Checkbox(False, label="Hires. fix", elem_id=f"{tab}-hires")
            c["hires_upscaler"] = gr.Dropdown([*UPSCALERS, *upscaler_models(ctx)], value="Latent", label="Upscaler",
                                              elem_id=f"{tab}-hires-upscaler",
                                              info="Latent: in latent space; Lanczos / Nearest: the image; an "
                                                   "upscaler checkpoint (SD 2 x4) of the models folder: by it")
            c["hires_steps"] = gr.Slider(0, 150, value=0, step=1, label="Hires steps (0 = same as the first pass)",
                                         elem_id=f"{tab}-hires-steps")
            c["hires_denoise"] = gr.Slider(0.01, 1, value=0.7, step=0.01, label="Denoising strength",
                                           elem_id=f"{tab}-hires-denoise")
        with gr.Row():
            c["hires_scale"] = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id=f"{tab}-hires-scale")
            c["hires_resize_x"] = gr.Slider(0, 2048, value=0, step=8, label="Resize width to (0 = by the scale)",
                                            elem_id=f"{tab}-hires-resize-x")
            c["hires_resize_y"] = gr.Slider(0, 2048, value=0, step=8, label="Resize height to",
                                            elem_id=f"{tab}-hires-resize-y")
    _picker(ctx, tab, c)


def _picker(ctx, tab: str, c: dict) -> None:
    ex = extras_of(ctx)

    def listing():
        return list_networks(ctx.index.root, ex.loras_dir, ex.embeddings_dir)

    nets = listing()
    with gr.Accordion("Extra networks (LoRA, embeddings): click one to add it to the prompt", open=False,
                      elem_id=f"{tab}-networks-accordion"):
        c["networks"] = gr.State([n.insert for n in nets])
        c["networks_gallery"] = gr.Gallery(gallery_items(nets), label="Extra networks", columns=6, height=260,
                                           allow_preview=False, elem_id=f"{tab}-networks", show_label=False)
        c["networks_refresh"] = gr.Button("Refresh the list, styles and upscalers", size="sm", elem_id=f"{tab}-networks-refresh")

    def pick(inserts, prompt, evt: gr.SelectData):
        i = evt.index if isinstance(evt.index, int) else (evt.index or [0])[0]
        return insert(prompt, inserts[i]) if 0 <= i < len(inserts) else prompt

    def refresh():
        nets = listing()
        return ([n.insert for n in nets], gallery_items(nets), gr.Dropdown(choices=style_names(ctx)),
                gr.Dropdown(choices=[*UPSCALERS, *upscaler_models(ctx)]))

    c["networks_gallery"].select(pick, [c["networks"], c["prompt"]], c["prompt"], api_visibility="private",
                                 queue=False)
    c["networks_refresh"].click(refresh, None, [c["networks"], c["networks_gallery"], c["styles"], c["hires_upscaler"]],
                                api_visibility="private")
