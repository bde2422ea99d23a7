"""Comparison grids (sd.grid): cells equal the single runs, the labels name the values, Stop keeps the cells done,
big grids ask first, A1111's value notation, one load per checkpoint at its own size, and the CLI."""
from __future__ import annotations

import json
import threading
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from sd import grid
from sd.demo import DEMO_CHECKPOINT
from sd.pipeline import GenerateParams, generate, load_model
from sd.pnginfo import parse_parameters, read_parameters

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO_CHECKPOINT)


def _base(**kw) -> GenerateParams:
    return GenerateParams(**{**dict(prompt=PROMPT, width=64, height=64, steps=3, cfg=5.0, seed=4), **kw})


def test_two_by_two_cells_equal_the_single_runs_and_the_labels_name_the_values(demo, monkeypatch) -> None:
    drawn = []
    real = grid.draw_grid
    monkeypatch.setattr(grid, "draw_grid", lambda *a, **k: drawn.append(a) or real(*a, **k))
    axes = [grid.parse_axis("sampler=euler,heun"), grid.parse_axis("cfg=3,7")]
    steps = []
    res = grid.run_grid(_base(), axes, lambda v: demo, progress=lambda d, t, s: steps.append((d, t)))
    assert [c.index for c in res.cells] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    for c in res.cells:
        p = replace(_base(), sampler=("euler", "heun")[c.index[0]], cfg=(3.0, 7.0)[c.index[1]])
        assert c.params == p
        assert c.image.tobytes() == generate(demo, p).images[0].tobytes()
    images, x_labels, y_labels, title = drawn[0]
    assert x_labels == ["Sampler: Euler", "Sampler: Heun"] and y_labels == ["CFG Scale: 3", "CFG Scale: 7"]
    assert title == "" and [[im is c.image for im in row] for row, c in zip(images, res.cells[::2])]
    assert steps[-1] == (12, 12) and len(steps) == 12          # one progress over the 4 x 3 steps of the grid
    assert "Sampler: Heun" in res.cells[1].infotext and "CFG scale: 3" in res.cells[1].infotext
    w, h = res.image.size
    assert w > 128 and h > 128                                  # two 64 px cells plus the label margins


def test_stop_after_two_cells_keeps_those_two(demo) -> None:
    stop = threading.Event()
    axes = [grid.parse_axis("seed=1-3"), grid.parse_axis("steps=1,2")]
    res = grid.run_grid(_base(), axes, lambda v: demo, stop=stop,
                        on_cell=lambda cell, done, total: stop.set() if done == 2 else None)
    assert res.stopped and res.total == 6 and [c.index for c in res.cells] == [(0, 0, 0), (1, 0, 0)]
    assert [c.params.seed for c in res.cells] == [1, 2] and all(c.image is not None for c in res.cells)
    assert res.image is not None
    stop.clear()                                                 # Stop during the third cell: it is dropped
    seen = []

    def progress(done, total, text):
        seen.append(text)
        if text == "cell 3/3, step 1/3":
            stop.set()

    res = grid.run_grid(_base(), [grid.parse_axis("seed=1-3"), grid.parse_axis("steps=3")], lambda v: demo,
                        stop=stop, progress=progress)
    assert res.stopped and [c.params.seed for c in res.cells] == [1, 2] and seen[-1] == "cell 3/3, step 1/3"


def test_over_300_cells_asks_first(demo) -> None:
    axes = [grid.parse_axis("seed=1-20"), grid.parse_axis("steps=1-16")]
    with pytest.raises(ValueError, match="320 cells, over the 300"):
        grid.run_grid(_base(), axes, lambda v: demo)

    class Loaded(Exception):
        pass

    def load(v):
        raise Loaded

    with pytest.raises(Loaded):                                  # confirmed: it goes on to load the model
        grid.run_grid(_base(), axes, load, confirm=True)
    with pytest.raises(ValueError, match="1001 cells; at most 1000"):   # never, even confirmed
        grid.run_grid(_base(), [grid.parse_axis("seed=1-1001")], load, confirm=True)
    small = [grid.parse_axis("seed=1-20"), grid.parse_axis("steps=1-15")]   # exactly 300: no question
    with pytest.raises(Loaded):
        grid.run_grid(_base(), small, load)


