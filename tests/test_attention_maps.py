"""Cross-attention maps (sd.attention_maps, DAAM): probabilities against a reference computed here, the demo
model's shape words on their side of the image, recording that changes nothing and stays on its thread, the
token / word list with A1111 weights, SD3's joint attention, and the CLI's --attention-maps."""
from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sd import attention_maps as am
from sd.demo import DEMO_CHECKPOINT
from sd.demo.data import held_out_prompts
from sd.pipeline import GenerateParams, generate, load_model


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO_CHECKPOINT)


def _params(prompt: str, **kw) -> GenerateParams:
    base = dict(prompt=prompt, width=64, height=64, steps=5, cfg=5.0, seed=3, sampler="euler")
    return GenerateParams(**{**base, **kw})


def test_maps_equal_the_softmax_probabilities_summed_over_heads_and_layers(demo) -> None:
    """One CFG-1 step: each attn2's probabilities taken from scaled_dot_product_attention with v = identity
    (softmax(q k^T / sqrt d) I), summed over heads, each layer upsampled bilinearly to the latent size, summed."""
    p = _params("a red circle in the top left corner on a blue background", steps=1, cfg=1.0)
    attn = [m for n, m in demo.parts.unet.named_modules() if n.endswith(".attn2")]
    seen = []
    hooks = [m.register_forward_hook(lambda mod, a, o: seen.append((mod, a[0], a[1]))) for m in attn]
    try:
        res, maps = am.generate_with_maps(demo, p)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(attn) == maps.layers
    ref = torch.zeros(1, 77, 8, 8, dtype=torch.float64)
    for mod, x, ctx in seen:
        hd = mod.heads
        q, k = mod.to_q(x), mod.to_k(ctx)                                        # (1, L, H*d), (1, 77, H*d)
        q = q.reshape(1, q.shape[1], hd, -1).transpose(1, 2)
        k = k.reshape(1, 77, hd, -1).transpose(1, 2)
        eye = torch.eye(77).expand(1, hd, 77, 77)
        probs = F.scaled_dot_product_attention(q, k, eye).sum(1)               # (1, L, 77)
        side = int(round(probs.shape[1] ** 0.5))
        m = probs.transpose(1, 2).reshape(1, 77, side, side)
        ref += F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False).double()
    assert maps.evaluations == 1 and maps.maps.shape == (1, 77, 8, 8)
    assert (maps.maps.double() - ref).abs().max() < 1e-5
    assert maps.total == sum(m.heads for m in attn) == 56   # 7 attn2 layers x 8 heads in the demo UNet


def test_maps_sum_to_the_total_at_every_position(demo) -> None:
    p = _params("a small yellow star in the top left corner on a black background")
    res, maps = am.generate_with_maps(demo, p)
    assert maps.evaluations == p.steps          # one conditional evaluation per Euler step (the uncond half skipped)
    s = maps.maps[0].sum(0)                     # (h, w)
    assert (s - maps.total).abs().max() < 1e-5
    up = sum(am.upsample(maps.maps[0, t], (64, 64)) for t in range(77))   # at the image size too
    assert (up - maps.total).abs().max() < 1e-4
    assert (maps.maps >= 0).all()


def test_long_prompt_unstacked_branches_and_a_batch(demo) -> None:
    """A two-chunk prompt against a one-chunk negative runs cond and uncond as two calls (sd.guidance): only the
    cond call is recorded, 154 positions; a batch of two keeps one map per image."""
    long = ", ".join(["a red circle in the top left corner on a blue background"] * 7)   # 84 words: 2 chunks
    p = _params(long, steps=2, negative_prompt="green")
    res, maps = am.generate_with_maps(demo, p)
    assert maps.evaluations == 2 and maps.maps.shape == (1, 154, 8, 8)
    assert maps.tokens[0] == maps.tokens[77] == "<start>" and maps.tokens.count("<end>") == 2   # a chunk each
    assert (maps.maps[0].sum(0) - maps.total).abs().max() < 1e-5
    res, maps = am.generate_with_maps(demo, _params("a red circle", steps=2, batch_size=2))
    assert maps.evaluations == 2 and maps.maps.shape == (2, 77, 8, 8)
    assert (maps.maps.sum(1) - maps.total).abs().max() < 1e-5 and not torch.equal(maps.maps[0], maps.maps[1])


