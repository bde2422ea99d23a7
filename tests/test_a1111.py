"""The AUTOMATIC1111-exact details (issue 12 item 6), each pinned with numbers: img2img steps (setup_img2img_steps),
discard_next_to_last_sigma, "Automatic" schedules, 75-token chunking with the comma backtrack and BREAK, batch seeds
s + i (ImageRNG), CLIP / OpenCLIP text cleaning, PNG Info's schedule and tab guesses."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from sd.denoiser import discrete_sigmas
from sd.samplers import (A1111_AUTOMATIC, DISCARD_NEXT_TO_LAST_SIGMA, img2img_start, img2img_steps,
                         resolve_schedule, sampler_sigmas)
from sd.schedules import get_sigmas

MS = discrete_sigmas()  # (1000,) SD training sigmas


# ---------------------------------------------------------------------------------------------- img2img steps


def test_img2img_steps_strength_075_of_20():
    """t_enc = int(min(0.75, 0.999) * 20) = 15: 16 steps from sigmas[20 - 15 - 1] = sigmas[4] of the 20-step
    schedule."""
    assert img2img_steps(20, 0.75) == (20, 15)
    sigmas = get_sigmas("karras", MS, 20)
    sched = img2img_start(sigmas, 0.75)
    assert sched.shape == (17,) and torch.equal(sched, sigmas[4:])
    smin, smax = float(MS[0]), float(MS[-1])
    karras_4 = (smax ** (1 / 7) + 4 / 19 * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
    assert float(sched[0]) == pytest.approx(karras_4, rel=1e-6) and karras_4 == pytest.approx(5.7894, abs=1e-4)
    assert img2img_steps(20, 1.0) == (20, 19) and img2img_steps(20, 0.0) == (20, 0)   # 0.999 cap: 20 steps; 1 step
    assert img2img_steps(20, 0.3) == (20, 6)                                         # int(6.000000000000001)


def test_img2img_steps_fixed_branch():
    """A1111's "exact steps" option and the hires second pass: int(steps / min(s, 0.999)) schedule steps,
    t_enc = steps - 1."""
    assert img2img_steps(10, 0.5, fixed=True) == (20, 9)       # 10 steps from sigmas[20 - 9 - 1] = sigmas[10]
    assert img2img_steps(10, 0.7, fixed=True) == (14, 9)       # int(14.2857)
    assert img2img_steps(10, 1.0, fixed=True) == (10, 9)       # int(10 / 0.999) = 10
    assert img2img_steps(10, 0.0, fixed=True) == (0, 9)


# ---------------------------------------------------------------------------------------------- sampler table


def test_discard_next_to_last_sigma():
    """DPM2, DPM2 a, DPM++ 3M SDE: build steps + 1 and drop the next-to-last sigma (A1111 get_sigmas); others as is."""
    assert set(DISCARD_NEXT_TO_LAST_SIGMA) == {"dpm_2", "dpm_2_ancestral", "dpmpp_3m_sde"}
    full = get_sigmas("karras", MS, 21)                            # (22,)
    smin, smax = float(MS[0]), float(MS[-1])
    karras_19 = (smax ** (1 / 7) + 19 / 20 * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
    for name in DISCARD_NEXT_TO_LAST_SIGMA:
        s = sampler_sigmas(lambda n: get_sigmas("karras", MS, n), 20, name)
        assert s.shape == (21,)                                    # 20 steps
        assert torch.equal(s[:20], full[:20]) and float(s[-1]) == 0.0
        assert float(s[-2]) == pytest.approx(karras_19, rel=1e-6)  # karras(21)[19] = 0.0473, not [20] = sigma_min
    assert torch.equal(sampler_sigmas(lambda n: get_sigmas("karras", MS, n), 20, "euler"), get_sigmas("karras", MS, 20))


def test_automatic_schedule_is_the_samplers_a1111_default():
    assert resolve_schedule("Automatic", "dpmpp_2m") == "karras"
    assert resolve_schedule("automatic", "dpmpp_2m_sde") == "exponential"
    assert resolve_schedule("Automatic", "dpmpp_3m_sde") == "exponential"
    assert resolve_schedule("Automatic", "dpm_2_ancestral") == "karras"
    assert resolve_schedule("Automatic", "euler_ancestral") == "uniform"   # no scheduler option: get_sigmas
    assert resolve_schedule("SGMUniform", "euler") == "sgm_uniform" and resolve_schedule("KL Optimal", "euler") == \
        "kl_optimal"
    assert set(A1111_AUTOMATIC.values()) <= {"karras", "exponential", "ddim_uniform"}
    with pytest.raises(ValueError, match="unknown schedule type 'Karras Exponential'"):
        resolve_schedule("Karras Exponential", "euler")


# ---------------------------------------------------------------------------------------------- batch seeds


@pytest.fixture(scope="module")
def sd1(tiny_files):
    from sd.pipeline import load_model

    return load_model(tiny_files("sd1"))


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im) for im in result.images])


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m"])
def test_batch_image_i_is_seed_s_plus_i(sd1, sampler):
    """Image i of a batch (seed 7) equals a run of seed 7 + i alone: its own starting noise (bit for bit) and its own
    ancestral-noise generator (A1111's ImageRNG). The batched UNet sums in another order than the single one (CPU
    kernels: 1e-7 per call), so the latents agree to float rounding and a rare pixel lands one level off."""
    from sd.pipeline import GenerateParams, generate, start_latent

    p = GenerateParams(prompt="a red circle", width=64, height=48, steps=4, cfg=5.0, seed=7, sampler=sampler,
                       batch_size=3)
    batch = generate(sd1, p)
    x_batch, _ = start_latent(sd1, p)
    for i in range(3):
        q = replace(p, seed=7 + i, batch_size=1)
        assert torch.equal(x_batch[i:i + 1], start_latent(sd1, q)[0])
        alone = generate(sd1, q)
        assert (batch.latents[i] - alone.latents[0]).abs().max() < 1e-4
        diff = np.abs(_pixels(batch)[i].astype(int) - _pixels(alone)[0])
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).sum())
    assert np.abs(_pixels(batch)[0].astype(int) - _pixels(batch)[1]).mean() > 1.0   # different seeds, other images


@torch.no_grad()
def test_batch_of_one_is_the_pinned_convention(sd1):
    """Batch 1 is bit-identical to the convention before per-image seeds: randn((1, 4, h, w)) from Generator(s),
    times sqrt(1 + sigma_0^2), and Euler a's per-step noise from one Generator(s + 1)."""
    from sd.pipeline import GenerateParams, generate, guided_denoiser, seed_generator
    from sd.samplers import sample

    p = GenerateParams(prompt="a red circle", width=64, height=48, steps=4, cfg=5.0, seed=9, sampler="euler_ancestral")
    got = generate(sd1, p).latents
    sigmas = get_sigmas("normal", sd1.sigmas, 4)
    x = torch.randn((1, 4, 6, 8), generator=torch.Generator("cpu").manual_seed(9)) * (1 + sigmas[0] ** 2).sqrt()
    ref = sample("euler_ancestral", guided_denoiser(sd1, p, generator=seed_generator(9)), x, sigmas,
                 generator=torch.Generator("cpu").manual_seed(10))
    assert torch.equal(got, ref)


