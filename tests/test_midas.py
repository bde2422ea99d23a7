"""sd.midas, the MiDaS DPT-Hybrid depth estimator of the SD 2 depth file (`depth_model.*`), on tiny weights.

- Layout: the numbers read from the released key list (tests/data/checkpoint-keys/sd2_depth.json) are MiDaS
  dpt_hybrid's, and the module built from them has exactly the released 368 names and shapes; the tiny sd2-depth
  file loads with nothing unsupported, unexpected or missing.
- Parity: transformers' `DPTForDepthEstimation` (is_hybrid=True over its BiT backbone, the hybrid config's
  numbers) loaded from the same tensors (the key map below is the test's) gives the same depth within 1e-4 of its
  largest magnitude in float32, at the trained grid and at a larger input (position embedding resized bilinearly).
- Preprocessing: the net size follows MiDaS's "minimal" keep-aspect rule with multiples of 32, checked against
  transformers' DPTImageProcessor (keep_aspect_ratio=True, ensure_multiple_of=32) for several image sizes.
"""
from __future__ import annotations

import json

import pytest
import torch

from sd.midas import PREFIX, MidasConfig, build_midas, estimate_depth, midas_config, midas_input, net_size

from .tiny import REFERENCE_DIR, tiny_spec, tiny_state_dict


def released_shapes() -> dict[str, tuple[int, ...]]:
    ref = json.loads((REFERENCE_DIR / "sd2_depth.json").read_text())
    return {k: tuple(v) for k, v in ref["tensors"].items()}


def test_released_numbers_and_exact_key_set() -> None:
    shapes = released_shapes()
    cfg = midas_config(shapes)
    assert cfg == MidasConfig()   # the defaults are dpt_hybrid-midas-501f0c75's numbers
    assert (cfg.stages, cfg.width, cfg.depth, cfg.heads, cfg.patch, cfg.size) == (
        ((3, 64, 256), (4, 128, 512), (9, 256, 1024)), 768, 12, 12, 16, 384)
    ours = {PREFIX + k: tuple(v.shape) for k, v in build_midas(cfg, device="meta").state_dict().items()}
    released = {k: s for k, s in shapes.items() if k.startswith(PREFIX)}
    assert len(released) == 368 and ours == released
    assert midas_config({k: s for k, s in shapes.items() if not k.startswith(PREFIX)}) is None


def test_tiny_depth_file_loads_the_estimator(tiny_files) -> None:
    from sd.checkpoint import open_checkpoint
    from sd.loader import account_keys
    from sd.pipeline import load_model

    path = tiny_files("sd2_depth")
    model = load_model(path)
    rep = account_keys(open_checkpoint(path).shapes(), model.spec)
    assert rep.unsupported == [] and rep.unexpected == [] and rep.missing == [] and rep.shape_mismatch == []
    assert len(rep.loaded["depth_model"]) == 368
    assert dict(model.spec.extra)["midas"].size == 64                 # tiny: a 4 x 4 position grid
    assert isinstance(model.parts.extras["midas"], torch.nn.Module)


# ------------------------------------------------------------------------------------------- transformers reference

def hf_key(k: str) -> list[str] | None:
    """Our key below depth_model. -> transformers' DPTForDepthEstimation name(s) (qkv splits in three); None: a
    tensor transformers has no place for (the timm ViT's unused ImageNet head)."""
    vit, bb = "model.pretrained.model.", "model.pretrained.model.patch_embed.backbone."
    if k.startswith(bb + "stem.conv."):
        return ["dpt.embeddings.backbone.bit.embedder.convolution." + k.rsplit(".", 1)[1]]
    if k.startswith(bb + "stem.norm."):
        return ["dpt.embeddings.backbone.bit.embedder.norm." + k.rsplit(".", 1)[1]]
    if k.startswith(bb + "stages."):
        return ["dpt.embeddings.backbone.bit.encoder." + k[len(bb):].replace(".blocks.", ".layers.")]
    simple = {vit + "cls_token": "dpt.embeddings.cls_token", vit + "pos_embed": "dpt.embeddings.position_embeddings",
              vit + "patch_embed.proj.weight": "dpt.embeddings.projection.weight",
              vit + "patch_embed.proj.bias": "dpt.embeddings.projection.bias",
              vit + "norm.weight": "dpt.layernorm.weight", vit + "norm.bias": "dpt.layernorm.bias"}
    if k in simple:
        return [simple[k]]
    if k.startswith(vit + "head."):
        return None
    if k.startswith(vit + "blocks."):
        i, rest = k[len(vit + "blocks."):].split(".", 1)
        base = f"dpt.encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            return [base + f"attention.attention.{n}.{rest.rsplit('.', 1)[1]}" for n in ("query", "key", "value")]
        table = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                 "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
        name, leaf = rest.rsplit(".", 1)
        return [base + f"{table[name]}.{leaf}"]
    pp = "model.pretrained.act_postprocess"
    if k.startswith(pp):
        level, idx, rest = k[len(pp)], *k[len(pp) + 2:].split(".", 1)
        i = int(level) - 1                                        # act_postprocess3 / 4 -> reassemble stage 2 / 3
        if idx == "0":
            return [f"neck.reassemble_stage.readout_projects.{i}.0.{rest.rsplit('.', 1)[1]}"]
        return [f"neck.reassemble_stage.layers.{i}.{'projection' if idx == '3' else 'resize'}.{rest}"]
    sc = "model.scratch."
    if k.startswith(sc + "layer"):
        return [f"neck.convs.{int(k[len(sc) + 5]) - 1}.weight"]
    if k.startswith(sc + "refinenet"):
        n, rest = k[len(sc + "refinenet"):].split(".", 1)
        rest = (rest.replace("out_conv", "projection").replace("resConfUnit", "residual_layer")
                .replace("conv", "convolution"))
        return [f"neck.fusion_stage.layers.{4 - int(n)}.{rest}"]
    if k.startswith(sc + "output_conv."):
        return ["head.head." + k[len(sc + "output_conv."):]]
    raise KeyError(k)


