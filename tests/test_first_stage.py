"""First stages (issue 11): taming's VQGAN and LDM's VQ / KL autoencoders rebuilt from the released key lists, the
quantizer against a direct argmin, parity with diffusers' VQModel / AutoencoderKL on tiny weights, the round trip
(PSNR, SSIM, code map and codebook usage), standalone files with their `loss.*` tensors, the first stage of a full
checkpoint, and the one-line errors. Esser et al. 2021 (taming transformers); Rombach et al. 2022 (LDM)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd.checkpoint import CheckpointError, ignore_reason
from sd.config import VQConfig
from sd.first_stage import detect_first_stage_file, kind_of, load_first_stage, psnr, round_trip, ssim
from sd.vq import VQModel, build_first_stage, nearest_code

from .tiny import reference_shapes, write_tiny
from .tiny_first_stage import sample_image, tiny_first_stage_config, tiny_first_stage_state_dict, write_tiny_first_stage

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

KINDS = {"vqgan_imagenet_f16_1024": "vqgan-f16-1024", "vqgan_imagenet_f16_16384": "vqgan-f16-16384",
         "ldm_kl_f4": "ldm-kl-f4", "ldm_kl_f8": "ldm-kl-f8", "ldm_kl_f16": "ldm-kl-f16", "ldm_kl_f32": "ldm-kl-f32",
         "ldm_vq_f4": "vqgan-f4-8192", "ldm_vq_f4_noattn": "vqgan-f4-8192-noattn", "ldm_vq_f8": "vqgan-f8-16384",
         "ldm_vq_f8_n256": "vqgan-f8-256", "ldm_vq_f16": "vqgan-f16-16384"}
ATTN = {"vqgan_imagenet_f16_1024": (4,), "vqgan_imagenet_f16_16384": (4,), "ldm_kl_f16": (4,), "ldm_kl_f32": (4, 5),
        "ldm_vq_f8": (3,), "ldm_vq_f8_n256": (3,), "ldm_vq_f16": (4,)}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_released_layout_rebuilt_exactly(name: str) -> None:
    shapes = reference_shapes(name)
    prefix, cfg = detect_first_stage_file(shapes)
    assert prefix == "" and kind_of(cfg) == KINDS[name]
    assert cfg.attn_levels == ATTN.get(name, ()) and cfg.mid_attn == (name != "ldm_vq_f4_noattn")
    model = build_first_stage(cfg, device="meta")
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    kept = {k: v for k, v in shapes.items() if ignore_reason(k) is None}
    assert built == kept
    ignored = {ignore_reason(k) for k in shapes if k not in built}
    assert ignored == {"autoencoder training loss (LPIPS / discriminator) of a standalone first-stage file"}
    assert sum(1 for k in shapes if k.startswith("loss.")) == len(shapes) - len(built) > 40


def test_sd_vae_config_unchanged() -> None:
    """SD's VAE reads as before: no level attention, mid attention, KL f8 with 4 channels."""
    _, cfg = detect_first_stage_file(reference_shapes("sd1"))
    assert (cfg.attn_levels, cfg.mid_attn, cfg.factor, cfg.embed_dim, type(cfg).__name__) == ((), True, 8, 4,
                                                                                               "VAEConfig")


def test_quantizer_is_the_direct_argmin_with_ties_to_the_lowest_index() -> None:
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(50, 3, generator=g)
    codebook[17] = codebook[5]            # exact duplicates: ties must go to the lower index
    codebook[40] = codebook[5]
    z = torch.cat([torch.randn(300, 3, generator=g), codebook[5:6].repeat(4, 1), codebook[[5]] + 1e-3])
    direct = torch.stack([((codebook - v) ** 2).sum(1) for v in z])          # (N, 50) squared distances
    want = [int(np.flatnonzero(row == row.min())[0]) for row in direct.numpy()]
    got = nearest_code(z, codebook)
    assert got.tolist() == want
    assert got[300:304].tolist() == [5, 5, 5, 5] and 17 not in got.tolist() and 40 not in got.tolist()
    # chunked path (a big codebook forces rows-per-chunk 1) gives the same
    import sd.vq as vq
    old, vq._CHUNK_ELEMENTS = vq._CHUNK_ELEMENTS, 1
    try:
        assert nearest_code(z, codebook).tolist() == want
    finally:
        vq._CHUNK_ELEMENTS = old


