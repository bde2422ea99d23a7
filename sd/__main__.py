"""Command line: `python -m sd inspect CKPT`, `python -m sd generate ...`, `python -m sd reconstruct ...`,
`python -m sd train ...`.

Errors about files and parameters print one line (`error: ...`) and exit with status 2; no traceback; nothing is
written on error. The flags for the families' extra inputs (`--mask`; `--init-image` doubles as the inpainting
image) are built from the family table's declared inputs (`sd.families`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from .checkpoint import CheckpointError


def _size(text: str) -> tuple[int, int]:
    """'H,W' or 'HxW' -> (h, w)."""
    parts = text.replace("x", ",").split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers like 1024,1024, got {text!r}")
    return int(parts[0]), int(parts[1])


def cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint import open_checkpoint
    from .detect import detect
    from .loader import account_keys, check_report, load_unet, probe_is_v

    ckpt = open_checkpoint(args.checkpoint)
    shapes = ckpt.shapes()
    spec = detect(shapes, prediction=args.prediction)
    rep = account_keys(shapes, spec)
    check_report(rep, ckpt.path.name)
    prediction, source = spec.prediction, spec.prediction_source
    if source == "probe":
        prediction = "v" if probe_is_v(load_unet(ckpt, spec)) else "eps"
        source = "A1111 probe on the UNet (constant input at t=999)"
    numel = lambda keys: sum(math.prod(shapes[k]) for k in keys)  # noqa: E731
    ignored: dict[str, int] = {}
    for why in rep.ignored.values():
        ignored[why] = ignored.get(why, 0) + 1
    report = {
        "file": str(ckpt.path),
        "family": spec.family,
        "network": spec.network,
        "prediction": prediction,
        "prediction_decided_by": source,
        "latent": asdict(spec.latent),
        "unet": asdict(spec.unet),
        "vae": asdict(spec.vae) if spec.vae else None,
        "text_encoders": [asdict(t) for t in spec.text_encoders],
        "parameters": {comp: numel(keys) for comp, keys in rep.loaded.items()},
        "tensors": {"total": len(shapes), "loaded": sum(len(v) for v in rep.loaded.values()),
                    "ignored": len(rep.ignored), "unsupported": len(rep.unsupported)},
        "ignored_by_rule": ignored,
        "unsupported": list(spec.unsupported),
    }
    from dataclasses import replace

    from .card import card_text   # the checkpoint card (markdown), a key of its own after the others

    report["card"] = card_text(replace(spec, prediction=prediction, prediction_source=source), shapes,
                               name=ckpt.path.name)
    print(json.dumps(report, indent=1))
    return 0


def _family_inputs() -> dict[str, object]:
    """flag -> Input, over every family of the table (the first declaration of a flag wins)."""
    from .families import FAMILIES

    out: dict[str, object] = {}
    for fam in FAMILIES:
        for inp in fam.inputs:
            out.setdefault(inp.flag, inp)
    return out


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _request_inputs(args: argparse.Namespace, family) -> dict:
    """The extra inputs given on the command line for the loaded checkpoint's family; a flag the family does not
    take is an error (except --init-image, which is img2img for families without an image input)."""
    declared = {i.flag: i for i in family.inputs}
    inputs = {}
    for flag, inp in _family_inputs().items():
        value = getattr(args, _dest(flag), None)
        if value is None:
            continue
        if flag in declared:
            inputs[declared[flag].name] = value
        elif flag not in ("--init-image", "--strength"):   # img2img's own flags for the other families
            takes = ", ".join(declared) or "no extra inputs"
            raise ValueError(f"{flag}: a {family.name} checkpoint takes no {inp.label.lower()} (it takes {takes})")
    return inputs


def _vae_file(choice: str | None, checkpoint) -> Path | None:
    """--vae: None / "None" = the checkpoint's own; "Automatic" = NAME.vae.safetensors beside it (else its own);
    otherwise a file (the command line is local: any path the user names)."""
    from .vae_choice import AUTOMATIC, NONE, beside

    if choice in (None, "", NONE):
        return None
    if choice == AUTOMATIC:
        return beside(checkpoint)
    if not Path(choice).is_file():
        raise CheckpointError(f"--vae {choice}: no such file; give a VAE .safetensors, Automatic or None")
    return Path(choice)


def _hires(args: argparse.Namespace):
    """sd.hires.Hires from the --hires-* flags (any of them turns hires fix on), or None."""
    given = {k: getattr(args, f"hires_{k}") for k in ("scale", "steps", "denoise", "upscaler")}
    if all(v is None for v in given.values()):
        return None
    from .hires import Hires

    h = Hires(**{k: v for k, v in given.items() if v is not None})
    h.check()
    return h


def _preset_defaults(args: argparse.Namespace, model, path, inputs: dict) -> dict | None:
    """Steps / CFG / sampler / schedule not given on the command line: the preset's (`--preset NAME`, or the variant
    the file name hints at, said in a note), else 20 / 7 / euler / normal; a preset's shift for a family taking one."""
    from .presets import load_presets, pick_preset

    preset, note = pick_preset(args.preset, model.spec.family, path, load_presets())
    if note:
        print(f"note: {note}", file=sys.stderr)
    for key, plain in (("steps", 20), ("cfg", 7.0), ("sampler", "euler"), ("schedule", "normal")):
        if getattr(args, key) is None:
            setattr(args, key, preset[key] if preset is not None else plain)
    if preset is not None and "shift" in preset and any(i.name == "shift" for i in model.family.inputs):
        inputs.setdefault("shift", float(preset["shift"]))
    return preset


