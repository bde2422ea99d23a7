"""The Grid tab (issue 13 part 5): A1111's X/Y/Z plot over the axes of `sd.grid`, across checkpoints of any family.

One prompt and base settings, up to three axes (a kind and its values in A1111's notation), a box to confirm a grid
of more than 300 cells; Generate shows one progress over the whole grid, Stop ends it between cells and keeps the
cells done. The labelled grid and every cell are saved to the outputs folder (each cell with its own infotext).
API: `/grid` (named parameters as the form) -> (grid image, gallery of cells, status); `/stop_grid`.

app.py calls `build_grid_tab(ctx)` inside its tabs; the checkpoints come from the app's listing
(app.tab_choices over every generate tab), loaded through its shared ModelCache, each at its preset's size
unless width and height are given.
"""
from __future__ import annotations

import sys
import threading

import gradio as gr

from sd import grid
from sd.pnginfo import save_png
from sd.samplers import DISPLAY_NAMES, sampler_from_display
from sd.schedules import SCHEDULE_DISPLAY_NAMES

TAB = "grid"
NONE = "Nothing"
AXIS_CHOICES = [NONE] + list(grid.AXES)
NAMES = ("checkpoint", "prompt", "negative_prompt", "sampler", "schedule", "steps", "cfg", "seed", "width", "height",
         "x_type", "x_values", "y_type", "y_values", "z_type", "z_values", "confirm")
DEFAULTS = {"negative_prompt": "", "sampler": "Euler", "schedule": "Normal", "steps": 20, "cfg": 7.0, "seed": 0,
            "width": 0, "height": 0, "y_type": NONE, "y_values": "", "z_type": NONE, "z_values": "",
            "confirm": False}


def _app():
    return sys.modules.get("app") or sys.modules["__main__"]


def checkpoint_choices(ctx) -> list[tuple[str, str]]:
    """Every checkpoint a generate tab lists (the demo model first), each once."""
    app = _app()
    entries = ctx.index.scan()
    out: dict[str, str] = {}
    for t in app.family_tabs():
        for label, value in app.tab_choices(ctx, t, entries):
            out.setdefault(value, label)
    return [(label, value) for value, label in out.items()]


def fill_values(ctx, kind: str, values: str):
    """Values for an axis kind just chosen: for "checkpoint" with none typed, every listed checkpoint (csv-quoted);
    otherwise the values stay."""
    if kind != "checkpoint" or (values or "").strip():
        return gr.skip()
    import csv
    import io

    out = io.StringIO()
    csv.writer(out).writerow([v for _, v in checkpoint_choices(ctx)])
    return out.getvalue().strip()


def _model_of(ctx, value: str):
    """(LoadedModel, preset (width, height)) of a checkpoint value, refused in one line if no tab runs it."""
    app = _app()
    path, spec, is_demo = app.selection(ctx, value)
    if app.tab_of_family(spec.family) is None:
        raise ValueError(f"{path.name} is a {spec.family} checkpoint, which this app cannot run yet")
    model = ctx.cache.get(path, ctx.device, ctx.dtype)
    preset = app.preset_for(model.spec, ctx.presets, is_demo=is_demo)
    return model, (int(preset["width"]), int(preset["height"]))


def axes_of(s: dict) -> list:
    axes = []
    for k in "xyz":
        kind = s.get(f"{k}_type") or NONE
        if kind == NONE:
            axes.append(None)
            continue
        if s.get(f"{k}_values") is not None and not isinstance(s[f"{k}_values"], str):
            raise ValueError(f"{k}_values must be text")
        a = grid.make_axis(kind, _app()._text({f"{k}_values": s.get(f"{k}_values") or ""}, f"{k}_values"))
        axes.append(a)
    used = [a.axis.name for a in axes if a is not None]
    if not used:
        raise ValueError("choose at least one axis (X) and its values")
    if len(set(used)) != len(used):
        raise ValueError(f"an axis is used twice ({', '.join(used)}); use each at most once")
    return axes