def test_unstacked_branches_of_equal_length_record_the_cond_call_only(demo, monkeypatch) -> None:
    """cond and uncond as two calls on the same x (what sd.guidance does when they cannot be stacked): the maps
    equal the stacked run's up to float rounding, one evaluation per Heun evaluation."""
    from sd import guidance

    p = _params("a red circle", steps=3, sampler="heun")
    res, stacked = am.generate_with_maps(demo, p)
    monkeypatch.setattr(guidance, "_can_batch", lambda c, u: False)
    res2, two = am.generate_with_maps(demo, p)
    assert stacked.evaluations == two.evaluations == 5            # Heun: 2 evaluations per step, 1 on the last
    assert (stacked.maps - two.maps).abs().max() < 1e-4


def test_shape_word_is_on_its_side_for_held_out_prompts(demo) -> None:
    """Held-out captions with the shape in a left or right corner: the shape word's map has more mass on that
    half in at least 70% of the prompts (measured on the shipped demo model: 16 of 16 at 3 steps, and at 5 and 10)."""
    good = n = 0
    for caption, target, _ in held_out_prompts():
        if target.position == "center":
            continue
        res, maps = am.generate_with_maps(demo, _params(caption, seed=n, steps=3))
        word = next(w for w in maps.words if w.text == target.shape)
        m = maps.word_map(word)                  # (8, 8)
        left, right = m[:, :4].sum().item(), m[:, 4:].sum().item()
        good += (left > right) == ("left" in target.position)
        n += 1
    print(f"shape word on its side: {good}/{n}")
    assert n == 16 and good / n >= 0.7


def test_recording_changes_nothing_and_leaves_no_hook(demo) -> None:
    p = _params("a blue triangle in the top right corner on a yellow background", sampler="euler_ancestral")
    before = generate(demo, p)
    res, maps = am.generate_with_maps(demo, p)
    after = generate(demo, p)
    assert torch.equal(before.latents, res.latents) and torch.equal(before.latents, after.latents)
    assert before.images[0].tobytes() == res.images[0].tobytes()
    unet = demo.parts.unet
    assert not unet._forward_pre_hooks and all(not m._forward_hooks for m in unet.modules())


def test_another_threads_run_is_not_recorded(demo) -> None:
    p = _params("a red circle on a blue background", steps=2)
    with am.record(demo, p) as result:
        t = threading.Thread(target=generate, args=(demo, p))
        t.start()
        t.join()
        with pytest.raises(ValueError, match="no attention was recorded"):
            result()
        generate(demo, p)               # this thread's run is
        assert result().evaluations == 2


def test_tokens_words_and_weights(demo) -> None:
    p = _params("a (red:1.5) [circle] <lora:none:0.5> on a blue background", steps=1)
    with am.record(demo, p) as result:
        generate(demo, replace(p, prompt=p.prompt.replace(" <lora:none:0.5>", "")))   # the tag is not a token
    maps = result()
    assert maps.tokens[:3] == ["<start>", "a</w>", "red</w>"] and maps.tokens[8] == "<end>"
    assert maps.tokens[9:] == ["<pad>"] * 68
    words = [(w.text, w.weight) for w in maps.words]
    assert words == [("a", 1.0), ("red", 1.5), ("circle", pytest.approx(1 / 1.1)), ("on", 1.0), ("a", 1.0),
                     ("blue", 1.0), ("background", 1.0)]
    assert maps.weights[2] == 1.5 and maps.weights[0] == 1.0
    ch = am.choices(maps)
    assert ch[1] == "word 1: red (weight 1.50)" and "token 2: red (weight 1.50)" in ch
    assert torch.equal(am.map_for_choice(maps, ch[1]), maps.maps[0, 2])
    with pytest.raises(ValueError, match="not a word or token"):
        am.map_for_choice(maps, "word 99: x")
    # a word of several tokens: its map is the sum of theirs
    w = am.words_of(["<start>", "sun", "flower</w>", "<end>"], [1.0, 1.2, 1.2, 1.0])
    assert w == [am.Word("sunflower", (1, 2), 1.2)]
    assert am.words_of(["#0", "#1"], [1.0, 1.0]) == [am.Word("#0", (0,), 1.0), am.Word("#1", (1,), 1.0)]


