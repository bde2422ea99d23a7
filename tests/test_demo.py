"""The built-in demo model (issue 5): procedural dataset, pixel-analysis evaluator, the shipped checkpoint, training.

The quality tests generate held-out prompts through the public path (sd.pipeline.load_model + generate), once per
session, and check two things on the same numbers: the shipped file's measured level (a regression guard, passing)
and issue 15's targets (CFG 5: both colors >= 85%, shapes and positions >= 80%, CFG 1 clearly lower; the independent
color rule >= 80%). The shipped file misses the targets (sd/demo/README.md has the table; issue 15 is open), so the
target tests are strict xfails: they show as xfailed, and the suite fails the day a retrained file meets them, so the
marks must then go. One image under 1 s is met and asserted plainly. The training test runs the
training code at tiny widths: an interrupted run resumes from its state file bit for bit, and each stage reads the
state files of the others.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sd.demo import DEMO_CHECKPOINT, EXAMPLE_PROMPTS
from sd.demo import data
from sd.demo.evaluate import (FAR_DISTANCE, analyze, color_rule_evaluate, evaluate, judge_colors, score,
                              simple_color_prompts)


@pytest.fixture
def one_thread():
    """Generation at one torch thread: on a shared 2-core CPU, idle OpenMP threads make tiny ops ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo_model():
    from sd.pipeline import load_model

    return load_model(DEMO_CHECKPOINT)


# ----------------------------------------------------------------------------------------------------
# dataset


def test_dataset_is_deterministic_and_varied():
    a, b = data.make_sample(17, seed=3), data.make_sample(17, seed=3)
    assert a.caption == b.caption and np.array_equal(a.image, b.image)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    other = data.make_sample(17, seed=4)
    assert other.caption != a.caption or not np.array_equal(other.image, a.image)
    images, captions = data.make_batch(0, 200)
    assert images.shape == (200, 64, 64, 3)
    assert len(set(captions)) > 150  # captions vary (color, shape, size, position, background)
    assert sum(" and " in c for c in captions) > 10  # some two-shape images


def test_training_captions_never_use_a_held_out_combination():
    combos = data.held_out_combinations()
    assert len(combos) == 20
    # every color, shape and position still occurs in training
    assert {c for c, _, _ in combos} == set(data.COLOR_NAMES)
    for i in range(1500):
        s = data.make_sample(i)
        if len(s.shapes) == 1:
            sh = s.shapes[0]
            assert not data.is_held_out(sh.color, sh.shape, sh.position), s.caption
            assert sh.color != s.background
    held = data.held_out_prompts()
    assert held[0][0] == "a small red circle in the center on a green background"


# ----------------------------------------------------------------------------------------------------
# evaluator


def test_evaluator_scores_ground_truth_renders_fully():
    for prompt, target, background in data.held_out_prompts():
        img = data.render((target,), background)
        assert score(img, target, background) == {"color": True, "background": True, "shape": True,
                                                  "position": True}, prompt


def test_evaluator_scores_wrong_renders_zero_on_that_attribute():
    prompt, target, background = data.held_out_prompts()[1]  # a red circle in the top right corner on yellow
    wrong = {
        "color": data.ShapeSpec("blue", target.shape, target.position, target.size, target.cx, target.cy),
        "shape": data.ShapeSpec(target.color, "star", target.position, target.size, target.cx, target.cy),
        "position": data.ShapeSpec(target.color, target.shape, "bottom left", target.size,
                                   *data.POSITION_CENTERS["bottom left"]),
    }
    for attr, spec in wrong.items():
        s = score(data.render((spec,), background), target, background)
        assert s[attr] is False, attr
        assert sum(s.values()) == 3, (attr, s)  # only that attribute is wrong
    s = score(data.render((target,), "black"), target, background)
    assert s["background"] is False and s["color"] is True
    # each shape is told apart from every other one
    for shape in data.SHAPES:
        spec = data.ShapeSpec("white", shape, "center", "", 32.0, 32.0)
        assert analyze(data.render((spec,), "blue")).shape == shape
    # an empty image has no foreground: every foreground attribute is wrong
    blank = np.full((64, 64, 3), data.COLORS[background], dtype=np.uint8)
    s = score(blank, target, background)
    assert s == {"color": False, "background": True, "shape": False, "position": False}