# ---------------------------------------------------------------------------------------------- infotext, PNG Info


def _settings(text: str) -> dict:
    from sd.pnginfo import parse_parameters, to_settings

    return to_settings(parse_parameters(text))


def test_infotext_schedules_as_a1111_reads_them():
    """No "Schedule type" (A1111 < 1.9): the sampler name's suffix, else the sampler's default; "Automatic" the same;
    a label we do not have is a warning and sets nothing."""
    base = "a cat\nSteps: 20, CFG scale: 7, Seed: 1, Size: 512x512, "
    assert _settings(base + "Sampler: DPM++ 2M Karras")["schedule"] == "karras"
    assert _settings(base + "Sampler: DPM++ 2M")["schedule"] == "karras"               # A1111's Automatic
    assert _settings(base + "Sampler: DPM++ 2M SDE")["schedule"] == "exponential"
    assert _settings(base + "Sampler: Euler a")["schedule"] == "uniform"
    assert _settings(base + "Sampler: DPM2 a, Schedule type: Automatic")["schedule"] == "karras"
    assert _settings(base + "Sampler: Euler, Schedule type: Align Your Steps")["schedule"] == "align_your_steps"
    assert _settings(base + "Sampler: Euler, Schedule type: KL Optimal")["schedule"] == "kl_optimal"
    s = _settings(base + "Sampler: Euler, Schedule type: Karras Exponential")
    assert "schedule" not in s and s["warnings"] == [
        "schedule type 'Karras Exponential' is not available here (known: Normal, Karras, Exponential, SGM Uniform, "
        "Simple, DDIM, Beta, Uniform, Polyexponential, KL Optimal, Align Your Steps); the tab keeps its own schedule"]