def hf_dpt(cfg: MidasConfig, state: dict[str, torch.Tensor], image_size: int | None = None):
    """transformers' DPT-Hybrid with cfg's numbers holding `state` (our names below depth_model.), float32, eval."""
    from transformers import DPTConfig, DPTForDepthEstimation

    size = cfg.size
    backbone = dict(layer_type="bottleneck", depths=[n for n, _, _ in cfg.stages],
                    hidden_sizes=[c for _, _, c in cfg.stages], embedding_size=cfg.stem, global_padding="same",
                    embedding_dynamic_padding=True, out_features=["stage1", "stage2", "stage3"], num_groups=32)
    hc = DPTConfig(is_hybrid=True, backbone_config=backbone, hidden_size=cfg.width, num_hidden_layers=cfg.depth,
                   num_attention_heads=cfg.heads, intermediate_size=cfg.mlp, image_size=size, patch_size=cfg.patch,
                   layer_norm_eps=1e-6, readout_type="project", backbone_out_indices=[2, 5, 8, 11],
                   neck_hidden_sizes=[cfg.stages[0][2], cfg.stages[1][2], *cfg.post], reassemble_factors=[1, 1, 1, 0.5],
                   fusion_hidden_size=cfg.features, backbone_featmap_shape=[1, cfg.stages[-1][2], cfg.grid, cfg.grid])
    model = DPTForDepthEstimation(hc).eval()
    mapped = {}
    for k, v in state.items():
        names = hf_key(k)
        if names is None:
            continue
        parts = v.chunk(3, 0) if len(names) == 3 else (v,)
        mapped.update(zip(names, parts))
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert missing == [] and unexpected == [], (missing, unexpected)
    if image_size is not None:        # the same position tensor, resized by transformers to the larger grid
        model.dpt.embeddings.image_size = (image_size, image_size)
    return model


@pytest.fixture(scope="module")
def tiny():
    cfg = dict(tiny_spec("sd2_depth").extra)["midas"]
    state = {k[len(PREFIX):]: v for k, v in tiny_state_dict("sd2_depth").items() if k.startswith(PREFIX)}
    ours = build_midas(cfg)
    ours.load_state_dict(state, strict=True)
    return cfg, state, ours.eval()


@pytest.mark.parametrize("side", [64, 128])
@torch.no_grad()
def test_depth_matches_transformers_dpt_hybrid(tiny, side: int) -> None:
    cfg, state, ours = tiny
    ref_model = hf_dpt(cfg, state, image_size=side)
    x = torch.rand((2, 3, side, side), generator=torch.Generator().manual_seed(side)) * 2 - 1   # (B, 3, H, W)
    ref = ref_model(pixel_values=x).predicted_depth                                            # (B, H, W)
    got = ours(x)
    assert got.shape == ref.shape == (2, side, side)
    scale = ref.abs().max().item()
    assert scale > 0.1 and ref.std().item() > 0.01 * scale      # not a dead (all-zero or flat) estimate
    err = (got - ref).abs().max().item() / scale
    print(f"MiDaS vs transformers DPT-Hybrid at {side} px: max rel err {err:.2e}")
    assert err < 1e-4
    # the two images differ, and so do their depths (the batch is not mixed up)
    assert (got[0] - got[1]).abs().max().item() > 1e-2 * scale


@pytest.mark.parametrize("w,h", [(512, 512), (768, 512), (512, 768), (1024, 640), (300, 200), (64, 48)])
def test_net_size_is_midas_minimal_resize(w: int, h: int) -> None:
    import numpy as np
    from PIL import Image
    from transformers import DPTImageProcessor

    proc = DPTImageProcessor(do_resize=True, size={"height": 384, "width": 384}, keep_aspect_ratio=True,
                             ensure_multiple_of=32, do_rescale=True, do_normalize=True, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3)
    out = proc(images=Image.fromarray(np.zeros((h, w, 3), np.uint8)), return_tensors="pt").pixel_values
    assert net_size(w, h) == (out.shape[-1], out.shape[-2])


def test_midas_input_size_and_range() -> None:
    x = torch.linspace(-1, 1, 3 * 48 * 64).reshape(1, 3, 48, 64)
    y = midas_input(x, 64)
    assert y.shape == (1, 3, 64, 64)     # 64x48 at a 64 px net: width fits, the height rounds 48 -> 64
    # mean 0.5 / std 0.5 on [0, 1] is the [-1, 1] image back: a constant image stays the same constant
    assert (midas_input(torch.full((1, 3, 48, 64), 0.25), 64) - 0.25).abs().max().item() < 1e-6


@torch.no_grad()
def test_estimate_runs_at_the_net_size(tiny) -> None:
    cfg, _, ours = tiny
    x = torch.rand((1, 3, 40, 90), generator=torch.Generator().manual_seed(1)) * 2 - 1
    d = estimate_depth(ours, x)
    assert d.shape == (1, 32, 64) and d.dtype == torch.float32 and bool((d >= 0).all())   # 90x40 -> 64x32
