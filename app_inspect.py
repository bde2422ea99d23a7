"""The "Inspect" views of every generate tab (issue 13 parts 1, 2, 4): the trajectory of a run as filmstrips with a
step slider, the schedules plot, and the checkpoint card beside the checkpoint.

app.py calls in here at a few places: `tab_params` (the `inspect` API parameter, after the tab's own; None = off),
`build_card` (the card under the checkpoint's facts), `build_view` (the Inspect accordion), `recording` (wraps the
step callback of the first image of a request when `inspect` is on; off, nothing is wrapped), `result` (what a run
hands back: the trajectory and the card with this request's conditioning shapes), `keep` (per session and tab) and
`wire` (events and the API endpoints `/trajectory_<tab>` and `/card`).
Family-blind: the plot's curves come from `sd.pipeline.sampling_sigmas` over every key of `sd.schedules.SCHEDULES`
(or the family's `sigmas_for`), the frames from `sd.trajectory`, the card from `sd.card`.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from types import SimpleNamespace

import gradio as gr
import pandas as pd
import torch

from sd.card import PREDICTION_FORMULAS, card_text, conditioning_shapes
from sd.checkpoint import CheckpointError, open_checkpoint
from sd.families import get_family
from sd.trajectory import STRIPS, Recorder, Trajectory

PARAMS = ("inspect",)
DEFAULTS = {"inspect": False}
REFERENCE = "training sigmas (reference)"
START = "img2img start"
CURVE_POINTS = 200        # points of the reference curve (of the 1000 training sigmas)
KEEP = 8                  # inspected runs kept (one per session and tab, the most recent ones)


def _app():
    """The app module (imported as `app`, or run as `python app.py`): its selection and name tables."""
    return sys.modules.get("app") or sys.modules["__main__"]


def tab_params(fams) -> tuple[str, ...]:
    return PARAMS


# ------------------------------------------------------------------------------------------------ schedules plot


def schedule_frame(family, training: torch.Tensor, steps: int, chosen: str, sampler: str = "euler",
                   inputs: dict | None = None, strength: float | None = None) -> pd.DataFrame:
    """The plot's data: one row per (curve, step) with columns step, sigma, log10 sigma, log-SNR (= -2 ln sigma),
    curve. A curve per schedule of sd.schedules.SCHEDULES, as `sd.pipeline.sampling_sigmas` gives the sampler
    (the family's sigmas_for for flow models: their shift from `inputs`); the chosen one labelled "(chosen)";
    the model's training sigmas (T,) laid over the steps as the reference; with `strength`, two rows marking the
    img2img start step (a vertical line). The final sigma 0 is left out (no logarithm)."""
    from sd.pipeline import GenerateParams, sampling_sigmas
    from sd.schedules import SCHEDULE_DISPLAY_NAMES, SCHEDULES

    stand_in = SimpleNamespace(family=family, sigmas=training)   # what sampling_sigmas reads of a LoadedModel
    p = GenerateParams(steps=int(steps), sampler=sampler, inputs=dict(inputs or {}))
    rows, chosen_sigmas = [], None
    for key in SCHEDULES:
        try:
            sig = sampling_sigmas(stand_in, replace(p, schedule=key))       # (steps + 1,)
        except ValueError:        # a schedule the family cannot run (Align Your Steps on a flow model)
            continue
        label = SCHEDULE_DISPLAY_NAMES.get(key, key) + (" (chosen)" if key == chosen else "")
        if key == chosen:
            chosen_sigmas = sig
        rows += [(float(i), float(s), label) for i, s in enumerate(sig.tolist()) if s > 0]
    ref = sampling_sigmas(stand_in, replace(p, schedule="simple", steps=training.shape[0]))[:-1]  # (T,) descending
    pick = torch.linspace(0, ref.shape[0] - 1, CURVE_POINTS).round().long()
    rows += [(float(j) * steps / (ref.shape[0] - 1), float(ref[j]), REFERENCE) for j in pick.tolist()]
    if strength is not None and chosen_sigmas is not None:
        start = start_step(family, chosen_sigmas, strength, stand_in, replace(p, schedule=chosen))
        top = max(r[1] for r in rows)
        low = min(r[1] for r in rows)
        rows += [(float(start), top, START), (float(start), low, START)]
    df = pd.DataFrame(rows, columns=["step", "sigma", "curve"])
    df["log10 sigma"] = df["sigma"].map(math.log10)
    df["log-SNR"] = df["sigma"].map(lambda s: -2 * math.log(s))
    return df[["step", "sigma", "log10 sigma", "log-SNR", "curve"]]


def start_step(family, sigmas: torch.Tensor, strength: float, stand_in, p) -> int:
    """The step img2img starts at: a family with its own img2img (depth) runs the last int(strength * steps) steps
    (sd.pipeline.family_img2img_start); the others the pipeline's truncated schedule (sd.samplers.img2img_start)."""
    from sd.pipeline import sampling_sigmas

    steps = sigmas.shape[0] - 1
    if family.img2img is not None:
        return steps - min(int(strength * steps), steps)
    marker = SimpleNamespace()   # sampling_sigmas only asks whether an init image is given
    return steps - (sampling_sigmas(stand_in, replace(p, init_image=marker, strength=strength)).shape[0] - 1)


def plots(df: pd.DataFrame | None):
    """(sigma plot, log-SNR plot) updates of a schedule frame."""
    if df is None:
        return gr.skip(), gr.skip()
    return gr.LinePlot(value=df), gr.LinePlot(value=df)


def _per_file(ctx, kind: str, path, make):
    """make() once per (kind, file, size, mtime): a .ckpt is read whole, so its sigmas and shapes are kept."""
    st = path.stat()
    key = (kind, str(path.resolve()), st.st_size, st.st_mtime_ns)
    with ctx.lock:
        if key in ctx.inspect:
            return ctx.inspect[key]
    value = make()
    with ctx.lock:
        ctx.inspect[key] = value
    return value


def _training_of(ctx, value: str):
    """(family, training sigmas (T,)) of a dropdown value: the file's own schedule buffers (sd.loader)."""
    from sd.loader import training_sigmas

    path, spec, _ = _app().selection(ctx, value, probe=False)
    fam = get_family(spec.family)
    return fam, _per_file(ctx, "sigmas", path, lambda: training_sigmas(open_checkpoint(path), fam)[0])


def schedule_data(ctx, value, schedule, steps, sampler, strength=None, values: dict | None = None):
    """The schedule frame of a tab's current checkpoint, schedule, steps, sampler, strength and the family's number
    inputs by name (`values`; a family input left out takes its declared default). None on a bad choice."""
    a = _app()
    try:
        fam, training = _training_of(ctx, value)
        given = {k: v for k, v in (values or {}).items() if v is not None}
        inputs = {i.name: given.get(i.name, i.default) for i in fam.inputs if i.kind == "number"}
        from sd.samplers import resolve_schedule   # "Automatic": the sampler's A1111 default is the chosen curve

        key = a.SAMPLER_OF_DISPLAY.get(sampler, sampler)
        return schedule_frame(fam, training, int(steps), resolve_schedule(a.SCHEDULE_OF_DISPLAY.get(schedule, schedule),
                                                                          key), key, inputs,
                              float(strength) if strength is not None else None)
    except a.USER_ERRORS:
        return None


# ------------------------------------------------------------------------------------------------ recording


@dataclass
class Inspection:
    """What an inspected run hands back to its session: the trajectory, the model and request (for the
    first-stage decode of picked steps) and the card with this request's conditioning shapes."""

    trajectory: Trajectory
    model: object
    params: object
    card: str = ""


def recording(s: dict, model, p, callback, recorded: list):
    """The step callback of a run of request `p`: `callback` itself when `inspect` is off; else a
    sd.trajectory.Recorder around it, appended with `p` to `recorded` (the app records a request's first run)."""
    if not s.get("inspect"):
        return callback
    rec = Recorder(model.spec.prediction, model.spec.family, callback)
    recorded.append((rec, p))
    return rec


def result(recorded: list, model) -> Inspection | None:
    """The Inspection of a request whose first run was recorded (None when `inspect` was off)."""
    if not recorded:
        return None
    rec, p = recorded[0]
    traj = rec.trajectory
    shapes = cond = None
    try:   # a .safetensors header is cheap; a .ckpt would be read whole again: its card leaves the file part out
        shapes = open_checkpoint(model.path).shapes() if model.path.suffix == ".safetensors" else None
        cond = conditioning_shapes(model, p)   # the text towers once more, only for an inspected run
    except (CheckpointError, OSError, ValueError, RuntimeError) as e:   # the run itself succeeded: keep it
        print(f"note: the card of {model.path.name} has no request shapes: {e}", file=sys.stderr)
    card = card_text(model.spec, shapes, name=model.path.name, cond_shapes=cond, size=(p.width, p.height),
                     batch=p.batch_size)
    return Inspection(traj, model, p, card)


def keep(ctx, key, out) -> None:
    """Remember a run's Inspection for its (session, tab); a run without one leaves the last one shown."""
    got = getattr(out, "inspection", None)
    if got is not None:
        with ctx.lock:
            ctx.inspect.pop(key, None)
            ctx.inspect[key] = got                  # the newest last
            kept = [k for k, v in ctx.inspect.items() if isinstance(v, Inspection)]
            for k in kept[:-KEEP]:                  # the oldest sessions' runs go (each holds its model)
                del ctx.inspect[k]


def _kept(ctx, request, tab) -> Inspection | None:
    with ctx.lock:
        return ctx.inspect.get((getattr(request, "session_hash", None), tab))


# ------------------------------------------------------------------------------------------------ the views


def card_for(ctx, value) -> str:
    """The card of a dropdown value (spec and file shapes; conditioning shapes of one 77-token chunk)."""
    a = _app()
    if not value:
        return "*no checkpoint selected*"
    try:
        path, spec, is_demo = a.selection(ctx, value, probe=False)
        shapes = _per_file(ctx, "shapes", path, lambda: open_checkpoint(path).shapes())
    except a.USER_ERRORS as e:
        return f"**cannot describe this file:** {e}"
    size = get_family(spec.family).size_for(None) if not is_demo else 64
    return card_text(spec, shapes, name=path.name + (" (built-in demo)" if is_demo else ""), size=(size, size))


def build_card(ctx, tab: str, c: dict, value) -> None:
    """The checkpoint card, under the tab's facts."""
    with gr.Accordion("Checkpoint card: what this model is", open=False, elem_id=f"{tab}-card-box"):
        c["card"] = gr.Markdown(card_for(ctx, value) if value else "*no checkpoint*", elem_id=f"{tab}-card")


def _plot_inputs(tab: str, c: dict) -> tuple[list, list[str]]:
    """(components the plot follows, the names of the family number inputs among them)."""
    numbers = list(dict.fromkeys(i.name for f in _tab_families(tab) for i in f.inputs
                                 if i.kind == "number" and i.name in c))
    comps = [c["checkpoint"], c["schedule"], c["steps"], c["sampler"]]
    comps += [c["strength"]] if "strength" in c else []
    return comps + [c[n] for n in numbers], numbers


def _plot_update(ctx, tab: str, c: dict):
    comps, numbers = _plot_inputs(tab, c)
    strength = "strength" in c

    def update(value, schedule, steps, sampler, *rest):
        st = rest[0] if strength else None
        vals = dict(zip(numbers, rest[1:] if strength else rest))
        return plots(schedule_data(ctx, value, schedule, steps, sampler, st, vals))

    return comps, update


def build_view(ctx, tab: str, c: dict) -> None:
    """The Inspect accordion: the trajectory (checkbox, formula, step slider, frames, filmstrips, first-stage
    decode) and the schedules plot (drawn now for the tab's first checkpoint; it follows the form)."""
    comps, numbers = _plot_inputs(tab, c)
    vals = [x.value for x in comps]
    first = schedule_data(ctx, *vals[:4], vals[4] if "strength" in c else None,
                          dict(zip(numbers, vals[5:] if "strength" in c else vals[4:]))) if vals[0] else None
    with gr.Accordion("Inspect: trajectory and schedules", open=False, elem_id=f"{tab}-inspect-box"):
        c["inspect"] = gr.Checkbox(False, label="Inspect this run (record x_t, the predicted x0 and noise per step)",
                                   elem_id=f"{tab}-inspect")
        c["inspect_formula"] = gr.Markdown("*run with Inspect on to record the trajectory*",
                                           elem_id=f"{tab}-inspect-formula")
        c["inspect_step"] = gr.Slider(0, 1, value=0, step=1, label="Step", elem_id=f"{tab}-inspect-step")
        with gr.Row():
            for name in STRIPS:
                c[f"inspect_{name}"] = gr.Image(label=name, interactive=False, height=192, format="png",
                                                elem_id=f"{tab}-inspect-{name.replace('_', '')}")
        with gr.Row():
            c["inspect_decode"] = gr.Button("Decode this step with the first stage (x0 and x_t)",
                                            elem_id=f"{tab}-inspect-decode")
            c["inspect_decoded"] = gr.Gallery(label="First-stage decode", columns=2, height=200, format="png",
                                              elem_id=f"{tab}-inspect-decoded")
        for name in STRIPS:
            c[f"inspect_strip_{name}"] = gr.Gallery(
                label=f"filmstrip: {name}", columns=10, height=140, format="png",
                elem_id=f"{tab}-inspect-strip-{name.replace('_', '')}")
        c["inspect_json"] = gr.JSON(label="sigmas per step", elem_id=f"{tab}-inspect-json", visible=False)
        gr.Markdown("**Schedules**: the sigmas the sampler visits for each schedule at these steps (the final 0 is "
                    "off the log scale), the model's training sigmas as the reference, and the img2img start.")
        with gr.Row():
            c["plot_sigma"] = gr.LinePlot(first, x="step", y="log10 sigma", color="curve", title="log10 sigma",
                                          elem_id=f"{tab}-plot-sigma", height=300)
            c["plot_snr"] = gr.LinePlot(first, x="step", y="log-SNR", color="curve", title="log-SNR = -2 ln sigma",
                                        elem_id=f"{tab}-plot-snr", height=300)


def frames_at(ctx, tab: str, step, request: gr.Request | None):
    """The three frames (x_t, x0, noise) of the kept trajectory at `step`."""
    got = _kept(ctx, request, tab)
    if got is None or not len(got.trajectory):
        return gr.skip(), gr.skip(), gr.skip()
    t = got.trajectory
    i = max(0, min(int(step or 0), len(t) - 1))
    size = _view_size(t)
    return tuple(t.frame(name, i, size) for name in STRIPS)


def _view_size(t: Trajectory) -> tuple[int, int]:
    h, w = t.x0[0].shape[-2:]
    k = max(1, -(-128 // max(1, min(h, w))))
    return w * k, h * k


def after_run(ctx, tab: str, request: gr.Request | None):
    """Everything the Inspect view shows after a run: formula, slider range, frames of step 0, strips, JSON, card."""
    got = _kept(ctx, request, tab)
    if got is None:
        return (gr.skip(),) * 10
    t = got.trajectory
    n = len(t)
    which = "noise eps" if t.prediction != "flow" else "velocity v"
    formula = (f"**{t.prediction} prediction**: `{PREDICTION_FORMULAS.get(t.prediction, '')}`; the predicted "
               f"{which} = (x_t - x0) / sigma. {n} steps, sigma {t.sigma[0]:.4g} -> {t.sigma_next[-1]:.4g}.")
    size = _view_size(t)
    strips = [[(img, f"{i}: sigma {t.sigma[i]:.3g}") for i, img in enumerate(t.strip(name, size))] for name in STRIPS]
    return (formula, gr.Slider(0, max(1, n - 1), value=0, step=1), *frames_at(ctx, tab, 0, request), *strips,
            t.summary(), got.card or gr.skip())


def decode_step(ctx, tab: str, step, request: gr.Request | None):
    """x0 and x_t (x c_in) of the picked step through the model's real first stage."""
    from sd.pipeline import decode_latents

    got = _kept(ctx, request, tab)
    if got is None or not len(got.trajectory):
        raise gr.Error("run with Inspect on first", print_exception=False)
    t = got.trajectory
    i = max(0, min(int(step or 0), len(t) - 1))
    out = [(decode_latents(got.model, t.x0[i])[0], f"x0 at step {i}")]
    if t.shown_x(i) is not None:
        out.append((decode_latents(got.model, t.shown_x(i))[0], f"x_t x c_in at step {i}"))
    return out


def trajectory_api(ctx, tab: str, request: gr.Request | None):
    """/trajectory_<tab>: the session's last inspected run as lists of images (x_t, x0, noise) and its sigmas."""
    got = _kept(ctx, request, tab)
    if got is None:
        raise gr.Error(f"no inspected run in this session: call /generate_{tab} with inspect=True first",
                       print_exception=False)
    t = got.trajectory
    return (*[t.strip(name) for name in STRIPS], t.summary())


def wire(ctx, tab: str, c: dict, run, first: bool) -> None:
    """The Inspect view's events; `run` is the generate event, `first` says this tab registers `/card`."""
    step, fr = c["inspect_step"], [c[f"inspect_{n}"] for n in STRIPS]
    def frames(v, request: gr.Request):
        return frames_at(ctx, tab, v, request)

    step.change(frames, step, fr, api_visibility="private", queue=False)

    def after(request: gr.Request):
        return after_run(ctx, tab, request)

    outs = [c["inspect_formula"], step, *fr, *[c[f"inspect_strip_{n}"] for n in STRIPS], c["inspect_json"],
            c["card"]]
    run.then(after, None, outs, api_visibility="private", queue=False)

    def decode(v, request: gr.Request):
        return decode_step(ctx, tab, v, request)

    c["inspect_decode"].click(decode, step, c["inspect_decoded"], api_visibility="private")

    def traj(request: gr.Request):
        return trajectory_api(ctx, tab, request)

    c["inspect_api"] = gr.Button(visible=False)   # the endpoint's trigger; the API calls it by name
    c["inspect_api"].click(traj, None, [*[c[f"inspect_strip_{n}"] for n in STRIPS], c["inspect_json"]],
                           api_name=f"trajectory_{tab}")
    c["checkpoint"].input(lambda v: card_for(ctx, v), c["checkpoint"], c["card"], api_name="card" if first else None,
                          api_visibility="public" if first else "private", queue=False)
    comps, update = _plot_update(ctx, tab, c)
    for comp in comps:
        comp.change(update, comps, [c["plot_sigma"], c["plot_snr"]], api_visibility="private", queue=False)


def _tab_families(tab: str):
    return _app().family_tabs().get(tab, ())


__all__ = ["DEFAULTS", "Inspection", "PARAMS", "after_run", "build_card", "build_view", "card_for", "keep",
           "recording", "result", "schedule_frame", "tab_params", "trajectory_api", "wire"]
