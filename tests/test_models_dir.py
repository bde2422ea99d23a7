"""Finding checkpoints (sd.models_dir), the presets (sd.presets), the download command and the preview colours."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from sd.detect import preset_predictions
from sd.families import FAMILIES, get_family
from sd.models_dir import ModelIndex, by_tab, checkpoint_files, resolve_models_dir
from sd.presets import load_presets, preset_for
from sd.preview import SD_FACTORS, SDXL_BIAS, SDXL_FACTORS, latent_to_rgb, preview_every, preview_image
from sd.samplers import SAMPLERS
from sd.schedules import SCHEDULES


def test_resolve_models_dir():
    assert resolve_models_dir("x", env={"SD_MODELS_DIR": "y"}) == Path("x")
    assert resolve_models_dir(None, env={"SD_MODELS_DIR": "y"}) == Path("y")
    assert resolve_models_dir(None, env={}) == Path("models")


def test_a1111_and_comfyui_layouts(tmp_path, tiny_files):
    a1111 = tmp_path / "a1111"
    (a1111 / "Stable-diffusion" / "sub").mkdir(parents=True)
    (a1111 / "Lora").mkdir()
    os.link(tiny_files("sd1"), a1111 / "Stable-diffusion" / "sub" / "one.safetensors")
    os.link(tiny_files("sd1"), a1111 / "Lora" / "not-a-checkpoint.safetensors")  # other folders are not scanned
    comfy = tmp_path / "comfy"
    (comfy / "models" / "checkpoints").mkdir(parents=True)
    os.link(tiny_files("sdxl_base"), comfy / "models" / "checkpoints" / "xl.safetensors")
    assert [p.name for p in checkpoint_files(a1111)] == ["one.safetensors"]
    assert [p.name for p in checkpoint_files(comfy)] == ["xl.safetensors"]
    entries = ModelIndex(comfy).scan()
    assert [(e.name, e.family, e.tab) for e in entries] == [("models/checkpoints/xl.safetensors", "sdxl-base", "sdxl")]
    assert ModelIndex(a1111).resolve("one") == a1111 / "Stable-diffusion" / "sub" / "one.safetensors"
    with pytest.raises(FileNotFoundError, match="no such checkpoint in the models folder"):
        ModelIndex(a1111).resolve("two")


def test_fifty_files_list_from_the_cache(tmp_path, tiny_files):
    """50 files: the first scan reads 50 headers, a rescan reads none, a touched file is read again."""
    for i in range(50):  # hard links (cheap), except m07, a copy whose mtime can change alone
        (shutil.copyfile if i == 7 else os.link)(tiny_files("sd1"), tmp_path / f"m{i:02d}.safetensors")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    index = ModelIndex(tmp_path)
    t0 = time.perf_counter()
    entries = index.scan()
    first = time.perf_counter() - t0
    assert len(entries) == 50 and {e.family for e in entries} == {"sd1"} and index.header_reads == 50
    t0 = time.perf_counter()
    again = index.scan()
    rescan = time.perf_counter() - t0
    assert index.header_reads == 50 and [e.name for e in again] == [e.name for e in entries]
    assert rescan < 0.5, f"rescan took {rescan:.2f} s"
    assert first < 30, f"first scan took {first:.2f} s"
    st = (tmp_path / "m07.safetensors").stat()
    os.utime(tmp_path / "m07.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    index.scan()
    assert index.header_reads == 51


def test_flat_folder_leaves_lora_embedding_and_vae_folders_to_their_own_lists(tmp_path, tiny_files):
    """A flat models folder (no A1111 / ComfyUI checkpoint sub-folder) is listed whole, its loras/ vae/ embeddings/
    (and A1111's Lora/ VAE/) sub-folders and SD3's text-encoder folders (text_encoders/, ComfyUI's clip/) excepted: those files are not checkpoints, they are listed by their kind,
    so the banner does not call them unusable; a checkpoint in any other sub-folder is still listed."""
    from safetensors.torch import save_file

    from sd.models_dir import extra_files

    (tmp_path / "sub").mkdir()
    os.link(tiny_files("sd1"), tmp_path / "sd1.safetensors")
    os.link(tiny_files("sd1"), tmp_path / "sub" / "two.safetensors")
    for folder, name in (("loras", "style.safetensors"), ("Lora", "old.safetensors"), ("vae", "v.safetensors"),
                         ("VAE", "w.safetensors"), ("embeddings", "e.safetensors"),
                         ("text_encoders", "clip_l.safetensors"), ("clip", "t5xxl_fp16.safetensors")):
        (tmp_path / folder).mkdir()
        save_file({"x": torch.zeros(2)}, str(tmp_path / folder / name))
    assert [p.relative_to(tmp_path).as_posix() for p in checkpoint_files(tmp_path)] == ["sd1.safetensors",
                                                                                        "sub/two.safetensors"]
    assert sorted(extra_files("LoRA", tmp_path)) == ["old.safetensors", "style.safetensors"]
    assert sorted(extra_files("VAE", tmp_path)) == ["v.safetensors", "w.safetensors"]
    assert sorted(extra_files("embedding", tmp_path)) == ["e.safetensors"]
    entries = ModelIndex(tmp_path).scan()
    assert "unusable" not in by_tab(entries)     # what app.banner lists as "Not listed"
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        ModelIndex(tmp_path).resolve("loras/style.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")   # a bad file in the folder itself still shows
    assert [e.name for e in by_tab(ModelIndex(tmp_path).scan())["unusable"]] == ["junk.safetensors"]


def test_ckpt_is_detected_on_selection_and_bad_files_are_reported(tmp_path, tiny_files):
    os.link(tiny_files("sd1", ".ckpt"), tmp_path / "old.ckpt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    index = ModelIndex(tmp_path)
    groups = by_tab(index.scan())
    assert [e.name for e in groups["unsorted"]] == ["old.ckpt"]
    assert [e.name for e in groups["unusable"]] == ["broken.safetensors"]
    assert "not a safetensors file" in groups["unusable"][0].error
    entry = index.detect(tmp_path / "old.ckpt")
    assert (entry.family, entry.tab) == ("sd1", "sd1")
    assert [e.tab for e in index.scan() if e.name == "old.ckpt"] == ["sd1"]   # cached from now on


def test_presets_are_complete_and_agree_with_detection():
    presets = load_presets()
    assert {"sd1", "sd2", "sd2-v", "sdxl-base", "sdxl-refiner", "demo", "sd3", "ldm"} <= set(presets)
    for p in presets.values():
        assert p["sampler"] in SAMPLERS and p["schedule"] in SCHEDULES, p["name"]
        assert p["width"] % 8 == 0 and p["height"] % 8 == 0
    # detection takes the prediction type from the presets wherever they agree; SD 2.x (eps 512 / v 768) is probed
    known = preset_predictions()
    assert known["sd1"] == "eps" and known["sdxl-base"] == "eps" and known["sd2-x4-upscaler"] == "v"
    assert known["sd2-unclip-h"] == "v" and "sd2" not in known
    assert (presets["sd2-v"]["width"], presets["sdxl-base"]["width"], presets["demo"]["width"]) == (768, 1024, 64)
    # the latent format is the family's alone (one source); only presets of families without a module carry one
    assert get_family("sdxl-base").latent.scale == 0.13025 and get_family("sd3").latent.channels == 16
    families = {f.name for f in FAMILIES}
    assert [p["name"] for p in presets.values() if "latent" in p and set(p["families"]) & families] == []
    assert preset_for(None, presets, family="sd2")["name"] == "sd2"


def test_preview_colours():
    lat = torch.zeros(1, 4, 2, 3)
    lat[0, 0] = 1.0
    rgb = latent_to_rgb(lat, "sd1")
    assert rgb.shape == (2, 3, 3)
    expected = [round((f + 1) / 2 * 255) for f in SD_FACTORS[0]]
    assert rgb[0, 0].tolist() == expected == [172, 157, 169]
    rgb = latent_to_rgb(torch.zeros(4, 1, 1), "sdxl-base")
    assert rgb[0, 0].tolist() == [round((b + 1) / 2 * 255) for b in SDXL_BIAS]
    assert SDXL_FACTORS != SD_FACTORS
    assert preview_image(lat, "sd1", (24, 16)).size == (24, 16)
    assert [preview_every(n) for n in (1, 4, 20, 50)] == [1, 1, 2, 6]


def test_download_command(tmp_path, capsys, monkeypatch):
    from sd.download import OFFICIAL, main

    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in OFFICIAL) and "sd_xl_base_1.0.safetensors" in listed
    assert main(["nope"]) == 2
    assert "unknown checkpoint" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["sd15", "--models-dir", str(tmp_path)]) == 2
    assert "could not download" in capsys.readouterr().err