def test_overlay_is_the_colormap_of_the_scaled_map() -> None:
    m = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    heat = am.heat_map(m, (2, 2))
    assert heat.getpixel((0, 0)) == (0, 0, 143) and heat.getpixel((1, 1)) == (220, 20, 20)
    assert heat.getpixel((1, 0)) == (0, 160, 255)          # 1 / 4 = 0.25: the second stop
    img = Image.new("RGB", (2, 2), (100, 100, 100))
    out = am.overlay(img, m, alpha=0.5)
    assert out.getpixel((1, 1)) == (160, 60, 60)


def test_sd3_joint_attention_text_part_and_image_entry(tmp_path) -> None:
    from .tiny_sd3 import write_tiny_sd3, write_tiny_spiece

    path = write_tiny_sd3("sd3_medium", tmp_path / "sd3_medium_incl_clips_t5xxlfp16.safetensors")
    write_tiny_spiece(tmp_path / "spiece.model")
    model = load_model(path)
    p = GenerateParams(prompt="a red cube", negative_prompt="blurry", width=32, height=32, steps=3, cfg=4.0, seed=1)
    plain = generate(model, p)
    res, maps = am.generate_with_maps(model, p)
    assert torch.equal(plain.latents, res.latents)
    depth = model.spec.unet.depth
    assert maps.total == depth * depth and maps.layers == depth   # heads = depth in an MMDiT
    ctx_len = maps.maps.shape[1] - 1
    assert maps.tokens[-1] == am.IMAGE_ENTRY and maps.tokens[:4] == ["<start>", "a</w>", "red</w>", "cube</w>"]
    assert maps.maps.shape[2:] == (4, 4) and ctx_len >= 77
    assert (maps.maps[0].sum(0) - maps.total).abs().max() < 1e-5
    assert 0 < maps.maps[0, :-1].sum(0).min() and maps.maps[0, -1].max() < maps.total
    # SD3.5's skip-layer pass is not a conditional evaluation of the plain network: not recorded
    slg = replace(p, inputs={"slg_layers": "1", "slg_scale": 2.5})
    _, maps2 = am.generate_with_maps(model, slg)
    assert maps2.evaluations == p.steps


def test_cli_writes_one_png_per_token_and_the_json(tmp_path, capsys) -> None:
    from sd.__main__ import main

    out = tmp_path / "maps"
    rc = main(["generate", "--prompt", "a red circle", "--steps", "2", "--cfg", "5", "--out",
               str(tmp_path / "img.png"), "--attention-maps", str(out)])
    assert rc == 0
    info = json.loads((out / "tokens.json").read_text())
    words = [w["word"] for w in info["words"]]
    assert words == ["a", "red", "circle"] and info["total"] == 56.0
    pngs = sorted(q.name for q in out.glob("*.png"))
    assert pngs == ["token-01-a.png", "token-02-red.png", "token-03-circle.png"]
    assert Image.open(out / "token-02-red.png").size == (64, 64)
    assert main(["generate", "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "a.png"),
                 "--attention-maps", str(tmp_path / "img.png")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_sdxl_two_towers_share_the_token_positions(tiny_files) -> None:
    """SDXL's context is CLIP-L and bigG side by side: one label per position, the A1111 weights; the released
    layout's 70 attn2 layers (2 x 2 + 2 x 10 down, 10 in the middle, 3 x 10 + 3 x 2 up), summing to their heads."""
    model = load_model(tiny_files("sdxl_base"))
    p = GenerateParams(prompt="a (red:1.2) circle", width=64, height=64, steps=2, cfg=5.0, seed=1)
    plain = generate(model, p)
    res, maps = am.generate_with_maps(model, p)
    assert torch.equal(plain.latents, res.latents)
    attn = [m for n, m in model.parts.unet.named_modules() if n.endswith(".attn2")]
    assert maps.layers == len(attn) == 70 and maps.total == sum(m.heads for m in attn)
    assert [(w.text, w.weight) for w in maps.words] == [("a", 1.0), ("red", 1.2), ("circle", 1.0)]
    assert ((maps.maps[0].sum(0) - maps.total).abs() / maps.total).max() < 1e-6   # float32 softmax rounding