def test_independent_color_rule_on_synthetic_images():
    """judge_colors: border median -> background, median of the pixels far from it -> foreground (issue 15)."""
    # every (foreground, background) pair of the palette, each shape, drawn by the dataset's renderer
    for i, fg in enumerate(data.COLOR_NAMES):
        for j, bg in enumerate(data.COLOR_NAMES):
            if fg != bg:
                shape, position = data.SHAPES[(i + j) % 4], data.POSITIONS[(i + 2 * j) % 5]
                spec = data.ShapeSpec(fg, shape, position, "small", *data.POSITION_CENTERS[position])
                assert judge_colors(data.render((spec,), bg)) == (fg, bg), (fg, bg, shape)
    # far = more than half the smallest palette gap (green-black: |(15, 155, 35)| = 160.6)
    assert FAR_DISTANCE == pytest.approx(np.sqrt(15**2 + 155**2 + 35**2) / 2, rel=1e-6)
    # no foreground: a flat image, and one whose only deviation (60 levels) is closer than FAR_DISTANCE
    flat = np.full((64, 64, 3), data.COLORS["blue"], dtype=np.uint8)
    assert judge_colors(flat) == (None, "blue")
    near = flat.copy()
    near[20:40, 20:40] = np.array(data.COLORS["blue"]) + (60, 0, 0)
    assert judge_colors(near) == (None, "blue")
    # a shape over a third of the border still leaves the border median on the background
    img = flat.copy()
    img[:, :22] = data.COLORS["yellow"]
    assert judge_colors(img) == ("yellow", "blue")
    # medians: a minority of other colored pixels inside the shape does not change its color
    img = np.full((64, 64, 3), data.COLORS["white"], dtype=np.uint8)
    img[16:48, 16:48] = data.COLORS["red"]  # 1024 pixels
    img[16:26, 16:48] = data.COLORS["black"]  # 320 of them black
    assert judge_colors(img) == ("red", "white")
    # Gaussian noise (sigma 20 per channel) on a rendered image: the medians still name both colors
    spec = data.ShapeSpec("green", "circle", "center", "large", 32.0, 32.0)
    noisy = data.render((spec,), "black").astype(np.float64)
    noisy += np.random.default_rng(0).normal(0, 20, noisy.shape)
    assert judge_colors(np.clip(noisy, 0, 255).astype(np.uint8)) == ("green", "black")
    # a PIL image is read the same way
    from PIL import Image

    assert judge_colors(Image.fromarray(data.render((spec,), "red"))) == ("green", "red")


def test_simple_color_prompts():
    prompts = simple_color_prompts()
    assert len(prompts) == 12
    assert prompts[0] == ("a red circle on a green background", "red", "green")
    for p, fg, bg in prompts:
        assert fg != bg and p.startswith(f"a {fg} ") and p.endswith(f" on a {bg} background") and len(p.split()) == 7
    for c in data.COLOR_NAMES:  # each color twice as the shape's, twice as the background's
        assert [fg for _, fg, _ in prompts].count(c) == 2 and [bg for _, _, bg in prompts].count(c) == 2


# ----------------------------------------------------------------------------------------------------
# the shipped checkpoint


