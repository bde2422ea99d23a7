"""The checkpoint card (sd.card) for each family: the released key lists (tests/data/checkpoint-keys: names and
shapes, no weights) and tiny checkpoints.

Checked: the card names the family and what decided its prediction type; its conditioning shapes are the widths the
file's own tensors take (the cross-attention key projection's input width, the vector embedder's input width, the
first conv's input channels minus the latent's), with the issue's example numbers for the released files (SDXL
`vector` (1, 2816) = pooled 1280 + 6 x 256); a run's shapes are the conditioner's (two prompt chunks: 154 tokens);
the parameter counts are the sums over the file's tensors; every family's evidence keys are in (or, marked "!",
absent from) the released files; `python -m sd inspect` keeps its keys and adds `card`.
"""
from __future__ import annotations

import json
import math

import pytest

from sd.checkpoint import CheckpointError
from sd.card import card_text, conditioning_shapes, parameter_counts
from sd.families import FAMILIES, detect, get_family
from sd.pipeline import GenerateParams, load_model
from sd.tokenizer import CHUNK_TOKENS, encode

from .tiny import REFERENCE_DIR, reference_shapes

UNET = "model.diffusion_model."
# released layout -> (family, decided by (a substring of the card), crossattn width, vector, concat channels)
LAYOUTS = {
    "sd1": ("sd1", "the sd1 preset", 768, None, 0),
    "sd2_768_v": ("sd2", "A1111's probe", 1024, None, 0),
    "sd2_inpaint": ("sd2-inpaint", "the sd2-inpaint preset", 1024, None, 5),
    "sd2_depth": ("sd2-depth", "the sd2-depth preset", 1024, None, 1),
    "sd2_x4_upscaler": ("sd2-x4-upscaler", "the sd2-x4-upscaler preset", 1024, "(1,)", 3),
    "sd21_unclip_h": ("sd2-unclip-h", "preset", 1024, "(1, 2048)", 0),
    "sdxl_base": ("sdxl-base", "the sdxl-base preset", 2048, "(1, 2816)", 0),
    "sdxl_refiner": ("sdxl-refiner", "the sdxl-refiner preset", 1280, "(1, 2560)", 0),
    "sd3_medium": ("sd3", "the sd3 preset", 4096, "(1, 2048)", 0),
    "sd35_medium": ("sd3.5-medium", "the sd3.5-medium preset", 4096, "(1, 2048)", 0),
    "ldm_cin256_v2": ("ldm-cin256-v2", "preset", 512, None, 0),
}


def context_width(shapes) -> int:
    """The width the network reads its text tokens at, from the file's own tensors."""
    if UNET + "context_embedder.weight" in shapes:                   # MMDiT: the context embedder's input
        return shapes[UNET + "context_embedder.weight"][1]
    key = next(k for k in shapes if k.startswith(UNET) and k.endswith("attn2.to_k.weight"))
    return shapes[key][1]                                             # UNet: attn2's key projection input


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_card_of_a_released_layout(name):
    family, decided, width, vector, concat = LAYOUTS[name]
    shapes = reference_shapes(name)
    spec = detect(shapes)
    fam = get_family(spec.family)
    size = fam.size_for(None)
    text = card_text(spec, shapes, name=f"{name}.safetensors", size=(size, size))
    assert spec.family == family and f"### {fam.label}" in text and f"family `{family}`" in text
    assert decided in text
    assert width == context_width(shapes)
    t = 77 if fam.text else 1
    assert f"`crossattn` (1, {t}, {width})" in text
    if vector is not None:
        assert f"`vector` {vector}" in text
        if UNET + "label_emb.0.0.weight" in shapes:
            assert vector == f"(1, {shapes[UNET + 'label_emb.0.0.weight'][1]})"
    else:
        assert "`vector`" not in text
    if concat:
        f = spec.latent.factor
        assert concat == shapes[UNET + "input_blocks.0.0.weight"][1] - spec.latent.channels
        assert f"`concat` (1, {concat}, {size // f}, {size // f})" in text
    assert fam.about[1:60] in text


