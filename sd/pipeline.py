"""Loaded checkpoints and `generate(model, params) -> images`: the one entry point of the CLI and every app tab.

`load_model` opens a file, detects it, builds and loads its models; `ModelCache` keeps several loaded at once
(keyed by file, device and dtype, least recently used evicted past a memory budget, safe across threads);
`generate` is family-agnostic: request -> the family's conditioner (`sd.families`: SGM dicts of crossattn, vector,
concat) -> classifier-free-guided denoiser -> sampler -> first-stage decode, with the conventions pinned in
README.md (image i of a batch has seed s + i and its own CPU generators, A1111's ImageRNG: one from s + i for the
family's input-side draw, then the starting noise; one from s + i + 1 for the sampler's per-step noise; fractional
timesteps; 8-bit rounding).
"""
from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .checkpoint import CheckpointError, file_sha256, open_checkpoint
from .config import ModelSpec
from .denoiser import make_denoiser, noised, sgm_net, start_noise
from .families import Family, check_inputs, detect, get_family
from .guidance import cfg_denoiser
from .loader import Components, load_components, probe_is_v, training_sigmas
from .samplers import img2img_start, resolve_schedule, sample, sampler_sigmas
from .schedules import get_sigmas

Tensor = torch.Tensor

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of float32, float16, bfloat16")
    return DTYPES[name]


@dataclass
class LoadedModel:
    """A checkpoint ready to sample: its spec, its models on one device/dtype, its training sigmas."""

    path: Path
    spec: ModelSpec
    parts: Components
    sigmas: Tensor          # (1000,) training sigmas, float32, CPU
    device: torch.device
    dtype: torch.dtype
    _hash: str | None = None
    sigmas_source: str = ""  # the file's betas / denoiser.sigmas, or the family's own schedule
    vae_file: Path | None = None  # an external VAE replacing the checkpoint's (sd.vae_choice); None: its own
    low_memory: bool = False      # text towers, UNet, VAE loaded per use and dropped (sd.loader._dropped); tiled decode

    @property
    def family(self) -> Family:
        return get_family(self.spec.family)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def short_hash(self) -> str:
        """First 10 hex digits of the file's sha256 (A1111's "Model hash")."""
        if self._hash is None:
            self._hash = file_sha256(self.path)[:10]
        return self._hash

    def nbytes(self) -> int:
        mods = [self.parts.unet, self.parts.vae, *self.parts.text_encoders]
        # a dropped text tower (sd.text_encoders.Resident: weights on the meta device between requests) holds none
        return sum(p.numel() * p.element_size() for m in mods if m is not None for p in m.parameters() if not p.is_meta)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32,
               prediction: str | None = None, sources=None, vae: str | os.PathLike | None = None,
               low_memory: bool = False) -> LoadedModel:
    """Open, detect and load a single-file checkpoint. Raises CheckpointError with a one-line reason. `sources`
    (sd.text_encoders.TextSources): where separate text-encoder files are (SD3.5), T5 on/off; the notes of what was
    used go to spec.notes (shown with every result). `low_memory` (--low-memory): the text towers, the UNet and the
    VAE are each read from the file for their use and dropped after (the UNet before the decode), and the decode
    runs in tiles."""
    ckpt = open_checkpoint(path)
    spec = detect(ckpt.shapes(), prediction=prediction)
    if get_family(spec.family).latent_from_file is not None:   # a latent scale stored in the file (LDM scale_factor)
        latent, note = get_family(spec.family).latent_from_file(ckpt, spec.latent)
        spec = replace(spec, latent=latent, notes=(*spec.notes, note) if note else spec.notes)
    device, dtype = torch.device(device), parse_dtype(dtype)
    parts = load_components(ckpt, spec, device=device, dtype=dtype, sources=sources, low_memory=low_memory)
    if vae is None and spec.vae is None:   # a file without a VAE (SD3.5 MMDiT-only): one from a vae/ folder
        from .vae_choice import find_vae

        vae = find_vae(path, spec.latent.channels)
        if vae is not None:
            where = vae.name if vae.parent == Path(path).parent else f"{vae.parent.name}/{vae.name}"
            spec = replace(spec, notes=(*spec.notes, f"VAE from {where} (the checkpoint has none)"))
    if vae is not None:   # an external VAE file (sd.vae_choice.resolve_vae): strict, and it must fit the latent
        from .vae_choice import load_vae_for

        vae_module, spec = load_vae_for(vae, spec, get_family(spec.family).label, device, dtype)
        parts = replace(parts, vae=vae_module)
    if parts.notes:
        spec = replace(spec, notes=(*spec.notes, *parts.notes))
    if spec.prediction_source == "probe":
        with loaded(parts.unet):
            is_v = probe_is_v(parts.unet)
        spec = replace(spec, prediction="v" if is_v else "eps",
                       prediction_source=f"A1111 probe on the UNet ({'v' if is_v else 'eps'}-like output at t=999)")
    sigmas, source = training_sigmas(ckpt, get_family(spec.family))
    if low_memory:
        ckpt.close()   # the dropped parts' loaders keep this object: not its mapping of the whole file
    return LoadedModel(Path(path), spec, parts, sigmas, device, dtype, sigmas_source=source,
                       vae_file=Path(vae) if vae is not None else None, low_memory=low_memory)