def run(ctx, s: dict, stop: threading.Event, progress=None) -> tuple:
    """(grid image path, [(cell path, caption)], status) of one grid request (missing parameters: DEFAULTS)."""
    from sd.pipeline import GenerateParams

    app = _app()
    s = {**DEFAULTS, **{k: v for k, v in s.items() if v is not None}}
    if not s.get("checkpoint"):
        s["checkpoint"] = next((v for _, v in checkpoint_choices(ctx)), None)
        if s["checkpoint"] is None:
            raise ValueError("no checkpoint: put one in the models folder and press Refresh")
    if not s.get("x_type"):
        raise ValueError("x_type is needed: the kind of the X axis (sampler, cfg, seed, ...)")
    axes = axes_of(s)
    for a in axes:   # every checkpoint of the axis known before anything runs
        if a is not None and a.axis.name == "checkpoint":
            for v in a.values:
                app.selection(ctx, v, probe=False)
    prompt = app._text(s, "prompt")
    sampler, sched = sampler_from_display(str(s["sampler"]))
    width, height = app._num(s, "width"), app._num(s, "height")
    models: dict = {}

    def load(value):
        value = s["checkpoint"] if value is None else value
        models[value] = _model_of(ctx, value)
        return models[value][0]

    def size_of(model):
        own = next(size for m, size in models.values() if m is model)
        return (width or own[0], height or own[1])

    base_model = load(None)
    base = GenerateParams(prompt=prompt, negative_prompt=app._text(s, "negative_prompt"),
                          width=size_of(base_model)[0], height=size_of(base_model)[1], steps=app._num(s, "steps"),
                          cfg=app._num(s, "cfg", float), seed=app._num(s, "seed"), sampler=sampler,
                          schedule=sched or app._name(s["schedule"], app.SCHEDULE_OF_DISPLAY, SCHEDULE_DISPLAY_NAMES),
                          models_dir=str(ctx.index.root))

    def report(done: int, total: int, text: str) -> None:
        if progress is not None:
            progress((done, total), desc=text, unit="steps")

    result = grid.run_grid(base, axes, load, size_of=size_of, confirm=bool(s["confirm"]), progress=report, stop=stop)
    cells = []
    for c in result.cells:
        path = save_png(c.image, c.infotext, ctx.outputs_dir, c.params.seed)
        labels = [a.labels[i] for a, i in zip(result.axes, c.index) if a is not None]
        cells.append((str(path), ", ".join(labels)))
    image = None
    if result.image is not None:
        text = "Grid: " + "; ".join(f"{n} = {a.axis.name}={a.source}" for n, a in zip("XYZ", result.axes)
                                   if a is not None) + f"\n{prompt}"
        image = str(save_png(result.image, text, ctx.outputs_dir, base.seed))
    status = (f"stopped: {len(result.cells)} of {result.total} cells done" if result.stopped
              else f"done: {len(result.cells)} cells")
    status += "".join(f"  \n*{n}*" for n in result.notes)
    return image, cells, status


def _grid_fn(ctx):
    def grid_run(*args):
        s, (request, progress) = dict(zip(NAMES, args)), args[len(NAMES):]
        key = (getattr(request, "session_hash", None), TAB)
        stop = threading.Event()
        with ctx.lock:
            ctx.stops[key] = stop
        try:
            return run(ctx, s, stop, progress)
        except _app().USER_ERRORS as e:
            raise gr.Error(str(e).splitlines()[0] if str(e) else type(e).__name__, print_exception=False) from None
        finally:
            with ctx.lock:
                if ctx.stops.get(key) is stop:
                    del ctx.stops[key]

    import inspect

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    grid_run.__signature__ = inspect.Signature(
        [inspect.Parameter(n, kind, default=None) for n in NAMES]
        + [inspect.Parameter("request", kind, default=None, annotation=gr.Request),
           inspect.Parameter("progress", kind, default=gr.Progress())])
    grid_run.__annotations__ = {"request": gr.Request}
    return grid_run