@pytest.mark.parametrize("spec, message", [
    ("cfg=3,abc", "cfg=3,abc: 'abc' is not a number"),
    ("steps=1.5", "steps=1.5: '1.5' is not a whole number"),
    ("colour=1,2", "unknown grid axis 'colour'"),
    ("sampler=euler,warp", "unknown sampler 'warp'"),
    ("schedule=karras,nope", "unknown schedule 'nope'"),
    ("sdxl_target_size=1024", "'1024' is not a size like 1024x768"),
    ("cfg=", "cfg: no values given"),
])
def test_bad_axis_values_are_one_line(spec, message) -> None:
    with pytest.raises(ValueError) as e:
        grid.parse_axis(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_values_parse_as_a1111() -> None:
    v = lambda s: grid.parse_axis(s).values  # noqa: E731
    assert v("steps=1-5") == [1, 2, 3, 4, 5]
    assert v("steps=1-10 (+2)") == [1, 3, 5, 7, 9]
    assert v("steps=10-1 (-3)") == [10, 7, 4, 1]
    assert v("steps=1-10 [4]") == [1, 4, 7, 10]
    assert v("seed=-1, 5, 7-8") == [-1, 5, 7, 8]
    assert v("cfg=0.5-1.5 (+0.25)") == [0.5, 0.75, 1.0, 1.25, 1.5]
    assert v("cfg=1-2 [3]") == [1.0, 1.5, 2.0]
    assert v("cfg=7, 3") == [7.0, 3.0]
    assert v("sampler=Euler a, DPM++ 2M Karras, heun") == [("euler_ancestral", None), ("dpmpp_2m", "karras"),
                                                            ("heun", None)]
    assert v("schedule=Karras,sgm_uniform") == ["karras", "sgm_uniform"]
    assert v('prompt=red,"blue, dark"') == ["red", "blue, dark"]
    assert v("sdxl_original_size=1024x768, 512x512") == [(1024, 768), (512, 512)]


def test_cells_of_the_other_axes() -> None:
    base = _base(prompt="a red <lora:ink:0.3> circle", negative_prompt="red noise")
    axes = [grid.parse_axis("prompt=red,green"), grid.parse_axis("lora=0,0.5"),
            grid.parse_axis("sdxl_original_size=1024x768")]
    cells = grid.plan_cells(base, axes)
    assert [(c.params.prompt, c.params.negative_prompt) for c in cells] == [
        ("a red <lora:ink:0> circle", "red noise"), ("a green <lora:ink:0> circle", "green noise"),
        ("a red <lora:ink:0.5> circle", "red noise"), ("a green <lora:ink:0.5> circle", "green noise")]
    assert {c.params.sdxl_original_size for c in cells} == {(768, 1024)}      # stored (height, width)
    crop = grid.plan_cells(base, [grid.parse_axis("sdxl_crop=64x0"), grid.parse_axis("shift=1,3")])
    assert [(c.params.sdxl_crop, c.params.inputs) for c in crop] == [((0, 64), {"shift": 1.0}),
                                                                     ((0, 64), {"shift": 3.0})]
    with pytest.raises(ValueError, match="'blue' .* is not in the prompt"):
        grid.plan_cells(base, [grid.parse_axis("prompt=blue,green")])
    with pytest.raises(ValueError, match="the prompt has none"):
        grid.plan_cells(_base(), [grid.parse_axis("lora=0,1")])


def test_checkpoint_axis_loads_each_once_at_its_own_size(demo, tiny_files) -> None:
    """Each checkpoint's cells get the size `size_of` gives it (the CLI and the app: the preset's; here 128 for
    the tiny SD1 file, to stay fast)."""
    tiny = load_model(tiny_files("sd1"))
    loads = []

    def load(v):
        loads.append(v)
        return demo if v == "demo" else tiny

    sizes = lambda m: (64, 64) if m is demo else (128, 96)  # noqa: E731
    axes = [grid.parse_axis("checkpoint=demo,tiny"), grid.parse_axis("seed=1,2")]
    res = grid.run_grid(_base(steps=1), axes, load, size_of=sizes)
    assert loads == ["demo", "tiny"]                      # grouped: one load per checkpoint
    assert [c.index for c in res.cells] == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]
    assert [c.image.size for c in res.cells] == [(64, 64), (64, 64), (128, 96), (128, 96)]
    p = replace(_base(steps=1), seed=2, width=128, height=96)
    assert res.cells[3].image.tobytes() == generate(tiny, p).images[0].tobytes()
    assert "Model: sd1" in res.cells[3].infotext and res.image.size[0] > 2 * 64


