#!/usr/bin/env bash
# Train the built-in demo model from scratch (issue 15): the exact command sequence, seeds fixed (--seed 0).
#   bash sd/demo/train.sh          # rerun the same line to resume: every stage continues from its state.pt
# Stages: (1) the VAE (encoder + decoder, colour-aware loss); (2) in parallel, one process each: the UNet + text
# encoder on the latents of (1)'s frozen encoder, and a decoder-only fine-tune of (1) (the latent space is
# unchanged, as in SD's ft-MSE decoder); (3) export of the SD 1.x file into .train/demo/. One torch thread per
# process. CPU seconds and wall seconds of every stage are appended to .train/demo/times.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
T=.train/demo
mkdir -p "$T"
export OMP_NUM_THREADS=1
run() {  # run NAME ARGS...: python -m sd train ARGS, log in $T/NAME.log, CPU and wall time in $T/times.txt
  local name=$1; shift
  /usr/bin/time -a -o "$T/times.txt" -f "$name: %U s user + %S s system CPU, %e s wall" \
    "$PY" -m sd train "$@" --threads 1 >>"$T/$name.log" 2>&1
}
run vae vae --out "$T/vae" --steps 300 --stop-at 250 --batch 8 --full-from 0.5 \
  --color-weight 4 --fg-weight 3
run unet unet --vae "$T/vae/vae.safetensors" --out "$T/unet" --images 6000 --batch 32 --steps 1500 &
unet=$!
run decoder vae --out "$T/decoder" --decoder-only "$T/vae/vae.safetensors" --steps 400 --batch 8 --full-from 0 \
  --color-weight 4 --fg-weight 3 &
decoder=$!
wait "$unet"
wait "$decoder"
run export export --vae "$T/decoder/vae.safetensors" --unet "$T/unet" --out "$T/shapes-sd1.safetensors"