def test_infotext_writes_each_images_seed_and_no_batch_pos():
    from sd.pnginfo import build_parameters

    text = build_parameters(prompt="x", negative_prompt="", steps=20, sampler="dpmpp_2m", schedule="automatic", cfg=7,
                            seed=12, width=512, height=512, model_name="m", model_hash=None, batch_size=4)
    assert text == "x\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 12, Size: 512x512, " \
                   "Model: m, Batch size: 4, Version: sd-playground"


def test_guess_tab_model_first_size_last():
    from sd.pnginfo import guess_tab

    portrait = _settings("a cat\nSteps: 20, Sampler: Euler a, Seed: 1, Size: 512x768, Model hash: 0123456789, "
                         "Model: mine")
    assert guess_tab(portrait) == "sd1"                                   # 512x768: an SD 1.x portrait
    assert guess_tab(portrait, {"mine": "sdxl"}) == "sdxl"                 # the folder's file decides
    assert guess_tab(portrait, {"mine": "sdxl", "0123456789": "sd2"}) == "sd2"   # the hash before the name
    assert [guess_tab({"width": w, "height": h}) for w, h in ((768, 768), (832, 1216), (1024, 768), (640, 960))] == [
        "sd2", "sdxl", "sdxl", "sd1"]


from .test_app import client, server  # noqa: E402,F401 - the module's app server (tiny SD1 + SDXL in a models folder)


def test_png_info_guesses_the_tab_from_the_models_folder(client, tiny_files, tmp_path):
    """Through gradio_client: a 512x768 image naming the folder's SDXL file goes to SDXL, by its hash once the model
    is loaded even under another name; one naming an unknown model stays on SD 1.x; a schedule we lack is a warning."""
    from gradio_client import handle_file
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from sd.checkpoint import file_sha256

    def png(text: str) -> str:
        info = PngInfo()
        info.add_text("parameters", text)
        path = tmp_path / f"{abs(hash(text))}.png"
        Image.new("RGB", (8, 8)).save(path, pnginfo=info)
        return handle_file(str(path))

    base = "a cat\nSteps: 4, Sampler: DPM++ 2M, CFG scale: 7, Seed: 5, Size: 512x768, "
    _, s, hint = client.predict(png(base + "Model: sdxl"), api_name="/png_info")
    assert "**SDXL**" in hint and s["schedule"] == "karras"
    _, s, hint = client.predict(png(base + "Model: elsewhere"), api_name="/png_info")
    assert "**SD 1.x**" in hint
    client.predict(checkpoint="Stable-diffusion/sdxl.safetensors", prompt="x", steps=1, width=64, height=64,
                   api_name="/generate_sdxl")                           # loaded: its hash is known now
    sdxl_hash = file_sha256(tiny_files("sdxl_base"))[:10]
    _, s, hint = client.predict(png(base + f"Model hash: {sdxl_hash}, Model: renamed"), api_name="/png_info")
    assert "**SDXL**" in hint
    _, s, hint = client.predict(png(base + "Schedule type: Karras Exponential, Model: sdxl"), api_name="/png_info")
    assert "warning: schedule type 'Karras Exponential' is not available here" in hint


# ---------------------------------------------------------------------------------------------- prompt chunks


WORDS = ["red", "blue", "green", "cat", "dog", "tree", "house", "car", "sky", "sun", "moon", "star", "fish", "bird",
         "rain", "snow", "wind", "fire", "water", "stone", "gold", "silver", "night", "day", "city"]


def _tag_prompt(n_short: int, long_words: int) -> tuple[str, list[int]]:
    """n_short tags "w1 w2," (3 tokens each) then one tag of `long_words` single-token words; (prompt, token ids)."""
    from sd.tokenizer import encode

    assert all(len(encode(w)) == 1 for w in WORDS)
    tags = [f"{WORDS[i % 25]} {WORDS[(i + 7) % 25]}" for i in range(n_short)]
    prompt = ", ".join(tags) + ", " + " ".join(WORDS[:long_words])
    return prompt, encode(prompt)


