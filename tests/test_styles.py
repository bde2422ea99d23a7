"""Prompt styles (sd.styles, issue 12 item 7): A1111's styles.csv read with the csv module, `{prompt}` replaced or
the style appended after ", " (A1111's merge_prompts), styles applied in order, the default file beside the models
folder, the CLI's --styles / --style, a bad file or an unknown style in one line."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sd.styles import apply_styles, default_styles_file, load_styles, merge_prompts, read_styles

from .test_cli import run_sd

CSV = ('name,prompt,negative_prompt\n'
       'cinematic,"cinematic still of {prompt}, film grain","cartoon, drawing"\n'
       'sharp,"sharp focus, 8k",\n'
       '"with, comma","line one\nline two","blurry"\n')


def write(tmp_path, text=CSV, name="styles.csv"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_merge_prompts_as_a1111():
    assert merge_prompts("cinematic still of {prompt}, film grain", "a cat") == "cinematic still of a cat, film grain"
    assert merge_prompts("sharp focus", " a cat ") == "a cat, sharp focus"
    assert merge_prompts("sharp focus", "") == "sharp focus"
    assert merge_prompts("", "a cat") == "a cat"
    assert merge_prompts("{prompt} and {prompt}", "x") == "x and x"


def test_read_and_apply_in_order(tmp_path):
    styles = read_styles(write(tmp_path))
    assert list(styles) == ["cinematic", "sharp", "with, comma"]
    assert styles["with, comma"].prompt == "line one\nline two"        # quoted commas and newlines
    p, n = apply_styles("a cat", "", styles, ["cinematic", "sharp"])
    assert p == "cinematic still of a cat, film grain, sharp focus, 8k"
    assert n == "cartoon, drawing"
    p, n = apply_styles("a cat", "ugly", styles, ["sharp", "cinematic"])
    assert p == "cinematic still of a cat, sharp focus, 8k, film grain" and n == "ugly, cartoon, drawing"
    assert apply_styles("a cat", "ugly", styles, []) == ("a cat", "ugly")


def test_old_text_column_bom_and_default_place(tmp_path):
    (tmp_path / "models").mkdir()
    write(tmp_path, "\ufeffname,text\nold,retro\n")
    assert default_styles_file(tmp_path / "models") == tmp_path.resolve() / "styles.csv"
    styles = load_styles(None, tmp_path / "models")
    assert styles["old"].prompt == "retro" and styles["old"].negative_prompt == ""
    assert load_styles(None, tmp_path / "nothing" / "models") == {}


@pytest.mark.parametrize("text, match", [
    ("title,body\na,b\n", "header row must name the columns name, prompt, negative_prompt"),
    ("", "header row must name"),
])
def test_bad_files_are_one_line(tmp_path, text, match):
    with pytest.raises(ValueError, match=match) as e:
        read_styles(write(tmp_path, text))
    assert "\n" not in str(e.value) and str(tmp_path) not in str(e.value)
    (tmp_path / "bin.csv").write_bytes(b"name,prompt\n\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="styles file bin.csv: not UTF-8"):
        read_styles(tmp_path / "bin.csv")
    with pytest.raises(ValueError, match="styles file gone.csv: no such file"):
        read_styles(tmp_path / "gone.csv")


def test_unknown_style_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"no such style 'nope' \(styles: cinematic, sharp, with, comma\)"):
        apply_styles("a", "", read_styles(write(tmp_path)), ["nope"])


def test_styles_on_the_cli(tiny_files, tmp_path, capsys):
    csv_path = write(tmp_path, "name,prompt,negative_prompt\nneon,\"neon {prompt}\",dark\n")
    common = ["generate", "--checkpoint", str(tiny_files("sd1")), "--width", "64", "--height", "64", "--steps", "1"]

    def image(name, *extra):
        r = run_sd(capsys, *common, "--out", str(tmp_path / name), *extra)
        assert r.returncode == 0, r.stderr
        return np.asarray(Image.open(tmp_path / name)).astype(int)

    styled = image("styled.png", "--prompt", "a cat", "--styles", str(csv_path), "--style", "neon")
    written = image("written.png", "--prompt", "neon a cat", "--negative-prompt", "dark")
    plain = image("plain.png", "--prompt", "a cat")
    assert np.array_equal(styled, written) and np.abs(styled - plain).mean() > 1
    r = run_sd(capsys, *common, "--prompt", "a", "--styles", str(csv_path), "--style", "nope", "--out",
               str(tmp_path / "x.png"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such style 'nope'" in r.stderr
