"""The schedules plot (app_inspect.schedule_frame) read back from the Gradio LinePlot it is drawn with.

Checked: for every schedule of sd.schedules.SCHEDULES the plotted sigmas equal `get_sigmas` over the file's training
sigmas (the SD 1.x tiny checkpoint's betas) and, for a flow family, the family's `sigmas_for` at the chosen shift;
log10 sigma and log-SNR = -2 ln sigma are those values; the chosen schedule is marked; the reference curve is the
training sigmas laid over the steps; the img2img start sits at the step the truncated schedule starts at.
"""
from __future__ import annotations

import math

import gradio as gr
import pytest
import torch

import app_inspect
from sd.checkpoint import open_checkpoint
from sd.families import get_family
from sd.loader import training_sigmas
from sd.samplers import img2img_start
from sd.schedules import SCHEDULE_DISPLAY_NAMES, SCHEDULES, get_sigmas

STEPS = 12


def curves(plot: gr.LinePlot) -> dict[str, list[tuple[float, ...]]]:
    """The plot's data (what Gradio sends the browser, rounded to 10 decimals) per curve:
    [(step, sigma, log10 sigma, log-SNR)]."""
    value = plot.value
    cols = value["columns"]
    out: dict[str, list] = {}
    for row in value["data"]:
        r = dict(zip(cols, row))
        out.setdefault(r["curve"], []).append((r["step"], r["sigma"], r["log10 sigma"], r["log-SNR"]))
    return out


@pytest.fixture(scope="module")
def sd1(tiny_files):
    fam = get_family("sd1")
    return fam, training_sigmas(open_checkpoint(tiny_files("sd1")), fam)[0]


def test_plotted_sigmas_are_get_sigmas_for_every_schedule(sd1):
    fam, training = sd1
    sigma_plot, snr_plot = app_inspect.plots(app_inspect.schedule_frame(fam, training, STEPS, "karras"))
    got = curves(sigma_plot)
    assert got == curves(snr_plot)
    for key in SCHEDULES:
        label = SCHEDULE_DISPLAY_NAMES[key] + (" (chosen)" if key == "karras" else "")
        want = [s for s in get_sigmas(key, training, STEPS, ays_table=fam.ays_table).tolist() if s > 0]
        rows = got[label]
        assert [r[1] for r in rows] == pytest.approx(want, rel=1e-6, abs=0), key
        assert [r[0] for r in rows] == list(range(len(want)))
        for (_, _, log10, snr), s in zip(rows, want):   # the browser gets values rounded to 10 decimals
            assert log10 == pytest.approx(math.log10(s), abs=1e-9) and snr == pytest.approx(-2 * math.log(s), abs=1e-9)
    ref = got[app_inspect.REFERENCE]
    assert ref[0][:2] == (0.0, pytest.approx(float(training[-1]))) and ref[-1][0] == STEPS
    assert ref[-1][1] == pytest.approx(float(training[0]))


def test_img2img_start_is_marked(sd1):
    fam, training = sd1
    df = app_inspect.schedule_frame(fam, training, STEPS, "normal", strength=0.5)
    start = df[df["curve"] == app_inspect.START]
    full = get_sigmas("normal", training, STEPS)
    want = STEPS - (img2img_start(full, 0.5).shape[0] - 1)
    assert 0 < want < STEPS and set(start["step"]) == {float(want)} and len(start) == 2


def test_flow_family_plots_its_shifted_sigmas():
    fam = get_family("sd3")
    training = torch.ones(1000)   # unused by a family with its own sigmas_for
    for shift in (1.0, 3.0):
        got = curves(app_inspect.plots(app_inspect.schedule_frame(fam, training, STEPS, "normal",
                                                                  inputs={"shift": shift}))[0])
        want = [s for s in fam.sigmas_for("normal", STEPS, {"shift": shift}).tolist() if s > 0]
        assert [r[1] for r in got["Normal (chosen)"]] == pytest.approx(want, rel=1e-6)
        assert want[0] == 1.0
        ref = got[app_inspect.REFERENCE]          # the shifted training sigmas: flow_sigma(t / 1000, shift)
        t = 1.0
        assert ref[0][1] == pytest.approx(shift * t / (1 + (shift - 1) * t))
        t = 0.001
        assert ref[-1][1] == pytest.approx(shift * t / (1 + (shift - 1) * t), rel=1e-5)