def test_checkpoint_is_small_and_has_the_sd1_layout():
    from safetensors import safe_open

    assert DEMO_CHECKPOINT.exists(), DEMO_CHECKPOINT
    assert DEMO_CHECKPOINT.stat().st_size <= 30 * 2**20
    with safe_open(str(DEMO_CHECKPOINT), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert not [k for k in keys if not k.startswith(("model.diffusion_model.", "first_stage_model.",
                                                     "cond_stage_model.transformer.text_model."))]
    assert len(EXAMPLE_PROMPTS) >= 4


def test_checkpoint_loads_through_the_public_path(demo_model):
    spec = demo_model.spec
    assert spec.family == "sd1" and spec.prediction == "eps"
    assert spec.latent.scale == pytest.approx(0.18215)
    assert spec.text_encoders[0].width == 128 and spec.text_encoders[0].vocab_size == 49408
    assert spec.unet.context_dim == 128 and spec.vae.z_channels == 4 and spec.vae.factor == 8


@pytest.fixture(scope="module")
def quality(demo_model):
    """bench/demo_quality.py's measurement: the 20 held-out prompts x seeds 1 and 2, 20 euler steps, 64x64, at CFG 5
    and CFG 1; and the independent color rule's 12 prompts x seeds 1 and 2 at CFG 5."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        good, _ = evaluate(demo_model, cfg=5.0, seeds=(1, 2))
        plain, _ = evaluate(demo_model, cfg=1.0, seeds=(1, 2))
        both, rows = color_rule_evaluate(demo_model, cfg=5.0, seeds=(1, 2))
    finally:
        torch.set_num_threads(before)
    return dict(good=good, plain=plain, rule=both, rows=rows)


def _mean(r: dict) -> float:
    return (r["colors"] + r["shape"] + r["position"]) / 3


def test_shipped_demo_keeps_its_measured_level(quality):
    """Regression guard at the shipped file's measured level (sd/demo/README.md: CFG 5 both colors 45%, shape 70%,
    position 80%; CFG 1 50% / 55% / 72%; color rule 50%), a few points of slack below each."""
    good, plain = quality["good"], quality["plain"]
    assert good["colors"] >= 0.40 and good["shape"] >= 0.65 and good["position"] >= 0.75, good
    assert _mean(plain) <= _mean(good), (plain, good)       # guidance helps on average
    assert len(quality["rows"]) == 24 and quality["rule"] >= 0.45, quality["rule"]


ISSUE_15 = "issue 15 open: the shipped demo model misses this target (measured numbers in sd/demo/README.md)"


@pytest.mark.xfail(strict=True, reason=ISSUE_15)
def test_held_out_quality_meets_the_issue_targets(quality):
    """Issue 15: CFG 5: both colors right >= 85%, shape >= 80%, position >= 80%; CFG 1 clearly lower: the mean of
    those three rates at least 10 points below CFG 5's."""
    good, plain = quality["good"], quality["plain"]
    assert good["colors"] >= 0.85 and good["shape"] >= 0.80 and good["position"] >= 0.80, good
    assert _mean(plain) <= _mean(good) - 0.10, (plain, good)


@pytest.mark.xfail(strict=True, reason=ISSUE_15)
def test_independent_color_rule_meets_the_issue_target(quality):
    """Issue 15: "a <color> <shape> on a <color> background", 12 prompts x seeds 1 and 2 at CFG 5, judged by
    judge_colors (border median = background, median of the pixels far from it = foreground): both right >= 80%."""
    rows = quality["rows"]
    assert quality["rule"] >= 0.80, [(r["prompt"], r["seed"], r["judged"]) for r in rows if r["judged"] != r["expected"]]


def test_one_image_takes_under_one_second(demo_model, one_thread):
    from sd.pipeline import GenerateParams, generate

    params = GenerateParams(prompt=EXAMPLE_PROMPTS[0], width=64, height=64, steps=20, cfg=5.0, seed=1)
    generate(demo_model, params)  # warm-up
    best = min(_timed(generate, demo_model, params) for _ in range(3))
    assert best < 1.0, best


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


# ----------------------------------------------------------------------------------------------------
# training helpers


def test_latent_rescale_is_an_exact_reparametrisation():
    from sd.train import DEMO_VAE, lr_at, rescale_latent
    from sd.vae import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(DEMO_VAE).eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode_moments(x)
        rec = vae.decode(mean)
        vae.load_state_dict(rescale_latent(vae.state_dict(), 3.0))
        mean2, logvar2 = vae.encode_moments(x)
        rec2 = vae.decode(mean2)
    torch.testing.assert_close(mean2, 3 * mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar2, (logvar + 2 * np.log(3.0)).clamp(-30, 20), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rec2, rec, rtol=1e-4, atol=1e-5)
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


def test_cell_color_loss_is_the_l1_of_8x8_cell_means():
    from sd.train import cell_color_loss

    g = torch.Generator().manual_seed(0)
    rec, x = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    cells = lambda t: t.numpy().reshape(2, 3, 2, 8, 2, 8).mean(axis=(3, 5))  # noqa: E731 - (2, 3, 2, 2)
    assert float(cell_color_loss(rec, x)) == pytest.approx(float(np.abs(cells(rec) - cells(x)).mean()), rel=1e-5)
    # a 4x4 patch off by 0.5 in one channel: per-pixel L1 sees 16/768 of the pixels, the cell loss 1/24 of the cells
    y = x.clone()
    y[0, 1, 0:4, 0:4] += 0.5
    assert float(cell_color_loss(y, x)) == pytest.approx(0.5 * 16 / 64 / 24, rel=1e-4)