def _diffusers_keys(sd: dict, levels: int, nrb: int) -> dict:
    """LDM/taming first-stage names -> diffusers' (the conversion of diffusers' single-file loader)."""
    import re

    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", n)
        n = re.sub(r"^encoder\.down\.(\d+)\.attn\.(\d+)\.", r"encoder.down_blocks.\1.attentions.\2.", n)
        n = re.sub(r"^encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv.", n)
        m = re.match(r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.(?:(\d+)\.)?(.*)$", n)
        if m:
            i = levels - 1 - int(m.group(1))
            part = {"block": f"resnets.{m.group(3)}.", "attn": f"attentions.{m.group(3)}.",
                    "upsample": "upsamplers.0."}[m.group(2)]
            n = f"decoder.up_blocks.{i}.{part}{m.group(4)}"
        n = re.sub(r"\.mid\.block_(\d)\.", lambda mm: f".mid_block.resnets.{int(mm.group(1)) - 1}.", n)
        n = n.replace(".mid.attn_1.", ".mid_block.attentions.0.")
        n = n.replace(".nin_shortcut.", ".conv_shortcut.").replace(".norm_out.", ".conv_norm_out.")
        if ".attentions." in n:
            n = (n.replace(".norm.", ".group_norm.").replace(".q.", ".to_q.").replace(".k.", ".to_k.")
                 .replace(".v.", ".to_v.").replace(".proj_out.", ".to_out.0."))
            if v.ndim == 4:
                v = v[:, :, 0, 0]
        out[n] = v
    return out


def _diffusers_model(cfg, sd: dict):
    from diffusers import AutoencoderKL, VQModel as DVQModel

    levels = len(cfg.ch_mult)
    widths = tuple(cfg.ch * m for m in cfg.ch_mult)
    down = tuple("AttnDownEncoderBlock2D" if i in cfg.attn_levels else "DownEncoderBlock2D" for i in range(levels))
    up = tuple("AttnUpDecoderBlock2D" if i in cfg.attn_levels else "UpDecoderBlock2D" for i in reversed(range(levels)))
    kw = dict(in_channels=3, out_channels=3, down_block_types=down, up_block_types=up, block_out_channels=widths,
              layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels, norm_num_groups=32,
              mid_block_add_attention=cfg.mid_attn)
    if isinstance(cfg, VQConfig):
        m = DVQModel(num_vq_embeddings=cfg.n_embed, vq_embed_dim=cfg.embed_dim, **kw)
    else:
        m = AutoencoderKL(**kw)
    missing, unexpected = m.load_state_dict(_diffusers_keys(sd, levels, cfg.num_res_blocks), strict=False)
    assert not unexpected and not missing, (missing[:5], unexpected[:5])
    return m.eval()


@pytest.mark.parametrize("name", ["ldm_vq_f8", "ldm_vq_f4_noattn", "ldm_kl_f16", "ldm_kl_f8"])
def test_parity_with_diffusers(name: str) -> None:
    cfg = tiny_first_stage_config(name)
    sd = tiny_first_stage_state_dict(name, seed=1, loss=False)
    ours = build_first_stage(cfg, device="meta")
    ours.load_state_dict(sd, strict=True, assign=True)
    ours.eval()
    ref = _diffusers_model(cfg, sd)
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        if isinstance(cfg, VQConfig):
            h_ours, h_ref = ours.encode(x), ref.encode(x).latents
            y_ours, y_ref = ours.decode(h_ours), ref.decode(h_ref).sample
            idx_ref = ref.quantize(h_ref)[2][2].reshape(-1)
            assert torch.equal(ours.quantize(h_ours)[1].reshape(-1), idx_ref)
        else:
            h_ours, h_ref = ours.encode(x), ref.encode(x).latent_dist.mode()
            y_ours, y_ref = ours.decode(h_ours), ref.decode(h_ref).sample
    for a, b in ((h_ours, h_ref), (y_ours, y_ref)):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())