def test_cli_grid_writes_the_grid_and_each_cell_with_its_infotext(tmp_path, capsys) -> None:
    from sd.__main__ import main

    out = tmp_path / "g"
    rc = main(["grid", "--x", "sampler=euler,heun", "--y", "cfg=3,7", "--prompt", PROMPT, "--steps", "2",
               "--out", str(out)])
    assert rc == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["cells_planned"] == 4 and len(info["cells"]) == 4 and not info["stopped"]
    cell = parse_parameters(read_parameters(str(out / "cell-1-1-0.png")))
    assert cell["Sampler"] == "Heun" and cell["CFG scale"] == "7" and (cell["Size-1"], cell["Size-2"]) == ("64", "64")
    assert Image.open(out / "grid.png").size[0] > 128
    assert main(["grid", "--x", "cfg=3,x", "--prompt", "p", "--out", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: cfg=3,x: 'x' is not a number or a range like 1-5, 1.5-3 (+0.5), 1-2 [5]"
    assert main(["grid", "--x", "seed=1-301", "--prompt", "p", "--out", str(tmp_path / "h")]) == 2
    assert "--yes" in capsys.readouterr().err and not (tmp_path / "h").exists()


# ---------------------------------------------------------------------------------------------- the app's API


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The app on an empty models folder (the demo model only), driven through gradio_client."""
    from gradio_client import Client

    import app
    from sd.pipeline import ModelCache

    from .serving import serving

    outputs = tmp_path_factory.mktemp("grid-outputs")
    demo = app.build_app(tmp_path_factory.mktemp("grid-models"), device="cpu", dtype="float32", cache=ModelCache(),
                         outputs_dir=outputs)
    with serving(demo, outputs) as url:
        yield Client(url, verbose=False)


FORM = dict(prompt=PROMPT, negative_prompt="", sampler="Euler", schedule="Normal", steps=2, cfg=5.0, seed=3)


def test_grid_through_the_api_equals_the_single_runs(client, demo) -> None:
    image, cells, status = client.predict(**FORM, x_type="sampler", x_values="euler, heun", y_type="seed",
                                          y_values="3, 4", api_name="/grid")
    assert status == "done: 4 cells"
    assert [c["caption"] for c in cells] == ["Sampler: Euler, Seed: 3", "Sampler: Heun, Seed: 3",
                                             "Sampler: Euler, Seed: 4", "Sampler: Heun, Seed: 4"]
    p = GenerateParams(prompt=PROMPT, width=64, height=64, steps=2, cfg=5.0, seed=4, sampler="heun")
    assert Image.open(cells[3]["image"]).tobytes() == generate(demo, p).images[0].tobytes()
    assert parse_parameters(read_parameters(cells[3]["image"]))["Sampler"] == "Heun"
    assert Image.open(image).size[0] > 2 * 64
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="301 cells, over the 300"):
        client.predict(**FORM, x_type="seed", x_values="1-301", api_name="/grid")


def test_attention_maps_per_token_through_the_api(client, demo) -> None:
    from sd import attention_maps as am

    gallery, info = client.predict(**FORM, width=64, height=64, api_name="/attention_sd1")
    assert [g["caption"] for g in gallery] == ["1 a (weight 1.00)", "2 red (weight 1.00)", "3 circle (weight 1.00)",
                                               "4 on (weight 1.00)", "5 a (weight 1.00)", "6 blue (weight 1.00)",
                                               "7 background (weight 1.00)"]
    assert [w["word"] for w in info["words"]] == ["a", "red", "circle", "on", "a", "blue", "background"]
    p = GenerateParams(prompt=PROMPT, width=64, height=64, steps=2, cfg=5.0, seed=3, sampler="euler")
    res, maps = am.generate_with_maps(demo, p)
    want = am.overlay(res.images[0], maps.token_map(3))
    assert Image.open(gallery[2]["image"]).convert("RGB").tobytes() == want.tobytes()
    assert info["total"] == maps.total and info["evaluations"] == 2


def test_z_axis_draws_one_titled_grid_per_value_stacked(monkeypatch) -> None:
    axes = [grid.parse_axis("cfg=3,7"), None, grid.parse_axis("sdxl_target_size=1024x768,512x512")]
    cells = grid.plan_cells(_base(), axes)
    for k, c in enumerate(cells):
        c.image = Image.new("RGB", (64, 64), (10 + 40 * k, 200, 30))
    drawn = []
    real = grid.draw_grid
    monkeypatch.setattr(grid, "draw_grid", lambda *a, **k: drawn.append(a) or real(*a, **k))
    out = grid.grid_image(grid.GridResult(cells, axes, total=4))
    assert [(d[1], d[2], d[3]) for d in drawn] == [(["CFG Scale: 3", "CFG Scale: 7"], [""], "Target size: 1024x768"),
                                                   (["CFG Scale: 3", "CFG Scale: 7"], [""], "Target size: 512x512")]
    parts = [real(*d) for d in drawn]
    assert out.size == (parts[0].width, parts[0].height + parts[1].height)
    assert [c.params.sdxl_target_size for c in cells] == [(768, 1024)] * 2 + [(512, 512)] * 2
    # the 64 px cells are drawn enlarged to 128 px: the first cell's colour covers exactly a 128 x 128 box
    first = np.asarray(parts[0])
    assert np.all(first == np.array([10, 200, 30]), axis=-1).sum() == 128 * 128
