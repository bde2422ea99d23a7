"""Build the models of a ModelSpec and load a checkpoint's tensors into them, with strict key accounting.

Every tensor in the file ends up in exactly one bucket: loaded into a model, ignored under a named rule
(`sd.checkpoint.IGNORE_RULES`), or belonging to a part the engine does not run yet (`ModelSpec.unsupported`).
Anything else, and anything a model expects but the file lacks, is a `CheckpointError` naming the keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint, CheckpointError, ignore_reason, open_checkpoint
from .config import ModelSpec
from .denoiser import discrete_sigmas, sigmas_from_betas
from .families import Family, get_family, unsupported_parts
from .families.shapes import UNET, VAE
from .mmdit import MMDiT
from .text import build_text_encoder, expected_keys as text_expected_keys, load_text_encoder_weights
from .text_encoders import Resident
from .unet import UNetModel
from .vae import AutoencoderKL
from .vq import build_first_stage


def _skip_init_on_meta() -> None:
    """Modules built on the meta device (every model here, before its tensors are assigned from the file) skip
    torch's random initialisation: its values would be thrown away, and for the full-size SD 1.5 UNet it is ~70% of
    the build (0.106 -> 0.029 s measured, VAE 0.031 -> 0.007 s, CLIP-L 0.040 -> 0.010 s; bench/full_size.py times
    the whole load). A module whose weight is on a real device initialises exactly as torch does. Installed once."""
    for cls in (nn.Linear, nn.modules.conv._ConvNd, nn.GroupNorm, nn.LayerNorm, nn.Embedding):
        orig = cls.reset_parameters
        if getattr(orig, "skips_meta", False):
            continue

        def reset_parameters(self, _orig=orig):
            weight = getattr(self, "weight", None)
            if weight is not None and weight.is_meta:
                return
            _orig(self)

        reset_parameters.skips_meta = True
        cls.reset_parameters = reset_parameters


_skip_init_on_meta()


@dataclass
class KeyReport:
    """Where each tensor of a file goes."""

    loaded: dict[str, list[str]] = field(default_factory=dict)      # component -> keys
    ignored: dict[str, str] = field(default_factory=dict)           # key -> rule
    unsupported: list[str] = field(default_factory=list)            # keys of parts not run yet
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)


def build_network(spec: ModelSpec, device=None, dtype=None) -> nn.Module:
    """The denoising network of `spec.network`: the LDM UNet, or SD3's MMDiT (Esser et al. 2024)."""
    if spec.network == "mmdit":
        return MMDiT(spec.unet, device=device, dtype=dtype)
    return UNetModel(spec.unet, device=device, dtype=dtype)


def expected_tensors(spec: ModelSpec, shapes: dict[str, tuple[int, ...]] | None = None, built: dict | None = None
                     ) -> dict[str, dict[str, tuple[int, ...]]]:
    """component -> {full checkpoint key: shape}, computed on the meta device (no memory). `shapes`: the file's,
    for the text tensors a family reads from them (a bundled T5: Family.text_tensors). `built`: meta-built
    networks to read ("unet", "vae"; load_components builds each once and then loads into it)."""
    built = built or {}
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    unet = built["unet"] if "unet" in built else build_network(spec, device="meta")
    out[spec.network] = {UNET + k: tuple(v.shape) for k, v in unet.state_dict().items()}
    if spec.vae is not None:
        vae = built["vae"] if "vae" in built else build_first_stage(spec.vae, device="meta")   # KL, or VQModel
        out["vae"] = {VAE + k: tuple(v.shape) for k, v in vae.state_dict().items()}
    for i, cfg in enumerate(spec.text_encoders):
        out[f"text{i}"] = {cfg.prefix + k: tuple(s) for k, s in text_expected_keys(cfg).items()}
    fam = _family_of(spec)
    if fam is not None and fam.extra_tensors is not None:
        out.update(fam.extra_tensors(spec))   # the family's own networks (MiDaS, the unCLIP image tower)
    if fam is not None and fam.text_tensors is not None and shapes is not None:
        out.update(fam.text_tensors(shapes))   # SD3: a bundled T5-XXL
    return out


