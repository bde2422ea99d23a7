"""Training for the built-in demo model: a KL autoencoder, then latent diffusion, saved as an SD 1.x file.

    python -m sd train vae    --out .train/vae  [--steps N --batch B --lr LR --fg-weight W --decoder-only VAE]
    python -m sd train unet   --vae .train/vae/vae.safetensors --out .train/unet [--steps N --init DIR ...]
    python -m sd train export --vae .train/vae/vae.safetensors --unet .train/unet --out sd/demo/shapes-sd1.safetensors

(sd/demo/README.md has the exact sequence that produced the shipped file, with wall-clock times.)

Stage 1 (vae): AutoencoderKL on the procedural shapes (`sd.demo.data`), L1 reconstruction on a posterior
sample + a small KL term (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
without the perceptual and adversarial terms). Stage 2 (unet): latents of a fixed set of images are cached once;
the UNet and a small CLIP-L-architecture text encoder are trained jointly with the LDM eps objective
(Ho et al. 2020, "Denoising Diffusion Probabilistic Models"; min-SNR-5 weighted) on the SD1 schedule, with 10% caption
dropout to the empty prompt for classifier-free guidance (Ho & Salimans 2022). Both stages: AdamW with linear
warmup then cosine decay, an EMA of the weights, a checkpoint every `--save-every` steps that a rerun of the
same command resumes from, and a progress line with loss and speed. State files (`state.pt`, `latents.pt`) hold
only tensors and plain values and are read back weights-only: a file that would build other objects or run code
(not written by this program) is refused with a one-line error, as is one lacking the entries of its stage.
Export writes the EMA weights under the
released SD1 names (`model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.text_model.`),
with the VAE latent rescaled so that latent * 0.18215 has unit std.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .checkpoint import CheckpointError
from .config import TextEncoderConfig, UNetConfig, VAEConfig
from .demo import data

SD1_SCALE = 0.18215
# Demo architecture (small widths, SD1 structure). Changing these changes the shipped file's shapes.
# 96 channels at every level: GroupNorm(32) then normalises groups of 3 channels. On a flat image a group of 2
# (width 64, the first demo model) keeps little more than the sign of the two channels' difference on the
# background, so absolute colors were lost before the latent and before conv_out (issue 15); a group of 1
# (width 32) is an instance norm that erases them entirely. 128 would exceed the 30 MB file budget.
DEMO_VAE = VAEConfig(ch=96, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
DEMO_TEXT = TextEncoderConfig(naming="hf", prefix="cond_stage_model.transformer.", width=128, layers=2,
                              heads=2, mlp=512, act="quick_gelu")
DEMO_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                       transformer_depth_middle=1, context_dim=128, num_heads=8)


# ----------------------------------------------------------------------------------------------------
# shared pieces: schedule, EMA, progress, checkpoints


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 10% of `base` at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, parameter by parameter (buffers copied)."""
    for e, m in zip(ema.parameters(), model.parameters()):
        e.lerp_(m.detach(), 1 - decay)
    for e, m in zip(ema.buffers(), model.buffers()):
        e.copy_(m)


def ema_decay(step: int, target: float) -> float:
    """Warmed-up EMA decay (short runs: early weights should not dominate): min(target, (1+s)/(10+s))."""
    return min(target, (1 + step) / (10 + step))


