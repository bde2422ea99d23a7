"""Quality of the built-in demo model (sd/demo/shapes-sd1.safetensors), judged by pixel analysis.

    .venv/bin/python bench/demo_quality.py [--checkpoint PATH] [--seeds 1 2] [--steps 20] [--threads 1]
    .venv/bin/python bench/demo_quality.py --vae FILE     # only the autoencoder: colors after a round trip

Generates every held-out prompt (color/shape/position combinations never seen as a training caption, see
`sd.demo.data.is_held_out`) through the public path (`sd.pipeline.load_model` + `generate`, 64x64, euler,
normal schedule) at CFG 5 and at CFG 1, scores each image with `sd.demo.evaluate` (no learned model), and
prints the table for both plus the measured seconds per image; then the independent color rule
(`sd.demo.evaluate.judge_colors`) on the 12 simple prompts x the same seeds at the first CFG.
Targets (issue 15): at CFG 5 both colors >= 85%, shapes and positions >= 80%; CFG 1 clearly lower; the
independent rule >= 80%; one image under 1 s.

`--vae FILE` (a stage-1 vae.safetensors or an SD1 file) scores only the autoencoder: the 20 held-out shapes on each
of the 5 other background colors (100 renders) are encoded (latent mean), decoded and analysed; it prints how often
the shape's color and the background survive the round trip (the generator cannot be better than that).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sd.demo import DEMO_CHECKPOINT  # noqa: E402
from sd.demo.evaluate import color_rule_evaluate, evaluate  # noqa: E402
from sd.pipeline import load_model  # noqa: E402


def vae_round_trip(path: str) -> int:
    """Print the share of 100 held-out renders whose shape color / background color survive encode + decode."""
    import numpy as np
    from safetensors.torch import load_file

    from sd.demo import data
    from sd.demo.evaluate import analyze
    from sd.families.shapes import VAE, detect_vae
    from sd.vae import AutoencoderKL

    state = load_file(path)
    if any(k.startswith(VAE) for k in state):
        state = {k[len(VAE):]: v for k, v in state.items() if k.startswith(VAE)}
    vae = AutoencoderKL(detect_vae({k: tuple(v.shape) for k, v in state.items()}, prefix=""))
    vae.load_state_dict({k: v.float() for k, v in state.items()})
    images, truth = [], []
    for _, target, _ in data.held_out_prompts():
        for background in data.COLOR_NAMES:
            if background != target.color:
                images.append(data.render((target,), background)), truth.append((target.color, background))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (100, 3, 64, 64)
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(x[i:i + 20])) for i in range(0, len(x), 20)])
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # (100, 64, 64, 3)
    seen = [analyze(r) for r in rec]
    fg = sum(a.color == c for a, (c, _) in zip(seen, truth)) / len(seen)
    bg = sum(a.background == b for a, (_, b) in zip(seen, truth)) / len(seen)
    print(f"{path}: round trip of {len(seen)} held-out renders: shape color {fg:.0%}, background {bg:.0%}")
    # latent separability: per background, the 5 other colors' circle (center, medium); pairwise distances of the
    # latent means in units of their std (a small minimum: two shape colors the decoder cannot tell apart)
    parts = []
    for background in data.COLOR_NAMES:
        circles = [data.render((data.ShapeSpec(c, "circle", "center", "", 32.0, 32.0),), background)
                   for c in data.COLOR_NAMES if c != background]
        parts.append(torch.from_numpy(np.stack(circles)).permute(0, 3, 1, 2).float() / 127.5 - 1)  # (5, 3, 64, 64)
    with torch.no_grad():
        z = vae.encode(torch.cat(parts)).flatten(1)  # (30, 4 * 8 * 8)
    z = (z / z.std()).view(len(data.COLOR_NAMES), -1, z.shape[1])  # (6, 5, 256)
    cells = []
    for background, zb in zip(data.COLOR_NAMES, z):
        d = torch.cdist(zb, zb)[~torch.eye(len(zb), dtype=torch.bool)]  # (20,)
        cells.append(f"{background} {float(d.min()):.2f}/{float(d.median()):.2f}")
    print("latent distance between shape colors, min/median per background: " + ", ".join(cells))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfgs", type=float, nargs="+", default=[5.0, 1.0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    ap.add_argument("--save", default="", help="folder to write the generated images into")
    ap.add_argument("--vae", default="", metavar="FILE", help="score only this autoencoder's round trip")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vae:
        return vae_round_trip(args.vae)

    t0 = time.perf_counter()
    model = load_model(args.checkpoint)
    print(f"{args.checkpoint}: {model.spec.family}, loaded in {time.perf_counter() - t0:.2f} s")
    header = f"{'cfg':>5} {'images':>6} {'color':>6} {'bg':>6} {'colors':>7} {'shape':>6} {'position':>8} {'s/img':>6}"
    lines = []
    for cfg in args.cfgs:
        t = time.perf_counter()
        summary, rows = evaluate(model, cfg, seeds=tuple(args.seeds), steps=args.steps)
        per_image = (time.perf_counter() - t) / len(rows)
        lines.append(f"{cfg:>5.1f} {len(rows):>6} {summary['color']:>6.0%} {summary['background']:>6.0%} "
                     f"{summary['colors']:>7.0%} {summary['shape']:>6.0%} {summary['position']:>8.0%} {per_image:>6.2f}")
        if args.save:
            out = Path(args.save)
            out.mkdir(parents=True, exist_ok=True)
            for i, r in enumerate(rows):
                ok = "".join(k[0] if v else "-" for k, v in r["score"].items())
                r["image"].save(out / f"cfg{cfg:g}_{i:02d}_{ok}_{r['prompt'].replace(' ', '_')}.png")
    print(f"held-out prompts x seeds {args.seeds}, {args.steps} steps, euler, 64x64 "
          "(colors = foreground and background both right)")
    print(header)
    print("\n".join(lines))
    both, rows = color_rule_evaluate(model, cfg=args.cfgs[0], seeds=tuple(args.seeds), steps=args.steps)
    wrong = [f"{r['prompt']} (seed {r['seed']}): {r['judged'][0]} on {r['judged'][1]}"
             for r in rows if r["judged"] != r["expected"]]
    print(f"independent color rule, 12 simple prompts x seeds {args.seeds}, cfg {args.cfgs[0]:g}: "
          f"both colors right in {both:.0%} of {len(rows)}")
    for line in wrong:
        print("  wrong:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