def test_79_token_tag_prompt_breaks_at_the_last_comma():
    """20 tags of 3 tokens (the 20th comma is token 59) + a 19-token tag = 79 tokens. Token 75 arrives at a full
    chunk whose last comma is 75 - 59 = 16 <= 20 back: chunk 1 ends after the comma (60 tokens + 15 padding), chunk 2
    holds the 19 tokens of the long tag (a plain 75-token cut would have split it 15 + 4)."""
    from sd.tokenizer import COMMA, EOT, SOT, tokenize_weighted

    prompt, ids = _tag_prompt(20, 19)
    assert len(ids) == 79 and ids[59] == COMMA and COMMA not in ids[60:]
    tokens, weights = tokenize_weighted(prompt, EOT)
    assert tokens.shape == (2, 77) and weights.shape == (2, 77) and bool((weights == 1).all())
    assert tokens[0, :61].tolist() == [SOT] + ids[:60] and tokens[0, 61:].tolist() == [EOT] * 16
    assert tokens[1, :20].tolist() == [SOT] + ids[60:] and tokens[1, 20:].tolist() == [EOT] * 57
    tokens0, _ = tokenize_weighted(prompt, 0)                   # OpenCLIP padding: EOT once, then 0
    assert tokens0[0, 61:].tolist() == [EOT] + [0] * 15


def test_comma_further_than_20_tokens_back_is_a_plain_cut():
    """18 tags (last comma token 53) + a 25-token tag = 79 tokens: 75 - 53 = 22 > 20, so the chunk is cut at 75."""
    from sd.tokenizer import COMMA, EOT, SOT, tokenize_weighted

    prompt, ids = _tag_prompt(18, 25)
    assert len(ids) == 79 and ids[53] == COMMA and COMMA not in ids[54:]
    tokens, _ = tokenize_weighted(prompt, EOT)
    assert tokens[0].tolist() == [SOT] + ids[:75] + [EOT] and tokens[1, :6].tolist() == [SOT] + ids[75:] + [EOT]


def test_break_starts_a_new_chunk_and_weights_move_with_their_tokens():
    from sd.tokenizer import EOT, SOT, encode, tokenize_weighted

    tokens, weights = tokenize_weighted("a cat BREAK (a dog:1.5)", EOT)
    assert tokens.shape == (2, 77)
    assert tokens[0, :4].tolist() == [SOT, *encode("a cat"), EOT] and tokens[1, :4].tolist() == [SOT, *encode("a dog"),
                                                                                                    EOT]
    assert weights[1, 1:3].tolist() == [1.5, 1.5] and float(weights[0, 1:3].sum()) == 2.0
    prompt, ids = _tag_prompt(20, 19)                            # the moved tokens keep their weights
    _, w = tokenize_weighted(prompt.replace(", " + " ".join(WORDS[:19]), ", (" + " ".join(WORDS[:19]) + ":1.2)"), EOT)
    assert w[0, 1:61].tolist() == [1.0] * 60 and w[1, 1:20].tolist() == pytest.approx([1.2] * 19)


# ---------------------------------------------------------------------------------------------- text cleaning


TEXTS = ["fish &amp; chips", "tom  &  jerry\t\n  x", "cafÃ© au lait", "x&lt;y &amp;amp; z", "Ｆｕｌｌ width, naïve",
         "a <b> &amp; c"]


def test_clip_l_cleans_as_hf_clip_tokenizer(tmp_path):
    """SD 1.x CLIP-L: transformers' CLIPTokenizer with ftfy (A1111's), no HTML unescape. The reference tokenizer is
    built offline from the same BPE vocabulary; transformers 5 leaves ftfy out, so it gets ftfy.fix_text first."""
    import json

    import ftfy
    from transformers import CLIPTokenizer

    from sd.tokenizer import _tables, encode

    ids, ranks, _ = _tables()
    (tmp_path / "vocab.json").write_text(json.dumps(ids))
    merges = sorted(ranks, key=ranks.get)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    hf = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for text in TEXTS:
        assert encode(text, "hf") == hf(ftfy.fix_text(text), add_special_tokens=False)["input_ids"], text
    # ftfy unescapes entities itself unless the text has a "<" (looks like HTML); then CLIP-L keeps "&amp;" as text
    assert encode("a <b> &amp; c", "hf") == [320, 283, 321, 285, 261, 6259, 282, 322]   # ..., "&", "amp", ";", "c"
    assert encode("cafÃ© au lait", "hf") == encode("café au lait", "hf") != hf("cafÃ© au lait",
                                                                               add_special_tokens=False)["input_ids"]


def test_openclip_cleans_as_open_clip():
    """SD 2.x / SDXL bigG: open_clip's tokenizer (ftfy, HTML unescaped twice, whitespace, lower case)."""
    from open_clip.tokenizer import SimpleTokenizer

    from sd.text import clip_l_config, openclip_bigg_config, openclip_h_config, text_cleaning
    from sd.tokenizer import encode

    ref = SimpleTokenizer()
    for text in TEXTS:
        assert encode(text, "openclip") == ref.encode(text), text
    assert encode("a <b> &amp; c", "openclip") == [320, 283, 321, 285, 261, 322]      # html.unescape: "&"
    assert [text_cleaning(c("p.")) for c in (clip_l_config, openclip_h_config, openclip_bigg_config)] == [
        "hf", "openclip", "openclip"]