class Progress:
    """One progress line: step/total, smoothed loss, steps/s, samples/s and ETA (carriage return on a tty)."""

    def __init__(self, total: int, start: int, batch: int, every: int = 10):
        self.total, self.step0, self.batch, self.every = total, start, batch, every
        self.t0, self.loss = time.time(), None
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float) -> None:
        self.loss = loss if self.loss is None else 0.95 * self.loss + 0.05 * loss
        done = step + 1
        if done % self.every and done != self.total:
            return
        dt = max(time.time() - self.t0, 1e-9)
        rate = (done - self.step0) / dt
        eta = (self.total - done) / max(rate, 1e-9)
        bar = "#" * int(20 * done / self.total)
        msg = (f"[{bar:<20}] {done}/{self.total} loss {self.loss:.4f} {rate:.2f} it/s "
               f"{rate * self.batch:.0f} img/s elapsed {dt / 60:.1f} min eta {eta / 60:.1f} min")
        print(("\r" + msg) if self.tty else msg, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        if self.tty and done == self.total:
            print(file=sys.stderr)


def save_state(path: Path, **state) -> None:
    """Write a resumable checkpoint atomically (tmp file + rename).

    Values must be tensors, state dicts, numbers, strings and lists/tuples/dicts of them (what a model's and an
    optimizer's `state_dict()` and `torch.get_rng_state()` give): `load_state` reads the file weights-only."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# The entries each kind of state file must have, with their types (checked by load_state).
VAE_STATE = {"model": dict, "ema": dict, "opt": dict, "step": int, "rng": torch.Tensor}
UNET_STATE = {"unet": dict, "text": dict, "ema_unet": dict, "ema_text": dict, "opt": dict, "step": int,
              "rng": torch.Tensor, "scale": float}
LATENT_CACHE = {"mean": torch.Tensor, "logvar": torch.Tensor, "captions": list, "scale": float}


def load_state(path: Path, entries: dict[str, type]) -> dict | None:
    """The state file at `path` (read weights-only: tensors and plain values), or None when there is none.

    A file that needs more than that to load (a pickle that would build other objects or run code: not written by
    `save_state`), an unreadable one, or one without `entries` (name -> type) raises a one-line CheckpointError."""
    if not path.exists():
        return None
    fresh = "delete it (or give a new --out folder) to start over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(f"{path}: refused: it holds objects other than tensors and plain values "
                              f"({detail[:120]}), so this training program did not write it; {fresh}") from None
    except Exception as e:  # noqa: BLE001 - a damaged file; torch.load can raise many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"{path}: cannot read this state file ({type(e).__name__}: {first}); {fresh}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a training state; {fresh}")
    wrong = [k for k, t in entries.items()
             if not isinstance(state.get(k), t) or (t is int and isinstance(state[k], bool))]
    if wrong:
        raise CheckpointError(f"{path}: not a state file of this stage (missing or wrong: {', '.join(wrong)}); "
                              f"{fresh}")
    return state


def restore(path: Path, pairs: list[tuple[object, dict]]) -> None:
    """module.load_state_dict(state) for each pair; a state of another architecture -> one-line CheckpointError."""
    for module, state in pairs:
        try:
            module.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointError(f"{path}: does not fit the current model ({first}); it was written for another "
                                  "architecture or is damaged, delete it (or give a new --out folder) to start "
                                  "over") from None


def to_pixels(images: np.ndarray, device) -> torch.Tensor:
    """(B, 64, 64, 3) uint8 -> (B, 3, 64, 64) float in [-1, 1]."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------------
# stage 1: the autoencoder


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over elements. mean, logvar: (B, 4, h, w)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()


def vae_batch(start: int, count: int, seed: int, crop: int | None) -> torch.Tensor:
    """Training images for the autoencoder, (B, 3, S, S) in [-1, 1]; S = crop or 64.

    Crops (a 4x cheaper step on this CPU) are aligned to the 8-pixel latent grid and placed over the
    (first) shape, shifted by up to one latent cell, so most of their pixels are edges and colors.
    """
    out = []
    for i in range(start, start + count):
        s = data.make_sample(i, seed)
        img = s.image
        if crop:
            rng = np.random.default_rng([seed, i, 1])
            sh = s.shapes[int(rng.integers(len(s.shapes)))]
            limit = data.SIZE - crop
            ox = int(np.clip(round((sh.cx - crop / 2) / 8) * 8 + 8 * rng.integers(-1, 2), 0, limit))
            oy = int(np.clip(round((sh.cy - crop / 2) / 8) * 8 + 8 * rng.integers(-1, 2), 0, limit))
            img = img[oy:oy + crop, ox:ox + crop]
        out.append(img)
    return to_pixels(np.stack(out), "cpu")


def fg_weights(x: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, S, S): 1 on the background, fg_weight on pixels away from it.

    Shapes cover a few percent of an image; without this the decoder learns the background colors long
    before the shape colors. The background is the median color of each image's border."""
    if fg_weight == 1:
        return torch.ones_like(x[:, :1])
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # (B, 3, 4S)
    bg = border.median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1)
    far = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.2).float()  # (B, 1, S, S)
    return 1 + (fg_weight - 1) * far