def cmd_generate(args: argparse.Namespace) -> int:
    from .inpaint import load_image
    from .pipeline import GenerateParams, default_size, generate, image_seeds, load_model

    hires = _hires(args)   # refused before anything loads
    prompt, negative = args.prompt, args.negative_prompt
    if args.style:   # A1111 styles.csv (sd.styles): --styles FILE, else styles.csv beside the models folder
        from .styles import apply_styles, load_styles

        prompt, negative = apply_styles(prompt, negative, load_styles(args.styles, args.models_dir), args.style)
    if args.attention_maps:   # cross-attention maps (sd.attention_maps): the folder checked before anything loads
        from .attention_maps import check_folder

        check_folder(args.attention_maps)
        if hires is not None:
            raise ValueError("--attention-maps records one pass: leave out the hires fix (--hires-scale)")
    path = args.checkpoint
    if path is None:
        from .demo import DEMO_CHECKPOINT

        path = DEMO_CHECKPOINT
        print(f"no --checkpoint given: using the built-in demo model {path}", file=sys.stderr)
    from .text_encoders import TextSources, check_device

    sources = TextSources(folder=args.text_encoders, t5_tokenizer=args.t5_tokenizer, t5=getattr(args, "no_t5") is None,
                          keep=args.keep_text_encoders, t5_device=check_device(args.t5_device, "--t5-device"))
    from dataclasses import replace

    sources = replace(sources, bert_vocab=args.bert_vocab)   # the LDM text models' BERT vocabulary (issue 11)
    from .perf import apply_threads

    apply_threads(args.threads)
    model = load_model(path, device=args.device, dtype=args.dtype, prediction=args.prediction, sources=sources,
                       vae=_vae_file(args.vae, path), low_memory=args.low_memory)
    inputs = _request_inputs(args, model.family)
    if not model.family.text and (args.prompt or args.negative_prompt):
        print(f"warning: a {model.family.label} checkpoint takes no prompt; --prompt/--negative-prompt are ignored",
              file=sys.stderr)
    size = (default_size(model.spec, is_demo=args.checkpoint is None),) * 2
    preset = _preset_defaults(args, model, path, inputs)   # --preset, or the one the file name hints at (turbo)
    if preset is not None:
        size = (preset["width"], preset["height"])
    pixel = [i for i in model.family.inputs if i.kind == "image" and i.name in inputs and i.scale]
    if pixel:  # pixel inputs are used at their own size: the output size is the image's (x scale: the x4 upscaler)
        inputs[pixel[0].name] = img = load_image(inputs[pixel[0].name], pixel[0].flag.lstrip("-"))
        k = pixel[0].scale
        out = (img.width * k, img.height * k)
        given = (args.width or out[0], args.height or out[1])
        if given != out:
            what = f"{k}x the {pixel[0].flag} image's size" if k > 1 else f"the {pixel[0].flag} image's size"
            raise ValueError(f"--width/--height {given[0]}x{given[1]} differ from {what} {out[0]}x{out[1]}; the "
                             f"image is used at its own size: leave them out or give {out[0]}x{out[1]}")
        size = out
    args.width, args.height = args.width or size[0], args.height or size[1]
    params = GenerateParams(
        prompt=prompt, negative_prompt=negative, width=args.width, height=args.height,
        steps=args.steps, cfg=args.cfg, seed=args.seed, sampler=args.sampler, schedule=args.schedule,
        batch_size=args.batch_size, clip_skip=args.clip_skip, sdxl_clip_l_skip=args.sdxl_clip_l_skip,
        sdxl_original_size=args.sdxl_original_size,
        sdxl_crop=args.sdxl_crop, sdxl_target_size=args.sdxl_target_size, aesthetic_score=args.aesthetic_score,
        negative_aesthetic_score=args.negative_aesthetic_score, inputs=inputs, tile=args.tile,
        models_dir=args.models_dir, loras_dir=args.loras_dir, embeddings_dir=args.embeddings_dir,
    )
    if args.init_image and not any(i.flag == "--init-image" for i in model.family.inputs):
        params.init_image = load_image(args.init_image, "--init-image")
        params.strength = 0.75 if args.strength is None else args.strength

    def progress(info: dict) -> None:
        print(f"\rstep {info['step'] + 1}/{info['total']}", end="", file=sys.stderr, flush=True)

    rec = None
    if args.trajectory:   # x_t, the predicted x0 and noise per step (sd.trajectory); recording changes nothing
        from .trajectory import Recorder

        rec = progress = Recorder(model.spec.prediction, model.spec.family, progress)

    if hires is not None:   # A1111's two-pass hires fix (sd.hires)
        from .hires import generate_hires

        result = generate_hires(model, params, hires, callback=progress)
    elif args.attention_maps:
        from .attention_maps import generate_with_maps

        result, maps = generate_with_maps(model, params, callback=progress)
    else:
        result = generate(model, params, callback=progress)
    print(file=sys.stderr)
    for note in result.info.get("notes", []):   # e.g. which text-encoder files were used, T5 left out
        print(f"note: {note}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(result.images):
        p = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        img.save(p)
        paths.append(str(p))
    if args.save_latent:
        from safetensors.torch import save_file

        save_file({"latent": result.latents.contiguous()}, args.save_latent)
    if rec is not None:   # one PNG per step per strip (cheap previews at the output size) + trajectory.json
        rec.trajectory.save(args.trajectory, size=(args.width, args.height))
    if args.attention_maps:
        from .attention_maps import save_maps

        save_maps(maps, result.images[0], args.attention_maps)
    print(json.dumps({"images": paths, "family": model.spec.family, "prediction": model.spec.prediction,
                      "seed": args.seed, "seeds": image_seeds(params), "steps": args.steps}))   # image i: seed + i
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """The first stage's round trip of one image (issue 11): prints JSON (kind, grid, PSNR, SSIM, codes used)."""
    from .first_stage import load_first_stage, round_trip, summary
    from .inpaint import load_image

    fs = load_first_stage(args.checkpoint, device=args.device)
    result = round_trip(fs, load_image(args.image, "--image"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["reconstruction"].save(out)
    print(json.dumps({"image": str(out), **summary(result)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sd", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="print a JSON report about a checkpoint")
    ins.add_argument("checkpoint")
    ins.add_argument("--prediction", choices=["eps", "v"], default=None)
    ins.set_defaults(func=cmd_inspect)

    g = sub.add_parser("generate", help="text to image from a single-file checkpoint")
    g.add_argument("--checkpoint", default=None, help="a .safetensors/.ckpt file (default: the built-in demo model)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--steps", type=int, default=None, help="default 20 (or the --preset's)")
    g.add_argument("--cfg", type=float, default=None, help="default 7 (or the --preset's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sampler", default=None, help="default euler (or the --preset's)")
    g.add_argument("--schedule", default=None, help="default normal (or the --preset's)")
    g.add_argument("--preset", default=None, metavar="NAME",
                   help="defaults of presets/NAME.json for steps, CFG, sampler, schedule, size, shift (e.g. "
                        "sd3.5-large-turbo; a file name containing 'turbo' picks that one)")
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--clip-skip", type=int, default=1)
    g.add_argument("--sdxl-clip-l-skip", action="store_true",
                   help="A1111 'Clip skip SDXL': apply --clip-skip to SDXL's CLIP-L too (the secondary CLIP model; "
                        "1 = its last layer). No effect on SD 1.x, SD 2.x, SD3 or the SDXL refiner")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    from . import perf

    perf.add_flags(g)   # --low-memory, --threads (sd/perf.py, issue 14)
    g.add_argument("--prediction", choices=["eps", "v"], default=None, help="override the detected prediction type")
    g.add_argument("--text-encoders", default=None, metavar="DIR",
                   help="SD3/3.5: folder with clip_l / clip_g / t5xxl_*.safetensors (searched first; default: "
                        "text_encoders/ or clip/ beside the checkpoint or in the models folder)")
    g.add_argument("--t5-tokenizer", default=None, metavar="PATH",
                   help="SD3/3.5: T5's spiece.model or tokenizer.json (default: beside the T5 file)")
    g.add_argument("--bert-vocab", default=None, metavar="PATH",
                   help="LDM txt2img-f8-large / text2img256: BERT's uncased vocab.txt (default: beside the checkpoint, "
                        "in the models folder or its text_encoders/ folder)")
    g.add_argument("--keep-text-encoders", action="store_true",
                   help="SD3/3.5: keep CLIP-L/G and T5 loaded between requests (default: loaded to encode the "
                        "prompts, freed before the MMDiT runs)")
    g.add_argument("--t5-device", default=None, metavar="DEVICE",
                   help="SD3/3.5: run T5-XXL on this device, e.g. cpu while the MMDiT is on cuda (default: --device)")
    g.add_argument("--sdxl-original-size", type=_size, default=None, help="H,W (default: output size)")
    g.add_argument("--sdxl-crop", type=_size, default=(0, 0), help="top,left (default 0,0)")
    g.add_argument("--sdxl-target-size", type=_size, default=None, help="H,W (default: output size)")
    g.add_argument("--aesthetic-score", type=float, default=6.0)
    g.add_argument("--negative-aesthetic-score", type=float, default=2.5)
    g.add_argument("--init-image", default=None, help="img2img source image; for inpainting models the image to inpaint")
    g.add_argument("--strength", type=float, default=None,
                   help="img2img denoising strength (default 0.75; depth-to-image: its own, 0.9)")
    for flag, inp in _family_inputs().items():
        if flag in ("--init-image", "--strength"):   # defined above
            continue
        text = f"{inp.label}: {inp.help}" if inp.help else inp.label
        kw: dict = {"default": None, "help": text.replace("%", "%%")}
        if inp.kind == "bool":  # a "--no-..." flag switches a default-on input off
            kw["action"] = "store_false" if flag.startswith("--no-") else "store_true"
        elif inp.kind == "number":
            kw["type"] = float
        elif inp.kind == "choice":
            kw["choices"] = list(inp.choices)
        g.add_argument(flag, dest=_dest(flag), **kw)
    g.add_argument("--tile", type=int, default=None,
                   help="x4 upscaler: latent tile side of the tiled UNet (default: the family's 512; 0 = off)")
    g.add_argument("--loras-dir", default=None, metavar="DIR",
                   help="where <lora:NAME:w> tags in the prompt look for NAME (also --models-dir's LoRA folders)")
    g.add_argument("--embeddings-dir", default=None, metavar="DIR",
                   help="textual-inversion embeddings used by file name in the prompt")
    g.add_argument("--models-dir", default=None, metavar="DIR",
                   help="an A1111 / ComfyUI models folder: its Lora/loras, embeddings and VAE folders are searched")
    g.add_argument("--vae", default=None, metavar="FILE|Automatic|None",
                   help="a VAE file instead of the checkpoint's own; Automatic: NAME.vae.safetensors beside it")
    g.add_argument("--hires-scale", type=float, default=None, metavar="F",
                   help="hires fix: a second img2img pass at F x the size (A1111's Hires upscale; turns it on)")
    g.add_argument("--hires-steps", type=int, default=None, metavar="N", help="hires fix: steps of the second pass "
                   "(default 0 = the first pass's)")
    g.add_argument("--hires-denoise", type=float, default=None, metavar="S",
                   help="hires fix: denoising strength of the second pass (default 0.7)")
    g.add_argument("--hires-upscaler", default=None, metavar="NAME",
                   help="hires fix: Latent, Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), "
                        "Latent (nearest), Latent (nearest-exact), Lanczos or Nearest (default Latent)")
    g.add_argument("--styles", default=None, metavar="FILE",
                   help="A1111 styles.csv (default: styles.csv beside --models-dir)")
    g.add_argument("--style", action="append", default=[], metavar="NAME",
                   help="apply this style of the styles file to the prompts (repeatable, applied in order)")
    g.add_argument("--save-latent", default=None, help="also save the final latent to this .safetensors file")
    g.add_argument("--trajectory", default=None, metavar="DIR",
                   help="record the run: DIR/x_t, DIR/x0, DIR/noise (one PNG per step) and DIR/trajectory.json")
    g.add_argument("--attention-maps", default=None, metavar="DIR",
                   help="record the cross-attention maps (DAAM): one PNG per prompt token + tokens.json in DIR")
    g.add_argument("--out", default="outputs/out.png")
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("reconstruct", help="encode and decode an image with a first stage (VQGAN / LDM / SD VAE)")
    r.add_argument("--checkpoint", required=True, help="a standalone first-stage file or any checkpoint with a VAE")
    r.add_argument("--image", required=True)
    r.add_argument("--out", default="outputs/reconstruction.png")
    r.add_argument("--device", default="cpu")
    r.set_defaults(func=cmd_reconstruct)

    from .grid import add_parser as add_grid_parser   # python -m sd grid (X/Y/Z comparison grids, sd.grid)

    add_grid_parser(sub)
    t = sub.add_parser("train", help="train the built-in demo model (see sd/demo/README.md)", add_help=False)
    t.set_defaults(func=None)
    d = sub.add_parser("download", help="download an official single-file checkpoint (needs a reachable hub)", add_help=False)
    d.set_defaults(func=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .cpu_tuning import tune_allocator

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--low-memory" not in argv:   # faster, but holds ~1 GB more at the peak (sd/cpu_tuning.py)
        tune_allocator()
    if argv[:1] == ["train"]:
        from .train import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["download"]:
        from .download import main as download_main

        return download_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
