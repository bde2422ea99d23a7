"""The first-stage view of the "VQ-GAN / LDM" tab: round-trip one image through one or more first stages side by side.

The series begins with its autoencoders: taming-transformers' VQGAN (Esser et al. 2021, "Taming Transformers for
High-Resolution Image Synthesis") and latent diffusion's VQ / KL first stages (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models"), whose kl-f8 became the VAE of SD 1.x / 2.x and SDXL. Upload an
image, pick first stages from the models folder (standalone first-stage files and every checkpoint whose
`first_stage_model.*` loads), and see each one's reconstruction, PSNR / SSIM against the input, the latent or code
grid and its factor, and for VQ models the code-index map and how many codebook entries the image uses; for KL
models the latent channels.

    build_first_stage_view(ctx)     the components, inside the caller's gr.Tab / gr.Blocks; API endpoint /reconstruct
    first_stage_entries(ctx)        [(label, name)] of the listed files that carry a first stage
    reconstruct(ctx, image, names)  what the endpoint returns (gallery, table, maps gallery, JSON numbers)

Names resolve only through `ctx.index` (the models-folder listing), never as paths. Loaded first stages are kept in a
small cache owned by the view (keyed by file, size, mtime, device, dtype).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import gradio as gr
from PIL import Image

from sd.checkpoint import CheckpointError, open_checkpoint
from sd.first_stage import FirstStage, first_stage_prefix, load_first_stage, round_trip, summary
from sd.models_dir import NotInModelsFolder
from sd.pipeline import parse_dtype

MAX_STAGES = 6                      # first stages compared in one request
MAX_PIXELS = 1024 * 1024            # larger uploads are refused (the round trip runs at the image's own size)
CACHE_SIZE = 4                      # loaded first stages kept by the view


class _Loaded:
    """The view's cache of loaded first stages and of which listed files carry one (both keyed by file stat)."""

    def __init__(self):
        self.models: OrderedDict[tuple, FirstStage] = OrderedDict()
        self.has_stage: dict[tuple, str | None] = {}   # (path, size, mtime) -> kind-ish label or None
        self.lock = threading.Lock()

    @staticmethod
    def stat_key(path: Path) -> tuple:
        st = path.stat()
        return str(path.resolve()), st.st_size, st.st_mtime_ns

    def get(self, path: Path, device: str, dtype) -> FirstStage:
        key = (*self.stat_key(path), device, str(dtype))
        with self.lock:
            if key in self.models:
                self.models.move_to_end(key)
                return self.models[key]
        fs = load_first_stage(path, device=device, dtype=dtype)
        with self.lock:
            self.models[key] = fs
            while len(self.models) > CACHE_SIZE:
                self.models.popitem(last=False)
        return fs


def _store(ctx) -> _Loaded:
    """The view's cache, kept on the context object the app already passes around (no module-level state)."""
    store = getattr(ctx, "_first_stage_store", None)
    if store is None:
        store = _Loaded()
        try:
            ctx._first_stage_store = store
        except AttributeError:  # a frozen/slotted context: a cache per call
            pass
    return store


def first_stage_entries(ctx) -> list[tuple[str, str]]:
    """(label, value) of every listed file with a first stage: standalone VQ/KL files and checkpoints whose
    `first_stage_model.*` is present (safetensors: read from the header; a .ckpt not detected yet is offered and
    checked when picked). The value is the listing's name (path relative to the models folder)."""
    store = _store(ctx)
    out = []
    for e in ctx.index.scan():
        try:
            key = store.stat_key(e.path)
        except OSError:
            continue
        if key not in store.has_stage:
            label = None
            if e.spec is not None:
                label = e.family if e.spec.vae is not None else None
            elif e.path.suffix.lower() == ".safetensors":
                try:
                    prefix = first_stage_prefix(open_checkpoint(e.path).shapes())
                except CheckpointError:
                    prefix = None
                label = None if prefix is None else ("first stage" if prefix == "" else "checkpoint VAE")
            else:
                label = ".ckpt"
            store.has_stage[key] = label
        label = store.has_stage[key]
        if label is not None:
            out.append((f"{e.name}  [{label}]", e.name))
    return out


def _table(rows: list[dict]) -> str:
    head = ("| first stage | kind | grid (factor) | PSNR dB | SSIM | codes used / codebook |\n"
            "|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['name']}` | error: {r['error']} | | | | |")
            continue
        grid = f"{r['grid'][0]}x{r['grid'][1]} (f{r['factor']})"
        usage = f"{r['codes_used']} / {r['codebook_size']}" if r["vq"] else "KL (no codebook)"
        psnr = r["psnr"] if isinstance(r["psnr"], str) else f"{r['psnr']:.2f}"
        lines.append(f"| `{r['name']}` | {r['kind']} | {grid} | {psnr} | {r['ssim']:.4f} | {usage} |")
    return "\n".join(lines)