@contextmanager
def loaded(*modules):
    """`with loaded(vae, *towers):` each module with its weights for the block: a low-memory part
    (sd.text_encoders.Resident) is read from the file on entry and dropped when its last user leaves; any other
    module (None skipped) is used as it is."""
    from .text_encoders import use

    with ExitStack() as stack:
        for m in modules:
            if m is not None:
                stack.enter_context(use(m))
        yield


@dataclass
class GenerateParams:
    """Everything one generation request says. Sizes in pixels; SDXL sizes are (height, width)."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg: float = 7.0
    seed: int = 0
    sampler: str = "euler"
    schedule: str = "normal"
    batch_size: int = 1
    clip_skip: int = 1
    sdxl_clip_l_skip: bool = False                      # A1111 "Clip skip SDXL": towers marked clip_skip_opt_in
                                                        # (SDXL's CLIP-L) take hidden_states[-clip_skip]
    eta: float | None = None
    guidance_rescale: float = 0.0
    sdxl_original_size: tuple[int, int] | None = None   # default (height, width)
    sdxl_crop: tuple[int, int] = (0, 0)                 # (top, left)
    sdxl_target_size: tuple[int, int] | None = None     # default (height, width)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    init_image: Image.Image | None = None               # img2img source (resized to width x height); for a family
                                                        # declaring an "image" input (inpaint) it is that input
    strength: float = 0.75                              # img2img denoising strength
    initial_latent: Tensor | None = None                # advanced: use this noise (B, C, h, w) instead of the seed's
    inputs: dict = field(default_factory=dict)          # the family's declared extra inputs (Family.inputs), by name
    tile: int | None = None                             # latent tile side of the tiled UNet (Family.tile): None = the
                                                        # family's; 0 = tiling off (a larger latent is refused)
    # extra networks (sd.networks): `<lora:NAME:w>` tags in the prompt resolve in these folders' listings only
    models_dir: str | None = None                       # models folder: its loras/, Lora/, models/Lora, models/loras
    loras_dir: str | None = None                        # a LoRA folder given on its own (--loras-dir)
    loras: tuple = ()                                   # explicit LoRA files: path or (path, te weight, unet weight)
    embeddings_dir: str | None = None                   # textual inversion: a folder of embeddings (--embeddings-dir);
                                                        # the models folder's embeddings/ folders are searched too


@dataclass
class GenerateResult:
    images: list[Image.Image]
    latents: Tensor                 # (B, C, h, w) final latent, diffusion scale
    seed: int
    spec: ModelSpec
    stopped: bool = False
    steps_done: int = 0
    info: dict = field(default_factory=dict)


def default_size(spec: ModelSpec, is_demo: bool = False) -> int:
    """The side length a family was trained at (demo 64; SD1/SD2-eps 512; SD2-v 768; SDXL 1024)."""
    if is_demo:
        return 64
    return get_family(spec.family).size_for(spec.prediction if spec.prediction_source != "probe" else None)


def request_inputs(spec: ModelSpec, p: GenerateParams) -> dict:
    """The request's extra inputs checked against the family's declaration (`sd.families.check_inputs`); an
    init_image given to a family that declares an "image" input fills that input."""
    fam = get_family(spec.family)
    inputs = dict(p.inputs or {})
    if p.init_image is not None and any(i.name == "image" for i in fam.inputs):
        inputs.setdefault("image", p.init_image)
    return check_inputs(fam, replace(p, inputs=inputs))


def check_params(spec: ModelSpec, p: GenerateParams) -> None:
    """Refuse impossible requests with a message saying what to change."""
    f = spec.latent.factor * getattr(spec.unet, "patch_size", 1)   # MMDiT: patches of 2 latent pixels (16 px)
    if p.width % f or p.height % f or p.width < f * 2 or p.height < f * 2:
        raise ValueError(f"width and height must be multiples of {f} and at least {2 * f} pixels; got {p.width}x{p.height}")
    if p.width * p.height > 4096 * 4096:
        raise ValueError(f"{p.width}x{p.height} is too large (at most 4096x4096 pixels)")
    if not 1 <= p.steps <= 1000:
        raise ValueError(f"steps must be between 1 and 1000, got {p.steps}")
    if not 1 <= p.batch_size <= 64:
        raise ValueError(f"batch size must be between 1 and 64, got {p.batch_size}")
    if spec.vae is None:
        raise ValueError("this checkpoint has no VAE (first_stage_model.*); use a full checkpoint")
    fam = get_family(spec.family)
    if not fam.runs:
        raise ValueError(f"{spec.family}: {fam.unsupported or 'this family is not implemented yet'}")
    request_inputs(spec, p)
    if p.tile is not None and p.tile < 0:
        raise ValueError(f"tile must be 0 (off) or a positive latent side, got {p.tile}")
    side = max(p.width, p.height) // f
    if fam.tile and p.tile == 0 and side > fam.tile:
        raise ValueError(f"{p.width}x{p.height} needs a {p.width // f}x{p.height // f} latent, over the {fam.tile} px "
                         f"tile limit of {fam.label} with tiling off: turn tiling on or give a smaller image")


def encode_image(model: LoadedModel, image: Image.Image, width: int, height: int) -> Tensor:
    """PIL image -> diffusion-scale latent (1, C, h, w): resize, [-1, 1], VAE mean, (z - shift) * scale."""
    img = image.convert("RGB").resize((width, height), Image.LANCZOS)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]  # (1, 3, H, W)
    with loaded(model.parts.vae):
        z = model.parts.vae.encode(x.to(model.device, model.dtype)).float()
    return (z - model.spec.latent.shift) * model.spec.latent.scale


def _is_oom(e: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, MemoryError, or a RuntimeError saying "out of memory" (MPS, older torch)."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _decode_or_tiles(vae, z: Tensor, notes: list[str]) -> Tensor:
    """vae.decode(z); on out of memory, ComfyUI's fallback: the same decode in tiles. Raises MemoryError with a
    one-line message when the tiles do not fit either."""
    from .vae import decode_tiled

    try:
        return vae.decode(z)
    except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, everything else re-raised
        if not _is_oom(e):
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        x = decode_tiled(vae, z, tile=TILE, overlap=TILE_OVERLAP)
    except Exception as e:  # noqa: BLE001
        if not _is_oom(e):
            raise
        raise MemoryError("out of memory while decoding the image: try a smaller size or batch") from None
    notes.append(f"out of memory decoding the whole image: decoded in {TILE}x{TILE} latent tiles instead")
    return x


TILE, TILE_OVERLAP = 64, 16  # latent pixels of the out-of-memory tiled decode (512x512 image tiles, as ComfyUI)
# Bytes a whole (untiled) VAE decode adds per output pixel, per byte of the dtype (float32: 9 KiB): measured on the
# full-size kl-f8 VAE, 512x512, float32, one thread, no allocator tuning (bench/low_memory.py: the decode added
# 2311 MiB to the process, ~9.2 KB per pixel, the VAE's 320 MiB of weights and the heap's overhead included).
DECODE_BYTES_PER_PIXEL_PER_BYTE = 2304


def decode_fits_in_unet(model: LoadedModel, z: Tensor) -> bool:
    """Low memory: whether decoding `z` (B, C, h, w) whole needs no more memory than the UNet gave back before the
    decode (sd.pipeline.generate drops it first). Then the decode is exact and not slowed by tiles (SDXL 1024 in
    float32: ~9.0 GiB for the decode against the UNet's 9.6 GiB); otherwise it runs in tiles."""
    f = model.spec.latent.factor
    pixels = z.shape[0] * z.shape[2] * f * z.shape[3] * f
    need = pixels * DECODE_BYTES_PER_PIXEL_PER_BYTE * torch.empty((), dtype=model.dtype).element_size()
    unet = sum(t.numel() * t.element_size() for t in model.parts.unet.parameters())   # meta or not: its bytes
    return need <= unet


def decode_latents_info(model: LoadedModel, latents: Tensor) -> tuple[list[Image.Image], list[str]]:
    """decode_latents, also returning notes on what the decode had to do: non-finite values in a float16/bfloat16
    decode (AUTOMATIC1111's NaN check) are decoded again in float32 with a float32 copy of the VAE (the shared
    model keeps its dtype, so other requests are unaffected); out of memory falls back to a tiled decode."""
    import copy

    z = latents.float() / model.spec.latent.scale + model.spec.latent.shift
    notes: list[str] = []
    vae = model.parts.vae
    with torch.no_grad(), loaded(vae):
        if model.low_memory and not decode_fits_in_unet(model, z):   # ComfyUI's tiled decode: one tile's
            from .vae import decode_tiled                                # activations at a time (exact for one tile)

            x = decode_tiled(vae, z.to(model.device, model.dtype), tile=TILE, overlap=TILE_OVERLAP)
        else:
            x = _decode_or_tiles(vae, z.to(model.device, model.dtype), notes)
        if not torch.isfinite(x).all() and model.dtype != torch.float32:
            vae32 = copy.deepcopy(vae, {id(getattr(vae, "resident", None)): None}).float()   # the copy: no Resident
            x = _decode_or_tiles(vae32, z.to(model.device, torch.float32), notes)
            del vae32
            notes.append(f"NaN in the {str(model.dtype).removeprefix('torch.')} VAE decode: decoded again in float32")
        x = x.float().cpu()  # (B, 3, H, W)
    if not torch.isfinite(x).all():
        x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
        notes.append("the decoded image has NaN values even in float32 (shown as grey): the latents are broken")
    arr = torch.round(((x + 1) / 2).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr], list(dict.fromkeys(notes))


def decode_latents(model: LoadedModel, latents: Tensor) -> list[Image.Image]:
    """Diffusion-scale latents (B, C, h, w) -> 8-bit PIL images: round(clamp((x + 1) / 2, 0, 1) * 255)."""
    return decode_latents_info(model, latents)[0]


def initial_noise(seed: int, shape: tuple[int, ...]) -> Tensor:
    """The pinned convention: float32 CPU normal noise from a generator seeded with `seed`."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)


def seed_generator(seed: int) -> torch.Generator:
    """An image's generator: every random tensor is torch.randn(shape, generator=g, dtype=float32) from it, in order
    (1) the family's input-side draw (inpaint: the masked image's posterior sample), (2) the starting noise."""
    return torch.Generator("cpu").manual_seed(int(seed))


def image_seeds(p: GenerateParams) -> list[int]:
    """The seed of each image of a batch: s + i (A1111's `all_seeds`), so image i equals a run of seed s + i alone."""
    return [int(p.seed) + i for i in range(p.batch_size)]


def image_generators(p: GenerateParams) -> list[torch.Generator]:
    """One generator per image (A1111's ImageRNG): seed_generator(s + i)."""
    return [seed_generator(s) for s in image_seeds(p)]


def step_generators(p: GenerateParams) -> list[torch.Generator]:
    """The per-step noise source of the samplers (sd.samplers: a list of generators draws image by image): one
    CPU generator per image, seeded s + i + 1 (batch 1: the single generator seeded s + 1 of earlier versions)."""
    return [torch.Generator("cpu").manual_seed(s + 1) for s in image_seeds(p)]


def _cat_conds(parts: list[dict | None]) -> dict | None:
    """Per-image condition dicts (each tensor (1, ...)) -> one dict of (B, ...) tensors; None stays None."""
    if parts[0] is None:
        return None
    return {k: torch.cat([d[k] for d in parts]) for k in parts[0]}


def per_image_condition(fam: Family, model: "LoadedModel", req: GenerateParams,
                        gens: list[torch.Generator]) -> tuple[dict, dict | None]:
    """The family's conditioning of a batch with one generator per image: image i's input-side draw (inpaint's
    posterior sample, the x4 / unCLIP noise augmentation) comes from its own generator, as in a run of its seed
    alone. A family that draws nothing (its generator's state unchanged) is conditioned once and repeated."""
    one = replace(req, batch_size=1)
    before = gens[0].get_state()
    first = fam.condition(model.parts, model.spec, one, gens[0])
    if len(gens) == 1:
        return first
    if torch.equal(gens[0].get_state(), before):
        rest = [first] * (len(gens) - 1)
    else:
        rest = [fam.condition(model.parts, model.spec, one, g) for g in gens[1:]]
    pairs = [first, *rest]
    return _cat_conds([c for c, _ in pairs]), _cat_conds([u for _, u in pairs])


def guided_denoiser(model: LoadedModel, p: GenerateParams,
                    generator: torch.Generator | list[torch.Generator] | None = None
                    ) -> Callable[[Tensor, Tensor], Tensor]:
    """The family's conditioning of the request (cond, uncond: crossattn / vector / concat) wrapped in CFG:
    D(x, sigma). `generator`: one generator per image (image_generators; fresh ones from the seeds when None), or a
    single generator shared by the batch."""
    fam = model.family
    if fam.condition is None:
        raise ValueError(f"{fam.name}: {fam.unsupported or 'this family is not implemented yet'}")
    req = replace(p, inputs=request_inputs(model.spec, p))
    g = generator if generator is not None else image_generators(p)
    with loaded(*model.parts.text_encoders, model.parts.vae):   # low memory: read for the conditioning only
        if isinstance(g, (list, tuple)):
            cond, uncond = per_image_condition(fam, model, req, list(g))
        else:
            cond, uncond = fam.condition(model.parts, model.spec, req, g)
    net = network_net(model)
    if model.low_memory:   # the activations of one image at a time, not of the whole CFG batch
        net = one_by_one(net)
    tile = fam.tile if p.tile is None else p.tile
    f = model.spec.latent.factor
    if fam.tile and tile and max(p.width, p.height) // f > tile:
        net = tiled_net(net, tile, max(1, tile // 4))
    flow = model.spec.prediction == "flow"     # flow models take t = 1000 sigma, not a discrete timestep
    den = make_denoiser(net, model.spec.prediction, None if flow else model.sigmas)
    if fam.guidance is not None:               # the family's own (SD3.5: CFG + skip-layer guidance)
        return fam.guidance(den, cond, uncond, req, sampling_sigmas(model, req), model.spec)
    return cfg_denoiser(den, cond, uncond, p.cfg, rescale=p.guidance_rescale)


def one_by_one(net):
    """net(x, t, **cond) run image by image over the batch and concatenated: the activation peak of one image instead
    of the classifier-free-guidance pair's (AUTOMATIC1111's --medvram / --lowvram stop batching cond with uncond the
    same way). x (B, C, h, w), t (B,), every conditioning tensor (B, ...) -> (B, C, h, w)."""

    def run(x: Tensor, t: Tensor, **cond) -> Tensor:
        b = x.shape[0]
        if b == 1:
            return net(x, t, **cond)
        pick = lambda v, i: v[i:i + 1] if isinstance(v, Tensor) and v.shape[:1] == (b,) else v  # noqa: E731
        return torch.cat([net(x[i:i + 1], t[i:i + 1], **{k: pick(v, i) for k, v in cond.items()}) for i in range(b)])

    return run


def network_net(model: LoadedModel):
    """The network as net(x_in, t, crossattn, vector, ...) in the SGM conditioner's language. A low-memory model's
    UNet holds weights only inside `loaded(model.parts.unet)`: a call outside is refused in one line."""
    unet = model.parts.unet
    if model.spec.network == "mmdit":
        from .mmdit import mmdit_net

        net = mmdit_net(unet)
    else:
        net = sgm_net(unet)

    def run(*args, **kw) -> Tensor:
        if next(unet.parameters()).is_meta:   # looked up per call: loading and dropping replace the parameters
            raise RuntimeError("the UNet is not loaded: run the sampling inside `with loaded(model.parts.unet):`")
        return net(*args, **kw)

    return run


def sampling_sigmas(model: LoadedModel, p: GenerateParams) -> Tensor:
    """The (steps + 1,) sigmas the sampler walks: the family's (flow: from the request's shift) or the named
    schedule over the training sigmas ("automatic": the sampler's A1111 default; DPM2 / DPM2 a / DPM++ 3M SDE
    without the next-to-last sigma, sd.samplers.sampler_sigmas); truncated by the img2img strength when an init
    image is given (A1111's setup_img2img_steps, sd.samplers.img2img_start)."""
    fam = model.family
    schedule = resolve_schedule(p.schedule, p.sampler)
    if fam.sigmas_for is not None:
        def build(n: int) -> Tensor:
            return fam.sigmas_for(schedule, n, p.inputs or {})   # p.inputs: completed (request_inputs)
    else:
        def build(n: int) -> Tensor:
            return get_sigmas(schedule, model.sigmas, n, ays_table=fam.ays_table)
    sigmas = sampler_sigmas(build, p.steps, p.sampler)
    if p.init_image is not None and not any(i.name == "image" for i in fam.inputs):
        sigmas = img2img_start(sigmas, p.strength)
    return sigmas


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest tiles of side `tile` overlapping by at least `overlap` that cover [0, size), spread
    evenly (the first at 0, the last ending at size); [0] when one tile covers it."""
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def tile_ramp(length: int, before: int, after: int) -> Tensor:
    """Blend weights (length,) of a tile: linear ramps (k + 1) / (n + 1) over the `before` pixels it shares with the
    previous tile and the `after` pixels shared with the next, 1 elsewhere; two tiles sharing n pixels sum to 1."""
    w = torch.ones(length, dtype=torch.float32)
    if before:
        w[:before] = torch.arange(1, before + 1, dtype=torch.float32) / (before + 1)
    if after:
        w[length - after:] = torch.arange(after, 0, -1, dtype=torch.float32) / (after + 1)
    return w


def tiled_net(net, tile: int, overlap: int):
    """The network run on overlapping latent tiles of side <= `tile` with linearly blended seams (MultiDiffusion,
    Bar-Tal et al. 2023, with linear instead of uniform weights): net(x, t, crossattn, vector, concat) with x and
    concat (B, C, h, w) cropped per tile and the outputs averaged by the tiles' ramp weights. Every output pixel is a
    convex mix of the tiles covering it; where one tile covers the whole latent, the result is the untiled one."""

    def axis(size: int) -> list[tuple[int, int, Tensor]]:
        starts = tile_starts(size, tile, overlap)
        n = min(tile, size)
        out = []
        for i, s in enumerate(starts):
            before = starts[i - 1] + n - s if i else 0
            after = s + n - starts[i + 1] if i + 1 < len(starts) else 0
            out.append((s, n, tile_ramp(n, before, after)))
        return out

    def run(x: Tensor, t: Tensor, crossattn: Tensor | None = None, vector: Tensor | None = None,
            concat: Tensor | None = None) -> Tensor:
        h, w = x.shape[-2:]
        acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)        # (B, C, h, w)
        weight = torch.zeros((1, 1, h, w), dtype=torch.float32, device=x.device)
        for y0, th, wy in axis(h):
            for x0, tw, wx in axis(w):
                sl = (slice(None), slice(None), slice(y0, y0 + th), slice(x0, x0 + tw))
                out = net(x[sl], t, crossattn=crossattn, vector=vector,
                          concat=concat[sl] if concat is not None else None)   # (B, C, th, tw)
                wt = (wy[:, None] * wx[None, :]).to(x.device)                 # (th, tw)
                acc[sl] += out.float() * wt
                weight[sl] += wt
        return (acc / weight).to(x.dtype)

    return run


def _noise_of(p: GenerateParams, shape: tuple[int, ...], gens: list[torch.Generator]) -> Tensor:
    """The starting noise (B, C, h, w): image i's from its own generator (the next draw after its input side), or
    the request's initial_latent."""
    if p.initial_latent is not None:
        return p.initial_latent.float()
    if len(gens) == 1:
        return torch.randn(shape, generator=gens[0], dtype=torch.float32)
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in gens])


def family_img2img_start(model: LoadedModel, p: GenerateParams, sigmas: Tensor, shape: tuple[int, ...],
                         g: torch.Generator | list[torch.Generator]) -> tuple[Tensor, Tensor]:
    """(x, sigmas) of a family with its own img2img start (Family.img2img: depth-to-image): z0 and the strength from
    the family (its posterior sample is the first draw of each image's generator), then the noise; of the full
    `steps` schedule the last k = min(int(strength * steps), steps) steps run (diffusers' get_timesteps, the
    family's reference), x = z0 + noise * sigmas[steps - k]."""
    req = replace(p, inputs=request_inputs(model.spec, p), batch_size=1)
    gens = list(g) if isinstance(g, (list, tuple)) else [g]
    with loaded(model.parts.vae):   # low memory: the VAE read for the encode only
        starts = [model.family.img2img(model.parts, model.spec, req, gi) for gi in gens]   # [(z0 (1, C, h, w), s)]
    strength = starts[0][1]
    z0 = torch.cat([z.float() for z, _ in starts]).expand(shape)                    # (B, C, h, w)
    noise = _noise_of(p, shape, gens)
    steps = sigmas.shape[0] - 1
    k = min(int(strength * steps), steps)
    sigmas = sigmas[steps - k:]                                                     # (k + 1,)
    x = z0 + noise * sigmas[0]
    return x.to(model.device, model.dtype), sigmas


def start_latent(model: LoadedModel, p: GenerateParams,
                 generator: torch.Generator | list[torch.Generator] | None = None) -> tuple[Tensor, Tensor]:
    """(x, sigmas): the schedule (truncated for img2img) and the noisy starting latent by the pinned conventions.
    Image i's noise is the next draw from its generator (`generator`: image_generators(p), or one generator for the
    whole batch; fresh ones from the seeds when None: right for families without an input-side draw). Families with
    an "image" input (inpaint) start like text to image."""
    spec = model.spec
    sigmas = sampling_sigmas(model, replace(p, inputs=request_inputs(spec, p)))  # (steps + 1,), img2img-truncated
    shape = (p.batch_size, spec.latent.channels, p.height // spec.latent.factor, p.width // spec.latent.factor)
    g = generator if generator is not None else image_generators(p)
    if model.family.img2img is not None:   # the family's own img2img start (depth): z0 drawn before the noise
        return family_img2img_start(model, p, sigmas, shape, g)
    noise = _noise_of(p, shape, list(g) if isinstance(g, (list, tuple)) else [g])
    if p.init_image is not None and not any(i.name == "image" for i in model.family.inputs):
        x = noised(spec.prediction, encode_image(model, p.init_image, p.width, p.height).expand(shape), noise,
                   sigmas[0])
    else:
        x = start_noise(spec.prediction, noise, sigmas[0])
    return x.to(model.device, model.dtype), sigmas


def family_prepare(model: LoadedModel, p: GenerateParams) -> tuple[GenerateParams, tuple]:
    """The family's pass over the request before the run (Family.prepare; depth: MiDaS estimates the map when none is
    given): the request with the inputs it filled in, and the (caption, image) pairs to show with the result."""
    fam = model.family
    if fam.prepare is None:
        return p, ()
    inputs, shown = fam.prepare(model.parts, model.spec, replace(p, inputs=request_inputs(model.spec, p)))
    return replace(p, inputs=inputs), tuple(shown)


@torch.no_grad()
def generate(model: LoadedModel, p: GenerateParams, callback: Callable[[dict], None] | None = None,
             stop: Callable[[], bool] | threading.Event | None = None) -> GenerateResult:
    """Text (and optionally image) to images with one loaded checkpoint, any family."""
    from .networks import needs_networks, run_with_networks

    if needs_networks(p, model):   # LoRAs, embeddings, an external VAE's infotext (sd.networks), then back here
        with loaded(*model.parts.text_encoders, model.parts.unet):   # low memory: they stay for a patched run
            return run_with_networks(generate, model, p, callback=callback, stop=stop)
    if model.parts.vae is None:   # no VAE in the file and none found beside it (sd.vae_choice.find_vae)
        from .vae_choice import missing_vae

        raise ValueError(missing_vae(model.path, model.family.label, model.spec.latent.channels))
    check_params(model.spec, p)
    p, shown = family_prepare(model, p)   # the family's own inputs from its parts (depth: the MiDaS estimate)
    g = image_generators(p)                           # one per image, seed s + i (A1111's ImageRNG)
    guided = guided_denoiser(model, p, generator=g)   # draws first (the family's input side)
    x, sigmas = start_latent(model, p, generator=g)   # then the starting noise
    done = {"n": 0}

    def on_step(info: dict) -> None:
        done["n"] = info["step"] + 1
        if callback is not None:   # the first step also reports the starting latent (sd.trajectory's x_t of step 0)
            callback(info if info["step"] else {**info, "x_in": x})

    gen = step_generators(p)   # per-step noise of ancestral samplers, image by image (seed s + i + 1)
    with loaded(model.parts.unet):   # low memory: the UNet read after the text towers are gone, dropped before
        latents = sample(p.sampler, guided, x, sigmas.to(model.device), generator=gen,  # the decode
                         callback=on_step, stop=stop, eta=p.eta, flow=model.spec.prediction == "flow")
    stopped = done["n"] < len(sigmas) - 1
    images, notes = decode_latents_info(model, latents)
    fam = model.family
    said = fam.request_notes(model.parts, model.spec, replace(p, inputs=request_inputs(model.spec, p))) \
        if fam.request_notes is not None else ()
    notes = [*model.spec.notes, *said, *notes]
    return GenerateResult(images, latents.float().cpu(), p.seed, model.spec, stopped=stopped, steps_done=done["n"],
                          info={**({"notes": notes} if notes else {}), **({"shown": list(shown)} if shown else {})})


class ModelCache:
    """Loaded checkpoints shared by every tab: keyed by (file, size, mtime, device, dtype, prediction override), so
    a file replaced at the same path loads anew (its stale entry dropped); least recently used evicted once the
    total parameter bytes pass `budget_bytes`; one lock per key so two requests for the same file load it once,
    and requests for different files load in parallel."""

    def __init__(self, budget_bytes: int | None = None, sources=None, low_memory: bool = False):
        self.sources = sources   # the default TextSources of get() (the app's --t5-device / --keep-text-encoders)
        self.low_memory = low_memory   # every model loaded in low-memory mode (the app's --low-memory)
        env = os.environ.get("SD_MODEL_CACHE_GB")
        self.budget = budget_bytes if budget_bytes is not None else int(float(env or 8) * 2**30)
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}

    @staticmethod
    def _stat(path: Path) -> tuple[int, int]:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise CheckpointError(f"{path.name}: the file is gone (deleted or moved after the list was made); "
                                  "press Refresh and choose another checkpoint") from None
        return st.st_size, st.st_mtime_ns

    def get(self, path: str | os.PathLike, device="cpu", dtype: str | torch.dtype = torch.float32,
            prediction: str | None = None, sources=None, vae: str | os.PathLike | None = None) -> LoadedModel:
        path = Path(path)
        resolved = str(path.resolve())
        sources = self.sources if sources is None else sources
        same = (str(torch.device(device)), parse_dtype(dtype), prediction, sources, self.low_memory)  # sources: SD3's
        if vae is not None:   # an external VAE (sd.vae_choice): its own entry, keyed by the VAE file and its stat
            same = (*same, str(Path(vae).resolve()), *self._stat(Path(vae)))
        stat = self._stat(path)
        key = (resolved, *stat, *same)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            model = load_model(path, device=device, dtype=dtype, prediction=prediction, sources=sources, vae=vae,
                               low_memory=self.low_memory)
            changed = self._stat(path) != stat  # replaced while loading: use it once, do not cache it
            with self._lock:
                for k in [k for k in self._models if k[0] == resolved and k[3:] == same]:
                    del self._models[k]  # an older version of this file
                if not changed:
                    self._models[key] = model
                    self._evict(keep=key)
                if self._key_locks.get(key) is key_lock:
                    del self._key_locks[key]
            return model

    def _evict(self, keep: tuple) -> None:
        while len(self._models) > 1 and sum(m.nbytes() for m in self._models.values()) > self.budget:
            oldest = next(k for k in self._models if k != keep)
            del self._models[oldest]

    def loaded(self) -> list[str]:
        with self._lock:
            return [k[0] for k in self._models]

    def known_hashes(self) -> dict[str, str]:
        """{A1111 short hash: family} of the loaded models whose hash was computed (for an infotext's Model hash)."""
        with self._lock:
            return {m._hash: m.spec.family for m in self._models.values() if m._hash}

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


__all__ = ["CheckpointError", "GenerateParams", "GenerateResult", "LoadedModel", "ModelCache", "generate",
           "load_model", "decode_latents", "encode_image", "initial_noise", "guided_denoiser", "start_latent",
           "check_params", "default_size", "request_inputs", "seed_generator", "image_seeds", "image_generators",
           "step_generators"]