def test_training_saves_state_and_resumes_from_it(tmp_path, monkeypatch, capsys):
    """The training bookkeeping, at tiny widths (the demo architecture's structure, narrower; a few seconds): a 2-step
    VAE run interrupted after step 1 and rerun gives bit-identical weights to an uninterrupted run (its state.pt,
    read back weights-only, restores model, EMA, optimizer and RNG); then the UNet stage: a 1-step run, its resume
    (latent cache and state reread), a warm start (--init) from it and the export all read their state files."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from sd import train
    from sd.checkpoint import open_checkpoint

    monkeypatch.setattr(train, "DEMO_VAE", replace(train.DEMO_VAE, ch=32))
    monkeypatch.setattr(train, "DEMO_TEXT", replace(train.DEMO_TEXT, width=32, layers=1, heads=1, mlp=64))
    monkeypatch.setattr(train, "DEMO_UNET", replace(train.DEMO_UNET, model_channels=32, channel_mult=(1,),
                                                    transformer_depth=(1,), context_dim=32, num_heads=1))
    vae_args = ["vae", "--steps", "2", "--batch", "2", "--save-every", "1", "--warmup", "1", "--threads", "1",
                "--color-weight", "4"]
    assert train.main(vae_args + ["--out", str(tmp_path / "straight")]) == 0

    class Interrupted(Exception):
        pass

    update = train.Progress.update

    def interrupt_at_step_1(self, step, loss):  # called after step 1's state was saved, before step 2's
        if step == 1:
            raise Interrupted
        update(self, step, loss)

    with monkeypatch.context() as m:
        m.setattr(train.Progress, "update", interrupt_at_step_1)
        with pytest.raises(Interrupted):
            train.main(vae_args + ["--out", str(tmp_path / "resumed")])
    state = torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)  # what save_state writes is weights-only
    assert state["step"] == 1 and state["rng"].dtype == torch.uint8
    assert not (tmp_path / "resumed" / "vae.safetensors").exists()
    capsys.readouterr()
    assert train.main(vae_args + ["--out", str(tmp_path / "resumed")]) == 0
    assert "resuming VAE training at step 1" in capsys.readouterr().err
    a, b = load_file(tmp_path / "straight" / "vae.safetensors"), load_file(tmp_path / "resumed" / "vae.safetensors")
    assert a.keys() == b.keys() and len(a) > 100
    assert all(torch.equal(a[k], b[k]) for k in a)
    # --stop-at 1 ends a run of the 2-step schedule after step 1 (state saved, weights written); the rerun
    # without it finishes the same schedule: bit-identical again
    assert train.main(vae_args + ["--out", str(tmp_path / "stopped"), "--stop-at", "1"]) == 0
    assert torch.load(tmp_path / "stopped" / "state.pt", weights_only=True)["step"] == 1
    assert train.main(vae_args + ["--out", str(tmp_path / "stopped")]) == 0
    c = load_file(tmp_path / "stopped" / "vae.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)

    vae = tmp_path / "straight" / "vae.safetensors"
    unet_args = ["unet", "--vae", str(vae), "--images", "4", "--batch", "2", "--save-every", "1", "--warmup", "1",
                 "--threads", "1"]
    assert train.main(unet_args + ["--out", str(tmp_path / "unet"), "--steps", "1"]) == 0
    assert train.main(unet_args + ["--out", str(tmp_path / "unet"), "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "resuming UNet training at step 1" in err and err.count("encoding 4 training images") == 1  # cache reread
    assert train.main(unet_args + ["--out", str(tmp_path / "warm"), "--steps", "1", "--init", str(tmp_path / "unet")
                                   ]) == 0
    assert f"initialized from {tmp_path / 'unet'} (step 2)" in capsys.readouterr().err
    out = tmp_path / "demo.safetensors"
    assert train.main(["export", "--vae", str(vae), "--unet", str(tmp_path / "unet"), "--out", str(out)]) == 0
    ckpt = open_checkpoint(out)
    assert ckpt.metadata["unet_steps"] == "2" and ckpt.shapes()["model.diffusion_model.input_blocks.0.0.weight"] == (
        32, 4, 3, 3)
