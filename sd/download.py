"""`python -m sd download NAME`: fetch an official single-file checkpoint into the models folder.

Uses huggingface_hub (`hf_hub_download`) and so needs a reachable hub (and, for gated repositories, a token from
`huggingface-cli login` or $HF_TOKEN). This is the only place the project downloads anything, and it runs only
when asked. `python -m sd download --list` prints the known names.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .models_dir import resolve_models_dir

# name -> (Hugging Face repository, file in it, what it is)
OFFICIAL: dict[str, tuple[str, str, str]] = {
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors",
             "SD 1.5 (512, eps), 4.3 GB"),
    "sd15-inpaint": ("stable-diffusion-v1-5/stable-diffusion-inpainting", "sd-v1-5-inpainting.ckpt",
                     "SD 1.5 inpainting (listed, not run yet)"),
    "sd21-base": ("stabilityai/stable-diffusion-2-1-base", "v2-1_512-ema-pruned.safetensors", "SD 2.1 (512, eps)"),
    "sd21": ("stabilityai/stable-diffusion-2-1", "v2-1_768-ema-pruned.safetensors", "SD 2.1 (768, v)"),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors", "SDXL base 1.0, 6.9 GB"),
    "sdxl-refiner": ("stabilityai/stable-diffusion-xl-refiner-1.0", "sd_xl_refiner_1.0.safetensors",
                     "SDXL refiner 1.0, 6.1 GB"),
    "t5-tokenizer": ("google/t5-v1_1-xxl", "spiece.model",
                     "T5-XXL sentencepiece tokenizer of SD3 / 3.5, 0.8 MB (into text_encoders/)"),
    "bert-vocab": ("google-bert/bert-base-uncased", "vocab.txt",
                   "BERT uncased vocab.txt of the LDM text models, 0.2 MB (into text_encoders/)"),
}

# name -> the models folder's sub-folder it goes into (SD3's T5 tokenizer: where sd.text_encoders looks for it)
SUBFOLDER: dict[str, str] = {"t5-tokenizer": "text_encoders", "bert-vocab": "text_encoders"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sd download", description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?", help="one of: " + ", ".join(OFFICIAL))
    ap.add_argument("--models-dir", default=None, help="where to put it (default $SD_MODELS_DIR or ./models)")
    ap.add_argument("--list", action="store_true", help="print the known names and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list or not args.name:
        for name, (repo, filename, what) in OFFICIAL.items():
            print(f"{name:14s} {what:40s} {repo}/{filename}")
        return 0 if args.list else 2
    if args.name not in OFFICIAL:
        print(f"error: unknown checkpoint {args.name!r}; known: {', '.join(OFFICIAL)}", file=sys.stderr)
        return 2
    repo, filename, _ = OFFICIAL[args.name]
    folder = resolve_models_dir(args.models_dir) / SUBFOLDER.get(args.name, "")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id=repo, filename=filename, local_dir=str(folder))
    except Exception as e:  # offline, gated, removed: one line saying what happened
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: could not download {repo}/{filename} ({type(e).__name__}: {msg[:200]}); "
              f"put the file in {folder.resolve()} by hand instead", file=sys.stderr)
        return 2
    print(Path(path).resolve())
    return 0