def reconstruct(ctx, image, names) -> tuple[list, str, list, dict]:
    """Round-trip `image` through each named first stage: (gallery [(image, caption)]: the input then each
    reconstruction; markdown table; gallery of code maps / latent channels; {name: numbers}). A bad name or a
    first stage that cannot take the image gives that row an error (one line), the others still run."""
    if image is None:
        raise gr.Error("upload an image first")
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    image = image.convert("RGB")
    if image.width * image.height > MAX_PIXELS:
        raise gr.Error(f"the image is {image.width}x{image.height}; at most {MAX_PIXELS // 1024 // 1024} megapixel: "
                       "resize it")
    names = [names] if isinstance(names, str) else list(names or [])
    if not names:
        raise gr.Error("pick at least one first stage")
    if len(names) > MAX_STAGES:
        raise gr.Error(f"at most {MAX_STAGES} first stages at once; {len(names)} were picked")
    store = _store(ctx)
    dtype = parse_dtype(ctx.dtype)
    gallery: list = [(image, f"input {image.width}x{image.height}")]
    maps: list = []
    rows, numbers = [], {}
    for name in names:
        try:
            path = ctx.index.resolve(name)
            fs = store.get(path, ctx.device, dtype)
            r = round_trip(fs, image)
        except (CheckpointError, NotInModelsFolder, ValueError, OSError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            rows.append({"name": name, "error": msg})
            numbers[name] = {"error": msg}
            continue
        s = summary(r)
        rows.append({"name": name, **s})
        numbers[name] = s
        psnr = s["psnr"] if isinstance(s["psnr"], str) else f"{s['psnr']:.2f}"
        gallery.append((r["reconstruction"], f"{name}: {s['kind']}, PSNR {psnr} dB, SSIM {s['ssim']:.3f}"))
        if r["vq"]:
            maps.append((r["code_map"], f"{name}: code map {s['grid'][0]}x{s['grid'][1]}, "
                                        f"{s['codes_used']} of {s['codebook_size']} codes"))
        else:
            for c, ch in enumerate(r["latent_channels"]):
                maps.append((ch, f"{name}: latent channel {c}"))
    return gallery, _table(rows), maps, numbers


def build_first_stage_view(ctx) -> dict:
    """The first-stage view's components (inside the caller's tab); the button is the `/reconstruct` endpoint
    (parameters: image, first_stages). Returns the components by name."""
    c: dict = {}
    gr.Markdown("### First stages: what each autoencoder keeps\nUpload an image and pick one or more first stages "
                "(standalone VQGAN / LDM autoencoder files, or the VAE of any checkpoint in the models folder). "
                "The image is used at its own size (cropped at the bottom/right to a multiple of the factor).")
    with gr.Row():
        with gr.Column(scale=2):
            c["image"] = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], format="png",
                                  elem_id="fs-image")
        with gr.Column(scale=3):
            with gr.Row():
                c["first_stages"] = gr.Dropdown(first_stage_entries(ctx), multiselect=True, label="First stages",
                                                max_choices=MAX_STAGES, allow_custom_value=True, elem_id="fs-stages",
                                                scale=5)
                c["refresh"] = gr.Button("Refresh", scale=0, min_width=80, elem_id="fs-refresh")
            c["run"] = gr.Button("Round trip", variant="primary", elem_id="fs-run")
            c["table"] = gr.Markdown("", elem_id="fs-table")
    c["gallery"] = gr.Gallery(label="Input and reconstructions", columns=4, format="png", elem_id="fs-gallery")
    c["maps"] = gr.Gallery(label="Code maps (VQ) and latent channels (KL)", columns=6, format="png",
                           elem_id="fs-maps")
    c["numbers"] = gr.JSON(label="Numbers", elem_id="fs-numbers")

    def run(image, first_stages):
        return reconstruct(ctx, image, first_stages)

    c["run"].click(run, [c["image"], c["first_stages"]], [c["gallery"], c["table"], c["maps"], c["numbers"]],
                   api_name="reconstruct", concurrency_limit=getattr(ctx, "concurrency", 1))
    c["refresh"].click(lambda: gr.Dropdown(choices=first_stage_entries(ctx)), None, c["first_stages"],
                       api_visibility="private")
    return c
