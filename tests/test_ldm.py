"""The original latent diffusion models (issue 11; Rombach et al. 2022, on first stages after Esser et al. 2021):
every LDM key list detected as its family and rebuilt exactly on the meta device, the legacy AttentionBlock against a
plain re-statement of openaimodel's QKVAttentionLegacy, the UNet against diffusers' UNet2DModel, sigmas from the
file's alphas_cumprod, tiny cin256-v2 / celeba256 checkpoints generating through the CLI, CFG 1 evaluating only the
conditional branch, and one-line errors for a bad class label."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sd.families
from sd.checkpoint import CheckpointError
from sd.families import detect, get_family
from sd.families.ldm import class_index, imagenet_classes
from sd.loader import account_keys
from sd.pipeline import GenerateParams, generate, load_model
from sd.unet import AttentionBlock

from .tiny import reference_shapes, write_tiny

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

FAMILY = {"ldm_celeba256": "ldm-uncond-vq-f4", "ldm_ffhq256": "ldm-uncond-vq-f4", "ldm_lsun_beds256": "ldm-uncond-vq-f4",
          "ldm_cin256_v2": "ldm-cin256-v2", "ldm_cin256": "ldm-cin256", "ldm_bsr_sr": "ldm-bsr-sr",
          "ldm_semantic_synthesis256": "ldm-semantic", "ldm_semantic_synthesis512": "ldm-semantic",
          "ldm_txt2img_f8_large": "ldm-txt2img-f8-large", "ldm_text2img256": "ldm-text2img256",
          "ldm_layout2img_openimages256": "ldm-layout2img", "ldm_rdm_768x768": "ldm-rdm",
          "ldm_lsun_churches256": "ldm-uncond-kl-f8", "ldm_inpainting_big": "ldm-inpainting-big"}
# (heads, channels per head) of the first attention level, per the released configs (shapes cannot tell)
HEADS = {"ldm_celeba256": (14, 32), "ldm_cin256_v2": (1, 384), "ldm_cin256": (16, 32), "ldm_bsr_sr": (10, 32),
         "ldm_txt2img_f8_large": (8, 80), "ldm_text2img256": (12, 32), "ldm_lsun_churches256": (8, 48),
         "ldm_inpainting_big": (8, 64)}
RUNS = ("ldm_celeba256", "ldm_ffhq256", "ldm_lsun_beds256", "ldm_cin256_v2", "ldm_cin256", "ldm_bsr_sr",
        "ldm_txt2img_f8_large", "ldm_text2img256", "ldm_lsun_churches256", "ldm_inpainting_big")
# (use_scale_shift_norm, resblock_updown) read from shapes: only churches and inpainting_big have them
UPDOWN = {"ldm_lsun_churches256": (True, True), "ldm_inpainting_big": (False, True)}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_layout_detected_and_rebuilt_exactly(name: str) -> None:
    shapes = reference_shapes(name)
    spec = detect(shapes)
    assert spec.family == FAMILY[name]
    fam = get_family(spec.family)
    rep = account_keys(shapes, spec)
    assert not rep.missing and not rep.unexpected and not rep.shape_mismatch
    assert sum(map(len, rep.loaded.values())) + len(rep.ignored) + len(rep.unsupported) == len(shapes)
    assert set(rep.ignored.values()) <= {"LDM schedule buffer (recomputed from the betas)",
                                         "EMA copy (the LDM families load a complete one in place of model.*; else "
                                         "unused)",
                                         "LDM latent scale buffer (read by the family, sd/families/ldm.py)",
                                         "LDM text transformer's unused logits head"}
    assert ("scale_factor" in rep.ignored) == (name == "ldm_lsun_churches256")
    assert (spec.vae.factor, spec.vae.embed_dim) == (fam.latent.factor, fam.latent.channels)
    assert fam.runs == (name in RUNS)
    assert (spec.unet.use_scale_shift_norm, spec.unet.resblock_updown) == UPDOWN.get(name, (False, False))
    if name in HEADS:
        assert spec.unet.heads(spec.unet.model_channels * 2) == HEADS[name]
    if not fam.runs:
        assert spec.unsupported[-1].startswith("not run yet:")


def test_legacy_attention_block_is_qkv_attention_legacy() -> None:
    """openaimodel.AttentionBlock with QKVAttentionLegacy, re-stated with its einsums and scale 1/sqrt(sqrt(ch))."""
    g = torch.Generator().manual_seed(0)
    blk = AttentionBlock(64, 2, {})
    for p in blk.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.2
    x = torch.randn(2, 64, 5, 6, generator=g)
    with torch.no_grad():
        got = blk(x)
        b, c = 2, 64
        xf = x.reshape(b, c, -1)
        qkv = blk.qkv(torch.nn.functional.group_norm(xf, 32, blk.norm.weight, blk.norm.bias, 1e-5))
        ch = qkv.shape[1] // (3 * 2)
        q, k, v = qkv.reshape(b * 2, ch * 3, -1).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, xf.shape[-1])
        want = (xf + blk.proj_out(a)).reshape(x.shape)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def _diffusers_unet2d(spec, sd: dict):
    """diffusers' UNet2DModel of the LDM pipeline (LDMPipeline) with the same weights, keys mapped here."""
    import re

    from diffusers import UNet2DModel

    u = spec.unet
    levels = len(u.channel_mult)
    widths = tuple(u.model_channels * m for m in u.channel_mult)
    attn = [d > 0 for d in u.transformer_depth]
    heads_dim = u.num_head_channels
    updown = u.resblock_updown   # diffusers: resnet down/upsamplers (ResnetBlock2D down=True / up=True)
    plain = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if updown else ("DownBlock2D", "UpBlock2D")
    m = UNet2DModel(sample_size=16, in_channels=u.in_channels, out_channels=u.out_channels,
                    block_out_channels=widths, layers_per_block=u.num_res_blocks, attention_head_dim=heads_dim,
                    down_block_types=tuple("AttnDownBlock2D" if a else plain[0] for a in attn),
                    up_block_types=tuple("AttnUpBlock2D" if a else plain[1] for a in reversed(attn)),
                    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
                    time_embedding_type="positional", add_attention=True, downsample_padding=1,
                    resnet_time_scale_shift="scale_shift" if u.use_scale_shift_norm else "default",
                    downsample_type="resnet" if updown else "conv", upsample_type="resnet" if updown else "conv",
                    attn_norm_num_groups=32)   # the mid attention's GroupNorm (diffusers drops it for scale_shift)
    src = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    nrb = u.num_res_blocks
    out = {}

    def res(prefix_new: str, prefix_old: str):
        for a, b in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                     ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")):
            for t in ("weight", "bias"):
                if f"{prefix_old}.{a}.{t}" in src:
                    out[f"{prefix_new}.{b}.{t}"] = src[f"{prefix_old}.{a}.{t}"]

    def att(prefix_new: str, prefix_old: str, ch: int):
        heads = ch // heads_dim
        out[f"{prefix_new}.group_norm.weight"] = src[f"{prefix_old}.norm.weight"]
        out[f"{prefix_new}.group_norm.bias"] = src[f"{prefix_old}.norm.bias"]
        w = src[f"{prefix_old}.qkv.weight"][:, :, 0].reshape(heads, 3, ch // heads, ch)   # legacy head order
        bb = src[f"{prefix_old}.qkv.bias"].reshape(heads, 3, ch // heads)
        for i, n in enumerate(("to_q", "to_k", "to_v")):
            out[f"{prefix_new}.{n}.weight"] = w[:, i].reshape(ch, ch)
            out[f"{prefix_new}.{n}.bias"] = bb[:, i].reshape(ch)
        out[f"{prefix_new}.to_out.0.weight"] = src[f"{prefix_old}.proj_out.weight"][:, :, 0]
        out[f"{prefix_new}.to_out.0.bias"] = src[f"{prefix_old}.proj_out.bias"]

    out["conv_in.weight"], out["conv_in.bias"] = src["input_blocks.0.0.weight"], src["input_blocks.0.0.bias"]
    for a, b in (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                 ("out.0", "conv_norm_out"), ("out.2", "conv_out")):
        out[f"{b}.weight"], out[f"{b}.bias"] = src[f"{a}.weight"], src[f"{a}.bias"]
    i = 1
    for lv in range(levels):
        for j in range(nrb):
            res(f"down_blocks.{lv}.resnets.{j}", f"input_blocks.{i}.0")
            if attn[lv]:
                att(f"down_blocks.{lv}.attentions.{j}", f"input_blocks.{i}.1", widths[lv])
            i += 1
        if lv != levels - 1 and updown:
            res(f"down_blocks.{lv}.downsamplers.0", f"input_blocks.{i}.0")
            i += 1
        elif lv != levels - 1:
            out[f"down_blocks.{lv}.downsamplers.0.conv.weight"] = src[f"input_blocks.{i}.0.op.weight"]
            out[f"down_blocks.{lv}.downsamplers.0.conv.bias"] = src[f"input_blocks.{i}.0.op.bias"]
            i += 1
    res("mid_block.resnets.0", "middle_block.0")
    att("mid_block.attentions.0", "middle_block.1", widths[-1])
    res("mid_block.resnets.1", "middle_block.2")
    i = 0
    for k, lv in enumerate(reversed(range(levels))):
        for j in range(nrb + 1):
            res(f"up_blocks.{k}.resnets.{j}", f"output_blocks.{i}.0")
            if attn[lv]:
                att(f"up_blocks.{k}.attentions.{j}", f"output_blocks.{i}.1", widths[lv])
            if lv != 0 and j == nrb and updown:
                res(f"up_blocks.{k}.upsamplers.0", f"output_blocks.{i}.{2 if attn[lv] else 1}")
            elif lv != 0 and j == nrb:
                up = f"output_blocks.{i}.{2 if attn[lv] else 1}.conv"
                out[f"up_blocks.{k}.upsamplers.0.conv.weight"] = src[f"{up}.weight"]
                out[f"up_blocks.{k}.upsamplers.0.conv.bias"] = src[f"{up}.bias"]
            i += 1
    missing, unexpected = m.load_state_dict(out, strict=False)
    assert not missing and not unexpected, (missing[:4], unexpected[:4])
    return m.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm")
    return {n: write_tiny(n, root / f"{n}.safetensors") for n in ("ldm_celeba256", "ldm_cin256_v2", "ldm_bsr_sr")}


def test_unconditional_unet_parity_with_diffusers(files) -> None:
    from safetensors.torch import load_file

    model = load_model(files["ldm_celeba256"])
    ref = _diffusers_unet2d(model.spec, load_file(str(files["ldm_celeba256"])))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        ours = model.parts.unet(x, t)
        want = ref(x, t).sample
    assert float((ours - want).abs().max()) <= 1e-4 * float(want.abs().max())


@pytest.mark.parametrize("scale_shift,updown", [(True, True), (False, True)])
def test_scale_shift_and_resblock_updown_unet_parity_with_diffusers(scale_shift: bool, updown: bool) -> None:
    """openaimodel's use_scale_shift_norm (h = norm(h) * (1 + scale) + shift) and resblock_updown (ResBlocks that
    average-pool / nearest-upsample h and the skip input) against diffusers' UNet2DModel with
    resnet_time_scale_shift="scale_shift" and resnet down/upsamplers, on random weights; the layout is read back
    from the shapes (both flags), as for lsun_churches256 and inpainting_big."""
    from sd.config import UNetConfig
    from sd.families.shapes import detect_unet
    from sd.unet import UNetModel

    cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                     transformer_depth=(0, 1, 1), transformer_depth_middle=1, context_dim=0, num_heads=-1,
                     num_head_channels=16, legacy_attention=True, use_scale_shift_norm=scale_shift,
                     resblock_updown=updown)
    torch.manual_seed(0)
    ours = UNetModel(cfg).eval()
    with torch.no_grad():   # torch's default init leaves the emb / skip paths small: make every term count
        for name, p in ours.named_parameters():
            p.add_(0.05 * torch.randn(p.shape))
    sd = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    read = detect_unet({k: tuple(v.shape) for k, v in sd.items()})
    assert (read.use_scale_shift_norm, read.resblock_updown) == (scale_shift, updown)
    assert (read.channel_mult, read.num_res_blocks, read.transformer_depth) == ((1, 2, 2), 2, (0, 1, 1))
    ref = _diffusers_unet2d(type("S", (), {"unet": cfg})(), sd)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([3.0, 800.0])
    with torch.no_grad():
        got, want = ours(x, t), ref(x, t).sample
    assert float(want.abs().max()) > 0.1
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_sigmas_from_the_files_alphas_cumprod(files) -> None:
    from safetensors.torch import load_file

    model = load_model(files["ldm_cin256_v2"])
    abar = load_file(str(files["ldm_cin256_v2"]))["alphas_cumprod"]
    assert abar.dtype == torch.float32 and model.sigmas_source == "the file's alphas_cumprod"
    assert torch.equal(model.sigmas, ((1 - abar) / abar).sqrt())
    # the LDM linear schedule 0.0015 .. 0.0195 of the released configs
    assert float(model.sigmas[-1]) == pytest.approx(math.sqrt((1 - float(abar[-1])) / float(abar[-1])))
    assert float(model.sigmas[0]) == pytest.approx(math.sqrt(0.0015 / (1 - 0.0015)), rel=1e-4)


def _run(model, **kw):
    p = GenerateParams(prompt="", width=64, height=64, steps=3, sampler="ddim", schedule="ddim_uniform", seed=5, **kw)
    return generate(model, p)


def test_cfg_1_never_evaluates_the_unconditional_branch(files, monkeypatch) -> None:
    model = load_model(files["ldm_cin256_v2"])
    calls: list[tuple[int, tuple]] = []
    unet = model.parts.unet
    orig = unet.forward

    def spy(x, t, context=None, y=None):
        calls.append((x.shape[0], tuple(context.shape)))
        return orig(x, t, context=context, y=y)

    monkeypatch.setattr(unet, "forward", spy)
    one = _run(model, cfg=1.0, inputs={"class_label": "207"})
    assert [c[0] for c in calls] == [1, 1, 1] and calls[0][1] == (1, 1, 64)
    calls.clear()
    guided = _run(model, cfg=4.0, inputs={"class_label": "207"})
    assert [c[0] for c in calls] == [2, 2, 2]                       # [cond; null class] batched
    fam = get_family("ldm-cin256-v2")
    cond_only = replace(fam, condition=lambda parts, spec, req, g: (fam.condition(parts, spec, req, g)[0], None))
    monkeypatch.setattr(sd.families, "FAMILIES", tuple(cond_only if f.name == fam.name else f
                                                       for f in sd.families.FAMILIES))
    calls.clear()
    never = _run(model, cfg=4.0, inputs={"class_label": "207"})
    assert [c[0] for c in calls] == [1, 1, 1]
    assert torch.equal(one.latents, never.latents)
    assert float((one.latents - guided.latents).abs().max()) > 1e-3
    # the null class is the unconditional crossattn
    cond, uncond = fam.condition(model.parts, model.spec, GenerateParams(inputs={"class_label": "golden retriever"}),
                                 None)
    emb = model.parts.text_encoders[0].embedding.weight
    assert torch.equal(cond["crossattn"][0, 0], emb[207]) and torch.equal(uncond["crossattn"][0, 0], emb[1000])


def test_class_labels() -> None:
    from torchvision.models import ResNet50_Weights

    names = imagenet_classes()   # read from torchvision's file without importing it: the same list as its metadata
    assert names == tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    assert len(names) == 1000 and names[207] == "golden retriever" and names[88] == "macaw"
    assert [class_index(v) for v in (0, "999", "207: golden retriever", "Golden Retriever", 88.0)] == [0, 999, 207,
                                                                                                       207, 88]
    for bad, words in ((1000, "0..999"), (-1, "0..999"), ("3.5", "neither"), ("no such bird", "neither")):
        with pytest.raises(ValueError, match=words) as e:
            class_index(bad)
        assert "\n" not in str(e.value)


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "sd", "generate", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cin256_v2_and_celeba_generate_through_the_cli(files, tmp_path: Path, capsys) -> None:
    from sd.__main__ import main

    common = ["--width", "64", "--height", "64", "--steps", "3", "--sampler", "ddim", "--schedule", "ddim_uniform",
              "--seed", "5"]
    out = tmp_path / "cin.png"
    r = _cli(["--checkpoint", str(files["ldm_cin256_v2"]), "--prompt", "", "--class-label", "207", "--cfg", "3",
              *common, "--out", str(out)], ROOT)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["family"] == "ldm-cin256-v2" and rep["images"] == [str(out)]
    want = _run(load_model(files["ldm_cin256_v2"]), cfg=3.0, inputs={"class_label": "207"})
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want.images[0]))
    out2 = tmp_path / "celeba.png"
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(files["ldm_celeba256"]), "--prompt", "a face", *common,
                 "--out", str(out2)]) == 0   # in process: the same entry point, without another interpreter start
    got = capsys.readouterr()
    assert json.loads(got.out)["family"] == "ldm-uncond-vq-f4"
    assert "warning: a LDM unconditional 256 (CelebA-HQ / FFHQ / LSUN bedrooms) checkpoint takes no prompt" in got.err
    want = _run(load_model(files["ldm_celeba256"]), cfg=7.0)
    img = np.asarray(Image.open(out2))
    assert img.shape == (64, 64, 3) and np.array_equal(img, np.asarray(want.images[0])) and img.std() > 1
    # a class label outside 0..999: one line, exit 2, nothing written
    bad = tmp_path / "bad.png"
    assert main(["generate", "--checkpoint", str(files["ldm_cin256_v2"]), "--prompt", "", "--class-label", "1000",
                 *common, "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "0..999" in err and not bad.exists()
    # a class label to a model that takes none
    assert main(["generate", "--checkpoint", str(files["ldm_celeba256"]), "--prompt", "", "--class-label", "3",
                 *common, "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--class-label" in err and not bad.exists()


def test_bsr_sr_concats_the_low_res_image(files, monkeypatch) -> None:
    from .tiny_first_stage import sample_image

    model = load_model(files["ldm_bsr_sr"])
    lr = sample_image((16, 12), seed=4)
    seen = []
    orig = model.parts.unet.forward

    def spy(x, t, context=None, y=None):
        seen.append(x.clone())
        return orig(x, t, context=context, y=y)

    monkeypatch.setattr(model.parts.unet, "forward", spy)
    res = generate(model, GenerateParams(width=64, height=48, steps=2, sampler="ddim", schedule="ddim_uniform",
                                         inputs={"image": lr}))
    want = torch.from_numpy(np.asarray(lr, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    assert len(seen) == 2 and seen[0].shape == (1, 6, 12, 16)
    assert all(torch.equal(x[:, 3:], want) for x in seen)
    assert res.images[0].size == (64, 48)
    with pytest.raises(ValueError, match="4x") as e:   # the output must be 4x the low-res image
        generate(model, GenerateParams(width=64, height=64, steps=2, inputs={"image": lr}))
    assert "\n" not in str(e.value)


def _write(name: str, path: Path, **over) -> Path:
    """The tiny `name` checkpoint with some tensors replaced (None: left out)."""
    from safetensors.torch import save_file

    from .tiny import tiny_state_dict

    sd = {**tiny_state_dict(name), **over}
    save_file({k: v.contiguous() for k, v in sd.items() if v is not None}, str(path))
    return path


def test_scale_factor_from_the_files_buffer_else_the_config(tmp_path: Path) -> None:
    """lsun_churches256 (scale_by_std) stores its trained scale as a `scale_factor` buffer: it is the latent scale
    (decode = first stage(z / scale)); without the buffer the released config's value (1.0) applies; a damaged
    (non-positive) buffer falls back to it with a note; txt2img-f8-large has none and keeps 0.18215."""
    model = load_model(_write("ldm_lsun_churches256", tmp_path / "c.safetensors", scale_factor=torch.tensor(0.625)))
    assert model.spec.family == "ldm-uncond-kl-f8" and model.spec.latent.scale == 0.625
    assert "latent scale factor 0.625 from the file's scale_factor buffer" in model.spec.notes
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    from sd.pipeline import decode_latents

    got = np.asarray(decode_latents(model, z)[0])
    with torch.no_grad():
        x = model.parts.vae.decode(z / 0.625)
    want = torch.round(((x + 1) / 2).clamp(0, 1) * 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)
    assert load_model(_write("ldm_lsun_churches256", tmp_path / "n.safetensors",
                             scale_factor=None)).spec.latent.scale == 1.0
    bad = load_model(_write("ldm_lsun_churches256", tmp_path / "z.safetensors", scale_factor=torch.tensor(0.0)))
    assert bad.spec.latent.scale == 1.0 and any("not a positive number" in n for n in bad.spec.notes)
    assert get_family("ldm-txt2img-f8-large").latent.scale == 0.18215


def test_churches_generates_through_the_cli(tmp_path: Path, capsys) -> None:
    from sd.__main__ import main

    path = _write("ldm_lsun_churches256", tmp_path / "churches.safetensors", scale_factor=torch.tensor(0.625))
    out = tmp_path / "churches.png"
    assert main(["generate", "--checkpoint", str(path), "--prompt", "", "--width", "128", "--height", "128",
                 "--steps", "2", "--sampler", "ddim", "--schedule", "ddim_uniform", "--seed", "3", "--out",
                 str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "ldm-uncond-kl-f8"
    want = generate(load_model(path), GenerateParams(width=128, height=128, steps=2, sampler="ddim",
                                                     schedule="ddim_uniform", seed=3, cfg=7.0))
    img = np.asarray(Image.open(out))
    assert img.shape == (128, 128, 3) and np.array_equal(img, np.asarray(want.images[0])) and img.std() > 1


def _mask(size=(64, 48)) -> Image.Image:
    m = np.zeros((size[1], size[0]), np.uint8)
    m[8:30, 12:52] = 255
    m[30:34, 12:52] = 120      # below 50% grey: kept
    return Image.fromarray(m)


def test_inpainting_big_concats_the_masked_image_latent_and_the_mask(tmp_path: Path, monkeypatch, capsys) -> None:
    """scripts/inpaint.py: masked image = (1 - m) * image (in [0, 1], then * 2 - 1), through the cond stage's
    encoder + quant_conv (no codebook lookup), then the mask * 2 - 1 resized (nearest) to the latent: the UNet's
    input channels 3..5 and 6, identical at every step; the cond stage is its own copy (cond_stage_model.*)."""
    from sd.__main__ import main

    from .tiny_first_stage import sample_image

    path = _write("ldm_inpainting_big", tmp_path / "inpaint.safetensors")
    model = load_model(path)
    assert model.spec.family == "ldm-inpainting-big" and model.spec.unet.in_channels == 7
    image, mask = sample_image((64, 48), seed=1), _mask()
    seen = []
    orig = model.parts.unet.forward

    def spy(x, t, context=None, y=None):
        seen.append(x.clone())
        return orig(x, t, context=context, y=y)

    monkeypatch.setattr(model.parts.unet, "forward", spy)
    res = generate(model, GenerateParams(width=64, height=48, steps=2, sampler="ddim", schedule="ddim_uniform",
                                         seed=4, inputs={"image": image, "mask": mask}))
    m = (np.asarray(mask, np.float32) / 255 >= 0.5).astype(np.float32)                  # (H, W), 1 = repaint
    x01 = np.asarray(image, np.float32) / 255
    masked = torch.from_numpy((1 - m[..., None]) * x01 * 2 - 1).permute(2, 0, 1)[None]  # (1, 3, H, W)
    stage = model.parts.extras["cond_stage"]
    with torch.no_grad():
        want_c = stage.quant_conv(stage.encoder(masked))                               # (1, 3, 12, 16)
    want_m = torch.from_numpy(m * 2 - 1)[None, None][:, :, ::4, ::4]                   # nearest: every 4th pixel
    assert len(seen) == 2 and seen[0].shape == (1, 7, 12, 16)
    for x in seen:
        assert float((x[:, 3:6] - want_c).abs().max()) <= 1e-5 * float(want_c.abs().max())
        assert torch.equal(x[:, 6:], want_m)
    assert not torch.equal(stage.encoder.conv_in.weight, model.parts.vae.encoder.conv_in.weight)  # its own tensors
    # the CLI: --init-image IMAGE --mask MASK, pixel for pixel the engine's result
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["generate", "--checkpoint", str(path), "--prompt", "", "--init-image", str(tmp_path / "image.png"),
                 "--mask", str(tmp_path / "mask.png"), "--steps", "2", "--sampler", "ddim", "--schedule",
                 "ddim_uniform", "--seed", "4", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "ldm-inpainting-big"
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(res.images[0]))
    # an all-black mask: one line saying what to do
    Image.new("L", (64, 48), 0).save(tmp_path / "black.png")
    bad = tmp_path / "bad.png"
    assert main(["generate", "--checkpoint", str(path), "--prompt", "", "--init-image", str(tmp_path / "image.png"),
                 "--mask", str(tmp_path / "black.png"), "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "all black" in err and not bad.exists()


def _tiny_waiting(name: str, path: Path) -> Path:
    """A tiny file of a layout whose conditioning does not run yet: the released spec with tiny widths (the UNet's
    cross-attention kept at 64 wide, tests/tiny.py's writer would drop it with no tower to match), random weights,
    the schedule buffers, and the part not run yet as small placeholders under its released names."""
    from safetensors.torch import save_file

    from sd.loader import expected_tensors

    from .tiny import _random_like, schedule_buffers

    shapes = reference_shapes(name)
    spec = detect(shapes)
    unet = replace(spec.unet, model_channels=32, context_dim=64 if spec.unet.context_dim else 0)
    tiny = replace(spec, unet=unet, vae=replace(spec.vae, ch=32))
    g = torch.Generator().manual_seed(0)
    sd = {k: _random_like(k, v, g) for comp in expected_tensors(tiny).values() for k, v in comp.items()}
    sd.update({k: v for k, v in schedule_buffers(*get_family(spec.family).schedule).items() if k in shapes})
    for pfx, _ in get_family(spec.family).parts:
        sd.update({k: torch.zeros([min(n, 8) for n in v]) for k, v in shapes.items() if k.startswith(pfx)})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.parametrize("name,needs", [("ldm_semantic_synthesis256", "a segmentation map"),
                                        ("ldm_layout2img_openimages256", "a layout"),
                                        ("ldm_rdm_768x768", "a retrieval database")])
def test_models_not_run_yet_load_and_say_what_they_need(name: str, needs: str, tmp_path: Path) -> None:
    model = load_model(_tiny_waiting(name, tmp_path / f"{name}.safetensors"))
    assert model.spec.family == FAMILY[name] and not model.family.runs
    assert model.spec.unsupported[-1].startswith(f"not run yet: needs {needs}")
    with pytest.raises((ValueError, CheckpointError), match=f"not run yet: needs {needs}") as e:
        generate(model, GenerateParams(width=64, height=64, steps=1))
    assert "\n" not in str(e.value)


def test_the_unet_comes_from_the_files_ema_copy(tmp_path: Path) -> None:
    """The released LDMs are sampled inside ema_scope(): the UNet takes the complete model_ema.* copy (LitEma's names,
    the dots removed), which every released LDM list has for each UNet tensor; a file whose copy is incomplete or of
    other shapes (pruned re-saves; tests/tiny.py's placeholders) keeps model.diffusion_model.*."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from sd.loader import ema_unet_names

    for name in ("ldm_celeba256", "ldm_lsun_churches256", "ldm_inpainting_big", "ldm_text2img256", "ldm_bsr_sr"):
        shapes = reference_shapes(name)
        ema = ema_unet_names(SimpleNamespace(shapes=lambda s=shapes: s))
        assert ema is not None and len(ema) == sum(k.startswith("model.diffusion_model.") for k in shapes)
        assert ema["input_blocks.0.0.weight"] == "model_ema.diffusion_modelinput_blocks00weight"
    assert ema_unet_names(SimpleNamespace(shapes=lambda: reference_shapes("ldm_txt2img_f8_large"))) is None  # no EMA
    plain = _write("ldm_celeba256", tmp_path / "plain.safetensors")
    sd = load_file(str(plain))
    unet = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    copy = {"model_ema." + k[len("model."):].replace(".", ""): v + 0.01 for k, v in unet.items()}
    model = load_model(_write("ldm_celeba256", tmp_path / "ema.safetensors", **copy))
    got = model.parts.unet.state_dict()
    assert all(torch.equal(got[k[len("model.diffusion_model."):]], unet[k] + 0.01) for k in unet)
    assert "UNet weights: the file's EMA copy (model_ema.*), as the reference samplers use it" in model.spec.notes
    kept = load_model(plain).parts.unet.state_dict()        # placeholders (zeros(1)): model.* as stored
    assert all(torch.equal(kept[k[len("model.diffusion_model."):]], unet[k]) for k in unet)