def cell_color_loss(rec: torch.Tensor, x: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """L1 between the mean colors of each latent cell (8x8 pixel average pooling) of rec and x, both (B, 3, S, S).

    A color-aware term: a shape covers a few percent of the pixels, so the per-pixel L1 barely notices a wrong
    foreground color; the cell means of a wrong color differ on every cell the shape touches."""
    return (torch.nn.functional.avg_pool2d(rec, cell) - torch.nn.functional.avg_pool2d(x, cell)).abs().mean()


def train_vae(args) -> int:
    """Stage 1: reconstruction (L1 on a posterior sample) + kl_weight * KL; EMA weights saved.

    Most steps see 32x32 crops (aligned to the latent grid); the steps from `--full-from` on see
    whole 64x64 images, so GroupNorm statistics and the mid attention settle at the real size."""
    from .vae import AutoencoderKL

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = load_state(out / "state.pt", VAE_STATE)  # before building anything: a refused file fails at once
    device = torch.device(args.device)
    model = AutoencoderKL(DEMO_VAE, device=device).to(memory_format=torch.channels_last)  # faster CPU convs
    with torch.no_grad():  # start with a small posterior std (e^-3): a noisy latent slows early training
        model.quant_conv.bias[DEMO_VAE.embed_dim:] = -6.0
    if args.decoder_only:  # SD's "ft-MSE" recipe: the latent space (encoder) is fixed, the decoder improves
        model.load_state_dict(load_file(args.decoder_only))
        model.encoder.requires_grad_(False), model.quant_conv.requires_grad_(False)
    ema = copy.deepcopy(model).requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    start = 0
    if state is not None:
        restore(out / "state.pt", [(model, state["model"]), (ema, state["ema"]), (opt, state["opt"])])
        start = state["step"]
        torch.set_rng_state(state["rng"])
        print(f"resuming VAE training at step {start}", file=sys.stderr)
    progress = Progress(args.steps, start, args.batch)
    end = min(args.steps, args.stop_at or args.steps)
    for step in range(start, end):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        full = step >= int(args.full_from * args.steps)  # last steps: whole 64x64 images
        n = max(2, args.batch // 2) if full else args.batch  # a whole image costs 4 crops
        x = vae_batch(step * args.batch, n, args.seed, None if full else args.crop)
        x = x.to(device).contiguous(memory_format=torch.channels_last)  # (B, 3, S, S)
        with torch.set_grad_enabled(not args.decoder_only):
            mean, logvar = model.encode_moments(x)  # (B, 4, 8, 8) each
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        rec = model.decode(z)  # (B, 3, 64, 64)
        loss = (fg_weights(x, args.fg_weight) * (rec - x).abs()).mean() + args.kl_weight * kl_loss(mean, logvar)
        if args.color_weight:
            loss = loss + args.color_weight * cell_color_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        ema_update(ema, model, ema_decay(step, args.ema))
        progress.update(step, loss.item())
        if (step + 1) % args.save_every == 0 or step + 1 == end:
            save_state(out / "state.pt", model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                       step=step + 1, rng=torch.get_rng_state())
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(out / "vae.safetensors"))
    print(f"saved {out / 'vae.safetensors'}", file=sys.stderr)
    return 0



# ----------------------------------------------------------------------------------------------------
# stage 2: latent diffusion (UNet + text encoder)


def load_vae(path: str | Path, device="cpu"):
    """The stage-1 AutoencoderKL (EMA weights) in eval mode."""
    from .vae import AutoencoderKL

    vae = AutoencoderKL(DEMO_VAE, device=device)
    vae.load_state_dict(load_file(str(path)))
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def cache_latents(vae, count: int, seed: int, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Encode `count` training images once: (mean, logvar) each (N, 4, 8, 8) unscaled, and their captions."""
    means, logvars, captions = [], [], []
    progress = Progress(math.ceil(count / batch), 0, batch, every=10)
    for n, start in enumerate(range(0, count, batch)):
        images, caps = data.make_batch(start, min(batch, count - start), seed=seed)
        m, lv = vae.encode_moments(to_pixels(images, "cpu").to(next(vae.parameters()).device))
        means.append(m.float().cpu()), logvars.append(lv.float().cpu()), captions.extend(caps)
        progress.update(n, 0.0)
    return torch.cat(means), torch.cat(logvars), captions


def tokenize_all(captions: list[str], pad_token: int) -> torch.Tensor:
    """(N, 77) long tokens of each caption (the real CLIP BPE); identical captions tokenized once."""
    from .tokenizer import tokenize

    cache: dict[str, torch.Tensor] = {}
    for c in set(captions):
        cache[c] = tokenize(c, pad_token)
    return torch.stack([cache[c] for c in captions])


def train_unet(args) -> int:
    """Stage 2: eps-prediction loss on the SD1 schedule, UNet and text encoder trained jointly.

    Text encoder: the 49408-row token embedding stays at its random init (a fixed code per token; only ~40
    tokens occur, and an optimizer over the whole table would cost more than the UNet); positions, the
    transformer layers and the final LayerNorm are trained.
    """
    from .denoiser import discrete_sigmas
    from .text import build_text_encoder
    from .unet import UNetModel

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)

    cache_path = out / "latents.pt"
    cache = load_state(cache_path, LATENT_CACHE)
    if cache is None:
        print(f"encoding {args.images} training images with {args.vae}", file=sys.stderr)
        mean, logvar, captions = cache_latents(load_vae(args.vae, device), args.images, args.seed + 1)
        scale = 1.0 / float(mean.std())  # latent * scale has unit std; export folds scale / 0.18215 into quant_conv
        cache = dict(mean=mean, logvar=logvar, captions=captions, scale=scale)
        save_state(cache_path, **cache)
    mean, logvar, scale = cache["mean"], cache["logvar"], cache["scale"]
    state = load_state(out / "state.pt", UNET_STATE)
    init_path = Path(args.init) / "state.pt" if args.init and state is None else None  # warm start: another run's EMA
    init = load_state(init_path, {"ema_unet": dict, "ema_text": dict, "step": int}) if init_path else None
    if init_path and init is None:
        raise CheckpointError(f"--init {args.init}: no state.pt in that folder; give the --out folder of a unet run")
    tokens = tokenize_all(cache["captions"], DEMO_TEXT.pad_token)  # (N, 77)
    empty = tokenize_all([""], DEMO_TEXT.pad_token)  # (1, 77): the unconditional prompt
    print(f"{len(tokens)} latents, {len(set(cache['captions']))} distinct captions, latent scale {scale:.4f}",
          file=sys.stderr)

    unet = UNetModel(DEMO_UNET, device=device)
    text = build_text_encoder(DEMO_TEXT, device=device).train()
    text.text_model.embeddings.token_embedding.weight.requires_grad_(False)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text).requires_grad_(False)
    params = [p for p in list(unet.parameters()) + list(text.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    if init is not None:
        restore(init_path, [(unet, init["ema_unet"]), (ema_unet, init["ema_unet"]), (text, init["ema_text"]),
                            (ema_text, init["ema_text"])])
        print(f"initialized from {args.init} (step {init['step']})", file=sys.stderr)
    start = 0
    if state is not None:
        restore(out / "state.pt", [(unet, state["unet"]), (text, state["text"]), (ema_unet, state["ema_unet"]),
                                   (ema_text, state["ema_text"]), (opt, state["opt"])])
        start = state["step"]
        torch.set_rng_state(state["rng"])
        print(f"resuming UNet training at step {start}", file=sys.stderr)

    sigmas = discrete_sigmas().to(device)  # (1000,) SD1 training sigmas
    abar = 1 / (sigmas**2 + 1)  # (1000,) alphas_cumprod
    progress = Progress(args.steps, start, args.batch)
    n = len(tokens)
    end = min(args.steps, args.stop_at or args.steps)
    for step in range(start, end):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        idx = torch.randint(0, n, (args.batch,))
        z0 = (mean[idx] + (0.5 * logvar[idx]).exp() * torch.randn(args.batch, 4, 8, 8)) * scale  # (B, 4, 8, 8)
        tok = tokens[idx].clone()  # (B, 77)
        tok[torch.rand(args.batch) < args.cond_drop] = empty[0]  # caption dropout -> CFG
        t = torch.randint(0, 1000, (args.batch,), device=device)  # (B,)
        eps = torch.randn_like(z0)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z0.to(device) + (1 - a).sqrt() * eps.to(device)  # DDPM forward process
        context = text(tok.to(device))[0]  # (B, 77, 128)
        pred = unet(x_t, t.float(), context)  # (B, 4, 8, 8)
        # min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"):
        # eps loss times min(SNR, gamma) / SNR; the easy low-noise steps stop dominating a short run
        snr = (abar[t] / (1 - abar[t])).view(-1)  # (B,)
        weight = snr.clamp(max=args.min_snr) / snr if args.min_snr > 0 else torch.ones_like(snr)
        loss = (weight * (pred - eps.to(device)).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = ema_decay(step, args.ema)
        ema_update(ema_unet, unet, decay), ema_update(ema_text, text, decay)
        progress.update(step, loss.item())
        if (step + 1) % args.save_every == 0 or step + 1 == end:
            save_state(out / "state.pt", unet=unet.state_dict(), text=text.state_dict(),
                       ema_unet=ema_unet.state_dict(), ema_text=ema_text.state_dict(), opt=opt.state_dict(),
                       step=step + 1, rng=torch.get_rng_state(), scale=scale)
    return 0


# ----------------------------------------------------------------------------------------------------
# export: one SD1 single file


def rescale_latent(vae_state: dict[str, torch.Tensor], k: float) -> dict[str, torch.Tensor]:
    """Exact reparametrisation making the latent k times larger: quant_conv's mean rows (weight, bias) * k,
    its logvar rows' bias + 2 ln k, post_quant_conv's weight / k. decode(encode(x)) is unchanged."""
    sd = dict(vae_state)
    w, b = sd["quant_conv.weight"].clone(), sd["quant_conv.bias"].clone()  # (2e, 2z, 1, 1), (2e,)
    e = w.shape[0] // 2
    w[:e] *= k
    b[:e] *= k
    b[e:] += 2 * math.log(k)
    sd["quant_conv.weight"], sd["quant_conv.bias"] = w, b
    sd["post_quant_conv.weight"] = sd["post_quant_conv.weight"] / k  # (z, e, 1, 1)
    return sd


def export(args) -> int:
    """Write the SD1 file: EMA UNet, EMA text encoder (released CLIP names), VAE with the latent rescaled."""
    from .text import expected_keys

    state = load_state(Path(args.unet) / "state.pt",
                       {"ema_unet": dict, "ema_text": dict, "scale": float, "step": int})
    if state is None:
        raise CheckpointError(f"--unet {args.unet}: no state.pt in that folder; give the --out folder of a unet run")
    dtype = getattr(torch, args.dtype)
    k = state["scale"] / SD1_SCALE  # model latent = vae latent * scale = (vae latent * k) * 0.18215
    tensors: dict[str, torch.Tensor] = {}
    for name, v in state["ema_unet"].items():
        tensors["model.diffusion_model." + name] = v
    text_names = expected_keys(DEMO_TEXT)
    for name, v in state["ema_text"].items():
        if name in text_names:
            tensors[DEMO_TEXT.prefix + name] = v
    missing = set(text_names) - {n[len(DEMO_TEXT.prefix):] for n in tensors if n.startswith(DEMO_TEXT.prefix)}
    if missing:
        raise RuntimeError(f"text encoder state lacks {sorted(missing)}")
    for name, v in rescale_latent(load_file(args.vae), k).items():
        tensors["first_stage_model." + name] = v
    tensors = {n: v.to(dtype).contiguous() for n, v in tensors.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out, metadata={"format": "pt", "sd.demo": "shapes", "latent_rescale": f"{k:.6f}",
                                           "unet_steps": str(state["step"])})
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {len(tensors)} tensors, {size / 2**20:.1f} MiB, latent rescale k={k:.4f}",
          file=sys.stderr)
    return 0

# ----------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sd train", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)

    def common(sp, steps, batch, lr, warmup, ema, save_every):
        sp.add_argument("--out", required=True, help="folder for the checkpoint (resumed if present) and outputs")
        sp.add_argument("--steps", type=int, default=steps)
        sp.add_argument("--batch", type=int, default=batch)
        sp.add_argument("--lr", type=float, default=lr)
        sp.add_argument("--warmup", type=int, default=warmup)
        sp.add_argument("--ema", type=float, default=ema, help="EMA decay (warmed up)")
        sp.add_argument("--save-every", type=int, default=save_every)
        sp.add_argument("--stop-at", type=int, default=0, metavar="N",
                        help="end this run after step N (the lr schedule stays that of --steps); 0 = at --steps")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is far faster on a shared CPU (idle OpenMP threads spin), 0 = default")

    v = sub.add_parser("vae", help="stage 1: train the KL autoencoder")
    common(v, steps=600, batch=16, lr=2e-3, warmup=30, ema=0.98, save_every=50)
    v.add_argument("--kl-weight", type=float, default=1e-5)
    v.add_argument("--fg-weight", type=float, default=1.0, help="L1 weight of shape pixels relative to background")
    v.add_argument("--color-weight", type=float, default=0.0,
                   help="weight of the L1 on 8x8-cell mean colors (cell_color_loss)")
    v.add_argument("--decoder-only", default="", metavar="VAE",
                   help="fine-tune only the decoder of this vae.safetensors (encoder frozen: latents unchanged)")
    v.add_argument("--crop", type=int, default=32, help="crop side for most steps (multiple of 8)")
    v.add_argument("--full-from", type=float, default=0.5, help="fraction of steps after which images are whole")

    u = sub.add_parser("unet", help="stage 2: train UNet + text encoder on cached latents")
    common(u, steps=1300, batch=64, lr=1e-3, warmup=50, ema=0.995, save_every=50)
    u.add_argument("--vae", required=True, help="vae.safetensors from stage 1")
    u.add_argument("--images", type=int, default=8000, help="training images whose latents are cached")
    u.add_argument("--cond-drop", type=float, default=0.1, help="caption dropout for classifier-free guidance")
    u.add_argument("--init", default="", metavar="DIR",
                   help="start from the EMA weights of another unet run (e.g. one trained on an earlier VAE)")
    u.add_argument("--min-snr", type=float, default=5.0, help="min-SNR-gamma loss weighting (0: plain eps MSE)")

    e = sub.add_parser("export", help="write the SD1 single file from the two stages")
    e.add_argument("--vae", required=True)
    e.add_argument("--unet", required=True, help="stage 2 output folder")
    e.add_argument("--out", required=True)
    e.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    e.add_argument("--images", type=int, default=512, help="images used to measure the latent std")
    return p


def main(argv: list[str]) -> int:
    """Entry point of `python -m sd train <stage> ...`; returns the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    stage = {"vae": train_vae, "unet": train_unet, "export": export}[args.stage]
    try:
        return stage(args)
    except CheckpointError as e:  # a refused or unusable state file: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