def test_round_trip_vq_standalone_file_with_loss_tensors(tmp_path: Path) -> None:
    path = write_tiny_first_stage("ldm_vq_f8", tmp_path / "vq-f8.safetensors")
    fs = load_first_stage(path)
    assert (fs.kind, fs.standalone, fs.is_vq, fs.factor) == ("vqgan-f8-64", True, True, 8)
    img = sample_image((64, 48))
    r = round_trip(fs, img)
    assert r["grid"] == (6, 8) and r["size"] == (64, 48) and not r["cropped"]
    assert r["codes"].shape == (6, 8) and r["codebook_size"] == 64
    assert r["codes_used"] == len(np.unique(r["codes"])) and 1 <= r["codes_used"] <= 48
    assert r["code_map"].size == (64, 48) and r["reconstruction"].size == (64, 48)
    # the reconstruction is the decoder of the looked-up codes, and PSNR/SSIM are of it against the input
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = fs.model.decode_indices(torch.from_numpy(r["codes"])[None])
    rec = torch.round(((y[0] + 1) / 2).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    diff = np.abs(rec.astype(int) - np.asarray(r["reconstruction"], dtype=int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99   # float rounding of the same decode (memory layout)
    rec = np.asarray(r["reconstruction"])
    arr = np.asarray(img)
    mse = np.mean((arr.astype(np.float64) - rec) ** 2)
    assert r["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / mse), abs=1e-9)
    assert r["ssim"] == pytest.approx(ssim(arr, rec), abs=1e-12) and -1 < r["ssim"] < 1


def test_round_trip_kl_and_the_first_stage_of_a_full_checkpoint(tmp_path: Path) -> None:
    path = write_tiny("sd1", tmp_path / "sd1.safetensors")
    fs = load_first_stage(path)
    assert (fs.kind, fs.prefix, fs.is_vq) == ("ldm-kl-f8", "first_stage_model.", False)
    r = round_trip(fs, sample_image((40, 35)))
    assert r["cropped"] and r["size"] == (40, 32) and r["grid"] == (4, 5)
    assert len(r["latent_channels"]) == 4 and r["latent_channels"][0].size == (40, 32)
    x = torch.from_numpy(np.asarray(sample_image((40, 35)).crop((0, 0, 40, 32)), dtype=np.float32) / 127.5 - 1)
    with torch.no_grad():
        mean = fs.model.encode(x.permute(2, 0, 1)[None])
    assert r["latent_range"] == pytest.approx((float(mean.min()), float(mean.max())), abs=1e-6)


def test_ssim_known_values() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, 30, 3)).astype(np.uint8)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12) and psnr(a, a) == math.inf
    # constant images: sigma = 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) exactly (Wang et al. 2004, eq. 13)
    c1 = (0.01 * 255) ** 2
    x, y = np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 150, np.uint8)
    assert ssim(x, y) == pytest.approx((2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1), rel=1e-12)
    assert psnr(x, y) == pytest.approx(10 * math.log10(255 ** 2 / 50 ** 2), rel=1e-12)
    # against a brute-force window-by-window computation
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    t = np.arange(11) - 5.0
    g = np.exp(-t ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    vals = []
    for c in range(3):
        for i in range(24 - 10):
            for j in range(30 - 10):
                p, q = a[i:i + 11, j:j + 11, c].astype(float), b[i:i + 11, j:j + 11, c].astype(float)
                mp, mq = (w * p).sum(), (w * q).sum()
                vp, vq_, cpq = (w * p * p).sum() - mp ** 2, (w * q * q).sum() - mq ** 2, (w * p * q).sum() - mp * mq
                c2 = (0.03 * 255) ** 2
                vals.append((2 * mp * mq + c1) * (2 * cpq + c2) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq_ + c2)))
    assert ssim(a, b) == pytest.approx(float(np.mean(vals)), abs=1e-10)
    assert 0.2 < ssim(a, b) < 0.95


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    path = write_tiny_first_stage("ldm_kl_f32", tmp_path / "kl-f32.safetensors")
    fs = load_first_stage(path)
    assert fs.factor == 32 and fs.kind == "ldm-kl-f32-8ch"
    with pytest.raises(ValueError) as e:
        round_trip(fs, sample_image((31, 64)))
    msg = str(e.value)
    assert "\n" not in msg and "31x64" in msg and "at least 32x32" in msg
    # a file that is no first stage
    write_tiny("sd1", tmp_path / "x.safetensors")
    from safetensors.torch import save_file
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "none.safetensors"))
    with pytest.raises(CheckpointError, match="no first stage") as e:
        load_first_stage(tmp_path / "none.safetensors")
    assert "\n" not in str(e.value)
    # a damaged one: a tensor missing
    sd = tiny_first_stage_state_dict("ldm_vq_f4")
    del sd["decoder.conv_out.bias"]
    save_file(sd, str(tmp_path / "damaged.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensors: decoder\.conv_out\.bias"):
        load_first_stage(tmp_path / "damaged.safetensors")


def test_cli_reconstruct(tmp_path: Path, capsys) -> None:
    from sd.__main__ import main

    path = write_tiny_first_stage("ldm_vq_f4", tmp_path / "vq-f4.ckpt")
    sample_image((32, 32)).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    cmd = [sys.executable, "-m", "sd", "reconstruct", "--checkpoint", str(path), "--image", str(tmp_path / "in.png"),
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    fs = load_first_stage(path)
    r = round_trip(fs, Image.open(tmp_path / "in.png"))
    assert rep["kind"] == "vqgan-f4-64" and rep["grid"] == [8, 8] and rep["codes_used"] == r["codes_used"]
    assert rep["codebook_size"] == 64 and rep["psnr"] == pytest.approx(r["psnr"], abs=1e-3)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(r["reconstruction"]))
    # too small for f32: one line, exit 2
    f32 = write_tiny_first_stage("ldm_kl_f32", tmp_path / "kl-f32.safetensors")
    sample_image((16, 16)).save(tmp_path / "small.png")
    capsys.readouterr()   # in process: the same entry point, without another interpreter start
    assert main(["reconstruct", "--checkpoint", str(f32), "--image", str(tmp_path / "small.png"),
                 "--out", str(tmp_path / "o2.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at least 32x32" in err
    assert not (tmp_path / "o2.png").exists()