def test_cli_batch_seeds_and_an_unknown_schedule(tiny_files, tmp_path, capsys, sd1):
    """`python -m sd generate --batch-size 2`: images of seeds s and s + 1 (image 1 = a run of seed s + 1 alone within
    one pixel level); an A1111 label we lack is one line on stderr and exit status 2."""
    import json

    from PIL import Image

    from sd.__main__ import main
    from sd.pipeline import GenerateParams, generate

    args = ["generate", "--checkpoint", str(tiny_files("sd1")), "--prompt", "a cat", "--steps", "2", "--width", "64",
            "--height", "64", "--seed", "5", "--schedule", "Automatic", "--sampler", "dpm_2"]
    assert main([*args, "--batch-size", "2", "--out", str(tmp_path / "x.png")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["seeds"] == [5, 6]
    alone = generate(sd1, GenerateParams(prompt="a cat", steps=2, width=64, height=64, seed=6, schedule="automatic",
                                         sampler="dpm_2"))
    diff = np.abs(np.asarray(Image.open(out["images"][1])).astype(int) - np.asarray(alone.images[0]))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert main([*args[:-4], "--schedule", "Karras Exponential", "--out", str(tmp_path / "y.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: unknown schedule type 'Karras Exponential'")


def test_app_automatic_schedule_and_batch_infotext(client):
    """The tab's "Automatic" runs the sampler's A1111 default and the infotext names it; a batch of 2 saves seeds
    s and s + 1, each image's infotext its own seed."""
    from PIL import Image

    from sd.pnginfo import parse_parameters

    r = client.predict(checkpoint="sd1.safetensors", prompt="a cat", sampler="DPM++ 2M", schedule="Automatic", steps=2,
                       seed=40, width=64, height=64, batch_size=2, batch_count=1, api_name="/generate_sd1")
    texts = [parse_parameters(Image.open(i["image"]).info["parameters"]) for i in r[0]]
    assert [(t["Seed"], t["Schedule type"], t["Batch size"]) for t in texts] == [("40", "Karras", "2"),
                                                                               ("41", "Karras", "2")]
    assert all("Batch pos" not in t for t in texts) and [i["caption"] for i in r[0]] == ["seed 40", "seed 41"]


def test_embedding_moved_by_the_comma_backtrack_keeps_its_vectors():
    """An embedding (2 vectors, named by the word "ocean") after the last comma moves to the next chunk with the
    tokens around it; its fix points at its new position there."""
    from sd.tokenizer import EOT, encode, tokenize_chunks

    (ocean,) = encode("ocean")
    vec = torch.arange(6.0).reshape(2, 3)

    def special(ids, i):
        return (1, vec) if ids[i] == ocean else None

    prompt, ids = _tag_prompt(20, 19)
    prompt, ids = prompt + " ocean", ids + [ocean]          # tokens 0..59 tags, 60..78 the long tag, 79 the embedding
    tokens, weights, fixes = tokenize_chunks(prompt, EOT, special=special)
    assert tokens.shape == (2, 77) and tokens[0, 61] == EOT             # chunk 1 ends after the comma (token 59)
    assert len(fixes) == 1 and fixes[0][:2] == (1, 1 + 19) and torch.equal(fixes[0][2], vec)
    assert tokens[1, 20:22].tolist() == [0, 0] and tokens[1, 22] == EOT   # 19 words + 2 placeholder slots


def test_hires_batch_image_i_is_seed_s_plus_i(sd1):
    """Hires fix follows the batch rule: pass 2's noise and ancestral noise are image i's (seed s + i), so image 1 of a
    batch of 2 equals a hires run of seed s + 1 alone (to float rounding, as for plain batches)."""
    from sd.hires import Hires, generate_hires
    from sd.pipeline import GenerateParams

    p = GenerateParams(prompt="a cat", width=64, height=64, steps=2, cfg=5.0, seed=3, sampler="euler_ancestral",
                       batch_size=2)
    h = Hires(scale=1.5, steps=2, denoise=0.6, upscaler="Latent")
    both = generate_hires(sd1, p, h)
    alone = generate_hires(sd1, replace(p, seed=4, batch_size=1), h)
    assert (both.latents[1] - alone.latents[0]).abs().max() < 1e-4
    diff = np.abs(_pixels(both)[1].astype(int) - _pixels(alone)[0])
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