def test_sdxl_card_spells_out_the_vector():
    shapes = reference_shapes("sdxl_base")
    text = card_text(detect(shapes), shapes, size=(1024, 1024))
    assert "`vector` (1, 2816): bigG's pooled text (1280) + 6 x 256 Fourier features" in text
    assert 1280 + 6 * 256 == 2816
    assert "`crossattn` (1, 77, 2048): CLIP ViT-L/14 (768) and OpenCLIP bigG (1280)" in text
    assert "scale 0.13025" in text or "z x 0.13025" in text


def test_parameter_counts_are_the_files():
    shapes = reference_shapes("sd1")
    counts = parameter_counts(detect(shapes), shapes)
    by_prefix = lambda p: sum(math.prod(s) for k, s in shapes.items() if k.startswith(p))  # noqa: E731
    assert counts["unet"] == by_prefix(UNET) == 859_520_964          # the released SD 1.x UNet
    assert counts["vae"] == by_prefix("first_stage_model.")
    assert counts["text0"] == by_prefix("cond_stage_model.transformer.") - 77   # position_ids: a buffer, ignored
    text = card_text(detect(shapes), shapes)
    assert "UNet: 859.5 M (859,520,964)" in text


def test_evidence_keys_are_in_the_released_files():
    seen = set()
    for path in sorted(REFERENCE_DIR.glob("*.json")):
        try:
            spec = detect(reference_shapes(path.stem))
        except CheckpointError:          # a first stage alone (VQ-GAN / LDM autoencoders): no family
            continue
        shapes = reference_shapes(path.stem)
        fam = get_family(spec.family)
        seen.add(fam.name)
        name = path.stem
        assert fam.evidence, fam.name
        for item in fam.evidence:
            key = item.lstrip("!")
            there = any(k.startswith(key) for k in shapes) if key.endswith(".") else key in shapes
            assert there != item.startswith("!"), (name, item)
    assert {LAYOUTS[n][0] for n in LAYOUTS} <= seen and len(seen) >= 22   # every family with a released list


def test_every_family_says_what_it_is():
    for fam in FAMILIES:
        assert len(fam.about) > 30, fam.name
        assert all(k in ("crossattn", "vector", "concat") for k, _ in fam.conditioning), fam.name


def test_a_run_shows_its_own_shapes(tiny_files):
    model = load_model(tiny_files("sd1"))
    prompt = " ".join(["red circle"] * 60)                          # more than one 75-token chunk
    chunks = -(-len(encode(prompt)) // CHUNK_TOKENS)
    assert chunks == 2
    p = GenerateParams(prompt=prompt, width=64, height=64, batch_size=2)
    got = conditioning_shapes(model, p)
    assert got == {"crossattn": (2, 77 * chunks, 64)}
    text = card_text(model.spec, None, cond_shapes=got)
    assert "`crossattn` (2, 154, 64): CLIP ViT-L/14's last layer (64 wide" in text


def test_inpaint_card_names_the_concat(tiny_files):
    model = load_model(tiny_files("sd1_inpaint"))
    from PIL import Image

    img, mask = Image.new("RGB", (64, 64), (90, 30, 10)), Image.new("L", (64, 64), 255)
    got = conditioning_shapes(model, GenerateParams(prompt="a cat", width=64, height=64,
                                                    inputs={"image": img, "mask": mask}))
    assert got == {"crossattn": (1, 77, 64), "concat": (1, 5, 8, 8)}
    text = card_text(model.spec, None, cond_shapes=got)
    assert "`concat` (1, 5, 8, 8): the mask (1 channel) and the masked image's latent (4)" in text
    assert "(mask 1, masked_image 4)" in text


def test_inspect_json_keeps_its_keys_and_adds_the_card(tiny_files, capsys):
    from sd.__main__ import main

    assert main(["inspect", str(tiny_files("sd1"))]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report) == ["file", "family", "network", "prediction", "prediction_decided_by", "latent", "unet",
                            "vae", "text_encoders", "parameters", "tensors", "ignored_by_rule", "unsupported", "card"]
    assert report["card"].startswith("### SD 1.x: `sd1.safetensors`")
    assert f"UNet: 8.6 M ({report['parameters']['unet']:,})" in report["card"]