def _family_of(spec: ModelSpec) -> Family | None:
    try:
        return get_family(spec.family)
    except KeyError:
        return None


def _abbreviate(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def _with_hf_text_level(shapes: dict[str, tuple[int, ...]], spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Older SD1 files name CLIP-L keys without the `text_model.` level; account for them under the released name."""
    out = dict(shapes)
    for cfg in spec.text_encoders:
        if cfg.naming != "hf" or cfg.prefix + "text_model.embeddings.token_embedding.weight" in shapes:
            continue
        for k in list(out):
            if k.startswith(cfg.prefix) and not k.startswith(cfg.prefix + "text_projection"):
                out[cfg.prefix + "text_model." + k[len(cfg.prefix):]] = out.pop(k)
    return out


def account_keys(shapes: dict[str, tuple[int, ...]], spec: ModelSpec, built: dict | None = None) -> KeyReport:
    """Sort every key of the file (see module docstring); fills missing/unexpected instead of raising. `built`: as
    for expected_tensors."""
    rep = KeyReport()
    shapes = _with_hf_text_level(shapes, spec)
    expected = expected_tensors(spec, shapes, built)
    owner = {k: comp for comp, keys in expected.items() for k in keys}
    for comp, keys in expected.items():
        rep.loaded[comp] = []
        for k, shape in keys.items():
            if k not in shapes:
                rep.missing.append(k)
            elif tuple(shapes[k]) != tuple(shape):
                rep.shape_mismatch.append(f"{k} {list(shapes[k])} != {list(shape)}")
            else:
                rep.loaded[comp].append(k)
    unsupported_prefixes = tuple(unsupported_parts())
    for k in shapes:
        if k in owner:
            continue
        why = ignore_reason(k)
        if why:
            rep.ignored[k] = why
        elif k.startswith(unsupported_prefixes):
            rep.unsupported.append(k)
        else:
            rep.unexpected.append(k)
    return rep


def check_report(rep: KeyReport, name: str) -> None:
    """Raise one CheckpointError naming what is missing, unexpected or of the wrong shape."""
    problems = []
    if rep.missing:
        problems.append(f"missing {len(rep.missing)} tensors: {_abbreviate(sorted(rep.missing))}")
    if rep.shape_mismatch:
        problems.append(f"wrong shapes: {_abbreviate(rep.shape_mismatch)}")
    if rep.unexpected:
        problems.append(f"unexpected {len(rep.unexpected)} tensors: {_abbreviate(sorted(rep.unexpected))}")
    if problems:
        raise CheckpointError(f"{name}: " + "; ".join(problems) + " (the file is damaged or mixes different models)")


@dataclass
class Components:
    unet: UNetModel
    vae: AutoencoderKL | None
    text_encoders: list[nn.Module]
    extras: dict[str, Any] = field(default_factory=dict)   # the family's own parts (Family.extras), by name
    notes: tuple[str, ...] = ()        # what loading decided, in plain words (SD3: which text-encoder files)


def _load(module: nn.Module, tensors: dict[str, torch.Tensor], what: str, device, dtype) -> nn.Module:
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{what}: {str(e).splitlines()[0][:300]}") from None
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def ema_unet_names(ckpt: Checkpoint) -> dict[str, str] | None:
    """UNet name -> the key of its copy in the file's EMA (LDM's LitEma naming: `model_ema.` + "diffusion_model." +
    the name with the dots removed, input_blocks.0.0.weight -> model_ema.diffusion_modelinput_blocks00weight), when
    that copy is complete with the same shapes; else None (pruned files, placeholders)."""
    shapes = ckpt.shapes()
    ema = {k[len(UNET):]: "model_ema." + ("diffusion_model." + k[len(UNET):]).replace(".", "")
           for k in shapes if k.startswith(UNET)}
    if not ema or any(tuple(shapes.get(e, ())) != tuple(shapes[UNET + k]) for k, e in ema.items()):
        return None
    return ema


def load_unet(ckpt: Checkpoint, spec: ModelSpec, device="cpu", dtype=torch.float32, net: nn.Module | None = None
              ) -> UNetModel:
    """Only the denoising network of a file (UNet or MMDiT; what `inspect` needs for the prediction probe). A family
    with `unet_ema` (the LDMs, sampled inside ema_scope()) takes the file's complete EMA copy where it has one.
    `net`: the network already built on the meta device, loaded into."""
    fam = _family_of(spec)
    ema = ema_unet_names(ckpt) if fam is not None and fam.unet_ema else None
    tensors = {k: ckpt.get_as(e, dtype) for k, e in ema.items()} if ema else ckpt.tensors(UNET, dtype)
    return _load(build_network(spec, device="meta") if net is None else net, tensors, "UNet" if spec.network == "unet" else
                 spec.network.upper(), device, dtype)


def _fresh(ckpt: Checkpoint) -> Checkpoint:
    """A new handle on a .safetensors file: its own mmap, unmapped once the last tensor read through it is freed (so a
    dropped part gives its pages back); a .ckpt's tensors are in memory already: the same object."""
    return open_checkpoint(ckpt.path) if ckpt._tensors is None else ckpt


def _text_tower(ckpt: Checkpoint, cfg, device, dtype, meta: bool = False) -> nn.Module:
    """One text tower with the file's tensors. Built in `dtype` on the meta device, so the file's float16 tensors
    become float16 weights as they are (the mmap'd tensors themselves) or bfloat16 ones in one cast, with no float32
    copy in between. `meta`: the shapes only, nothing read (a low-memory tower before its first use)."""
    enc = build_text_encoder(cfg, device="meta", dtype=dtype)
    if not meta:
        load_text_encoder_weights(enc, ckpt.tensors(cfg.prefix, dtype), cfg)
    return enc.to(device="meta" if meta else device, dtype=dtype).eval().requires_grad_(False)


def _first_stage(ckpt: Checkpoint, spec: ModelSpec, device, dtype, meta: bool = False,
                 module: nn.Module | None = None) -> nn.Module:
    """The VAE / VQ first stage with the file's tensors (`meta`: shapes only; `module`: already built on meta)."""
    module = build_first_stage(spec.vae, device="meta") if module is None else module
    if meta:
        return module.to(dtype=dtype).eval().requires_grad_(False)
    tensors = {k[len(VAE):]: ckpt.get_as(k, dtype) for k in ckpt.infos   # not the training loss's LPIPS / discriminator
               if k.startswith(VAE) and not k.startswith(VAE + "loss.")}
    return _load(module, tensors, "VAE", device, dtype)


def _dropped(build) -> nn.Module:
    """A low-memory part: checked on the meta device now, loaded from a fresh handle on the file for each use and
    dropped after (`sd.text_encoders.Resident`, the mechanism SD3's text towers use)."""
    module = build(meta=True)
    module.resident = Resident(module, lambda: build(meta=False), keep=False)
    return module


def load_components(ckpt: Checkpoint, spec: ModelSpec, device="cpu", dtype=torch.float32,
                    sources=None, low_memory: bool = False) -> Components:
    """Build every model of `spec` on the meta device and load the file's tensors into it (strict). A family with
    its own `text_parts` (SD3) loads its text towers itself, from the file or separate files (`sources`: an
    sd.text_encoders.TextSources, the CLI's --text-encoders / --t5-tokenizer / --no-t5). `low_memory`: the text
    towers, the first stage and the UNet hold no weights between uses (`_dropped`): the UNet is read for the
    sampling (sd.pipeline.generate) and dropped before the decode, so the two never share the peak."""
    built = {"unet": build_network(spec, device="meta")}   # each network built once: accounted, then loaded
    if spec.vae is not None and not low_memory:
        built["vae"] = build_first_stage(spec.vae, device="meta")
    rep = account_keys(ckpt.shapes(), spec, built)
    check_report(rep, ckpt.path.name)
    if low_memory:
        unet = _dropped(lambda meta: built["unet"].to(dtype=dtype).eval().requires_grad_(False) if meta
                        else load_unet(_fresh(ckpt), spec, device, dtype))
    else:
        unet = load_unet(ckpt, spec, device, dtype, net=built["unet"])
    vae = None
    if spec.vae is not None:
        if low_memory:
            vae = _dropped(lambda meta: _first_stage(_fresh(ckpt), spec, device, dtype, meta))
        else:
            vae = _first_stage(ckpt, spec, device, dtype, module=built["vae"])
    texts, notes = [], ()
    fam = _family_of(spec)
    if fam is not None and fam.unet_ema and ema_unet_names(ckpt):   # said with every result
        notes = ("UNet weights: the file's EMA copy (model_ema.*), as the reference samplers use it",)
    if fam is not None and fam.text_parts is not None:
        got = fam.text_parts(ckpt, spec, sources, device, dtype)
        texts, notes = list(got.modules), (*notes, *got.notes)
    else:
        for cfg in spec.text_encoders:
            if low_memory:
                texts.append(_dropped(lambda meta, cfg=cfg: _text_tower(_fresh(ckpt), cfg, device, dtype, meta)))
            else:
                texts.append(_text_tower(ckpt, cfg, device, dtype))
    extras = fam.extras(ckpt, spec, device, dtype) if fam is not None and fam.extras is not None else {}
    return Components(unet, vae, texts, extras, notes)


def training_sigmas(ckpt: Checkpoint, family: Family) -> tuple[torch.Tensor, str]:
    """(sigmas (T,) float32 increasing, where they came from): the file's own `betas` (LDM) or `denoiser.sigmas`
    (SGM) buffer when it carries a valid one, else the family's schedule."""
    shapes = ckpt.shapes()
    if family.sigmas_buffer == "alphas_cumprod" and len(shapes.get("alphas_cumprod", ())) == 1:
        abar = ckpt.get("alphas_cumprod").float()   # (T,) as stored (float32); LDM / k-diffusion CompVisDenoiser
        if bool(((abar > 0) & (abar < 1)).all()):
            return ((1 - abar) / abar).sqrt().contiguous(), "the file's alphas_cumprod"
    if "betas" in shapes and len(shapes["betas"]) == 1:
        betas = ckpt.get("betas").double()
        if bool(((betas > 0) & (betas < 1)).all()):
            return sigmas_from_betas(betas), "the file's betas"
    if "denoiser.sigmas" in shapes and len(shapes["denoiser.sigmas"]) == 1:
        sig = ckpt.get("denoiser.sigmas").float()
        if bool((sig > 0).all()) and bool((sig[1:] > sig[:-1]).all()):
            return sig.contiguous(), "the file's denoiser.sigmas"
    start, end, steps = family.schedule
    return discrete_sigmas(start, end, steps), f"the {family.name} schedule (linear betas {start:g} .. {end:g})"


@torch.no_grad()
def probe_is_v(unet: UNetModel) -> bool:
    """AUTOMATIC1111's v-prediction test for SD2 layouts: on a constant input at t=999, a v model's output sits
    far below the input (eps models return roughly the noise, near the input)."""
    p = next(unet.parameters())
    x = torch.full((1, unet.cfg.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    ctx = torch.full((1, 2, unet.cfg.context_dim), 0.5, device=p.device, dtype=p.dtype)
    t = torch.tensor([999.0], device=p.device)
    out = unet(x, t, context=ctx)
    return (out.float() - x.float()).mean().item() < -1
