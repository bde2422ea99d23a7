"""The "Cross-attention maps" accordion of every text-conditioned generate tab (issue 13 part 3, DAAM).

Its button runs the tab's current form once with the attention recorded (`sd.attention_maps`: off in every other
run), shows the image, a list of the prompt's words and tokens with their A1111 weights, and the chosen one's map
as a heat map over the image. The same run is the API endpoint `/attention_<tab>` (the tab's generate parameters):
a gallery of one heat map per prompt token (caption: position, token, weight) and the tokens / words as JSON.

app.py calls `build_view(ctx, tab, c)` once per tab, after the tab's own form is wired; nothing else. The request
is read exactly as the tab's Generate reads it (app.fill_defaults, app._params, app._load, app.family_inputs), so the
image equals the first image of the same Generate request; it is shown, not saved.
"""
from __future__ import annotations

import inspect
import random
import sys

import gradio as gr
from PIL import Image

from sd import attention_maps as am


def _app():
    """The app module (imported as `app`, or run as `python app.py`)."""
    return sys.modules.get("app") or sys.modules["__main__"]


def has_view(tab: str) -> bool:
    """Tabs whose families take a prompt (their networks cross-attend to it)."""
    return any(f.text for f in _app().family_tabs().get(tab, ()))


def run_with_maps(ctx, tab: str, s: dict, progress=None):
    """(image, AttentionMaps, seed) of the tab's request `s` (the first image of its first batch)."""
    app = _app()
    s = app.fill_defaults(ctx, tab, s)
    seed = app._num(s, "seed")
    seed = seed if seed >= 0 else random.randrange(2**32 - 1)
    p = app._params(s, seed)
    model, refiner = app._load(ctx, tab, s)
    if refiner is not None:
        raise ValueError("attention maps record one checkpoint: set the refiner to None")
    p.inputs, finish, _ = app.family_inputs(model.family, s, p.width, p.height)
    p.models_dir = str(ctx.index.root)

    def on_step(info: dict) -> None:
        if progress is not None:
            progress((info["step"] + 1, info["total"]), desc=f"step {info['step'] + 1}/{info['total']}",
                     unit="steps")

    res, maps = am.generate_with_maps(model, p, callback=on_step)
    return finish(res.images[0]), maps, seed


def shown(image):
    """The image as the view shows it: small ones (the demo's 64 px) enlarged by a whole factor, nearest neighbour
    (the heat map is then upsampled to that size)."""
    w, h = _app().preview_size(image.width, image.height)
    return image if (w, h) == image.size else image.resize((w, h), Image.NEAREST)


def token_gallery(image, maps: am.AttentionMaps) -> list[tuple]:
    """One heat map over the image per prompt token, captioned "I token (weight W)"."""
    return [(am.overlay(image, maps.token_map(i)), f"{i} {am.display_token(maps.tokens[i])} (weight "
             f"{maps.weights[i]:.2f})") for i in maps.prompt_entries()]


def _one_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _handler(ctx, tab: str, names: tuple[str, ...], api: bool):
    """The callback of the button (api False: image, choices, first overlay, JSON, state, status) or of the API
    endpoint (api True: gallery of token maps, JSON). Its signature names the tab's parameters, all optional."""

    def attention(*args):
        s, (request, progress) = dict(zip(names, args)), args[len(names):]
        try:
            image, maps, seed = run_with_maps(ctx, tab, s, progress)
        except _app().USER_ERRORS as e:
            raise gr.Error(_one_line(e), print_exception=False) from None
        info = maps.summary()
        if api:
            return token_gallery(image, maps), info
        ch = am.choices(maps)
        image = shown(image)
        first = am.overlay(image, am.map_for_choice(maps, ch[0])) if ch else image
        status = (f"seed {seed}: {len(maps.words)} words, {maps.evaluations} conditional evaluations, "
                  f"{maps.layers} attention layers; the maps sum to {maps.total:g} at every position")
        return (image, gr.Dropdown(choices=ch, value=ch[0] if ch else None), first, info, (image, maps), status)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    attention.__signature__ = inspect.Signature(
        [inspect.Parameter(n, kind, default=None) for n in names]
        + [inspect.Parameter("request", kind, default=None, annotation=gr.Request),
           inspect.Parameter("progress", kind, default=gr.Progress())])
    attention.__annotations__ = {"request": gr.Request}
    attention.__name__ = attention.__qualname__ = f"attention_{tab}" if api else f"attention_view_{tab}"
    return attention


def show_choice(state, choice):
    """The heat map of the picked word or token over the kept image."""
    if not state or not choice:
        return gr.skip()
    image, maps = state
    try:
        return am.overlay(image, am.map_for_choice(maps, choice))
    except ValueError as e:
        raise gr.Error(_one_line(e), print_exception=False) from None


def build_view(ctx, tab: str, c: dict) -> None:
    """The accordion and its events (button, token picker, the hidden API trigger of `/attention_<tab>`)."""
    if not has_view(tab):
        return
    names = _app().tab_inputs(tab)
    with gr.Accordion("Cross-attention maps (DAAM): where each prompt word looks", open=False,
                      elem_id=f"{tab}-attn"):
        gr.Markdown("Runs the form above once with the cross-attention recorded: for every image position, the "
                    "softmax probabilities of the prompt's tokens, summed over heads and layers and averaged over "
                    "the steps (conditional branch only; Tang et al. 2022). SD3: the image-to-text part of the "
                    "joint attention. The image is not saved.")
        with gr.Row():
            c["attn_run"] = gr.Button("Generate with attention maps", elem_id=f"{tab}-attn-run")
            c["attn_status"] = gr.Markdown("", elem_id=f"{tab}-attn-status")
        with gr.Row():
            c["attn_image"] = gr.Image(label="Image", interactive=False, elem_id=f"{tab}-attn-image", height=256)
            with gr.Column():
                c["attn_choice"] = gr.Dropdown([], label="Word or token (A1111 weight)", elem_id=f"{tab}-attn-token")
                c["attn_overlay"] = gr.Image(label="Heat map", interactive=False, elem_id=f"{tab}-attn-overlay",
                                             height=256)
        c["attn_json"] = gr.JSON(label="Tokens and words", elem_id=f"{tab}-attn-json")
        c["attn_state"] = gr.State(None)
        c["attn_gallery"] = gr.Gallery(visible=False, format="png")   # the API's output: one heat map per token
    inputs = [c[k] for k in names]
    c["attn_run"].click(_handler(ctx, tab, names, api=False), inputs,
                        [c["attn_image"], c["attn_choice"], c["attn_overlay"], c["attn_json"], c["attn_state"],
                         c["attn_status"]], api_visibility="private", concurrency_id="generate",
                        concurrency_limit=ctx.concurrency, show_progress_on=[c["attn_status"]])
    c["attn_choice"].change(show_choice, [c["attn_state"], c["attn_choice"]], c["attn_overlay"],
                            api_visibility="private", queue=False)
    trigger = gr.Button(visible=False)
    trigger.click(_handler(ctx, tab, names, api=True), inputs, [c["attn_gallery"], c["attn_json"]],
                  api_name=f"attention_{tab}", concurrency_id="generate", concurrency_limit=ctx.concurrency)


__all__ = ["build_view", "has_view", "run_with_maps", "show_choice", "token_gallery"]