def build_grid_tab(ctx) -> dict:
    """The Grid tab; returns its components by name."""
    c: dict = {}
    choices = checkpoint_choices(ctx)
    with gr.Tab("Grid", id=TAB, elem_id="tab-grid"):
        gr.Markdown("An X/Y/Z comparison grid (A1111's X/Y/Z plot). Values: comma lists, ranges `1-5`, "
                    "`1-10 (+2)`, `1-10 [4]`; sizes `1024x768`; crop `LEFTxTOP`; checkpoint: names from the list "
                    "(each at its own size unless width and height are set); lora: the weight of the prompt's "
                    "`<lora:NAME:w>` tags; prompt (S/R): the first value is searched and replaced by each.")
        with gr.Row():
            c["checkpoint"] = gr.Dropdown(choices, value=choices[0][1] if choices else None, label="Checkpoint",
                                          allow_custom_value=True, elem_id="grid-checkpoint", scale=3)
        c["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="grid-prompt")
        c["negative_prompt"] = gr.Textbox(label="Negative prompt", elem_id="grid-negative")
        with gr.Row():
            c["sampler"] = gr.Dropdown(list(DISPLAY_NAMES.values()), value="Euler", label="Sampler",
                                       elem_id="grid-sampler")
            c["schedule"] = gr.Dropdown(list(SCHEDULE_DISPLAY_NAMES.values()), value="Normal", label="Schedule type",
                                        elem_id="grid-schedule")
            c["steps"] = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="grid-steps")
            c["cfg"] = gr.Slider(1, 30, value=7.0, step=0.5, label="CFG scale", elem_id="grid-cfg")
        with gr.Row():
            c["seed"] = gr.Number(0, label="Seed", precision=0, elem_id="grid-seed")
            c["width"] = gr.Number(0, label="Width (0 = each checkpoint's own)", precision=0, elem_id="grid-width")
            c["height"] = gr.Number(0, label="Height (0 = own)", precision=0, elem_id="grid-height")
        for k, default in (("x", "sampler"), ("y", NONE), ("z", NONE)):
            with gr.Row():
                c[f"{k}_type"] = gr.Dropdown(AXIS_CHOICES, value=default, label=f"{k.upper()} type", scale=1,
                                             elem_id=f"grid-{k}-type")
                c[f"{k}_values"] = gr.Textbox(label=f"{k.upper()} values", scale=3, elem_id=f"grid-{k}-values",
                                              value="Euler, Heun" if k == "x" else "")
        c["confirm"] = gr.Checkbox(False, label=f"Run a grid over {grid.MAX_UNCONFIRMED} cells",
                                   elem_id="grid-confirm")
        with gr.Row():
            c["run"] = gr.Button("Generate grid", variant="primary", elem_id="grid-run")
            c["stop"] = gr.Button("Stop", variant="stop", elem_id="grid-stop")
        c["status"] = gr.Markdown("", elem_id="grid-status")
        c["image"] = gr.Image(label="Grid", interactive=False, type="filepath", elem_id="grid-image", format="png")
        c["cells"] = gr.Gallery(label="Cells (each saved with its infotext)", columns=4, elem_id="grid-cells",
                                format="png")
    for k in "xyz":   # a checkpoint axis starts with every listed checkpoint (the user then removes some)
        c[f"{k}_type"].change(lambda kind, values: fill_values(ctx, kind, values), [c[f"{k}_type"], c[f"{k}_values"]],
                              c[f"{k}_values"], api_visibility="private", queue=False)
    c["run"].click(_grid_fn(ctx), [c[k] for k in NAMES], [c["image"], c["cells"], c["status"]], api_name="grid",
                   concurrency_id="generate", concurrency_limit=ctx.concurrency, show_progress_on=[c["status"]])

    def stop(request: gr.Request) -> str:
        return _app().stop_run(ctx, TAB, request)

    c["stop"].click(stop, None, c["status"], api_name="stop_grid", concurrency_limit=None, queue=False)
    return c


__all__ = ["build_grid_tab", "checkpoint_choices", "run"]
