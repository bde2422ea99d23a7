"""Load through the app: concurrent gradio_client clients against an in-process app with two tiny checkpoints.

Each client is its own session and runs a fixed plan of requests, mixed between the SD 1.x and SD 2.x
checkpoints and the Stop endpoint: plain generations, longer generations stopped once they report a step
(`/stop_<tab>` of the client's own session), and Stops with nothing running. Every result is checked on
arrival against the single-request reference of its (checkpoint, seed), pixel for pixel. The plan runs in
rounds (all clients meet at a barrier after each) so memory can be read after every round.

`tests/test_load.py` runs the same loop (it imports `run_load` and friends from here) and asserts on it; this
script prints the request rate and the latency percentiles:

    python bench/app_load.py [--clients 8] [--requests 50] [--rounds 5] [--steps 2] [--size 64] [--concurrency 2]

The checkpoints are tiny random-weight files in the released layouts (tests/tiny.py), so the numbers measure
the app's serving overhead (queue, streaming, PNG writing, downloads), not a real model's compute.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import random
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHECKPOINTS = {"sd1.safetensors": "sd1", "sd2.safetensors": "sd2"}   # file in the models folder -> tab
TINY_LAYOUTS = {"sd1.safetensors": "sd1", "sd2.safetensors": "sd2_512_eps"}
SEEDS = (11, 12, 13, 14)
DOWNLOAD: str | bool = False   # read result images from the server's files instead of downloading them
BASE = dict(prompt="a red circle", negative_prompt="", sampler="Euler", schedule="Normal", steps=2, cfg=5.0,
            width=64, height=64, batch_size=1, batch_count=1, init_image=None, strength=0.75)


def request_args(checkpoint: str, seed: int, **over) -> tuple[str, dict]:
    """(endpoint, every parameter of that tab's generate endpoint) for one request."""
    tab = CHECKPOINTS[checkpoint]
    args = dict(BASE, checkpoint=checkpoint, seed=seed, **over)
    if tab == "sd2":
        args["prediction"] = "auto"
    return f"/generate_{tab}", args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(models_dir: Path, outputs_dir: Path, concurrency: int = 2):
    """(url, demo) of the app served in this process on a free port (the way tests/test_app.py starts it)."""
    import app
    from sd.pipeline import ModelCache

    demo = app.build_app(models_dir, device="cpu", dtype="float32", cache=ModelCache(), outputs_dir=outputs_dir,
                         demo_path=None, concurrency=concurrency)
    port = free_port()
    # _frontend=False: no start-up HEAD probe of the page, which a loaded machine can miss (tests/serving.py)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(outputs_dir)], _frontend=False)
    return f"http://127.0.0.1:{port}/", demo


def rss_bytes() -> int:
    """Resident memory of this process after a garbage collection (psutil if installed, else /proc)."""
    gc.collect()
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read this process's memory: install psutil")


@dataclass(frozen=True)
class Op:
    kind: str            # "generate"; "stop-run": a longer run, Stop sent once it reports a step; "stop": nothing runs
    checkpoint: str
    seed: int


def make_plans(clients: int, per_client: int, seed: int = 0, stop_share: float = 0.1,
               idle_stop_share: float = 0.1) -> list[list[Op]]:
    """A fixed, seeded plan per client: checkpoints and seeds drawn from CHECKPOINTS x SEEDS."""
    rng = random.Random(seed)
    plans = []
    for _ in range(clients):
        ops = []
        for _ in range(per_client):
            r = rng.random()
            kind = "stop" if r < idle_stop_share else "stop-run" if r < idle_stop_share + stop_share else "generate"
            ops.append(Op(kind, rng.choice(sorted(CHECKPOINTS)), rng.choice(SEEDS)))
        plans.append(ops)
    return plans


@dataclass
class Record:
    client: int
    index: int
    op: Op
    latency: float
    status: str = ""
    equal: bool | None = None     # generation that ran to the end: pixels equal the reference
    stopped: bool = False
    images: int = 0
    stop_answer: str = ""         # what /stop_<tab> answered for a "stop-run"
    error: str | None = None


def _pixels(result):
    """The gallery's images: downloaded files, or (Client(download_files=False)) the server's own files, which
    are on this machine since the app runs in this process."""
    import numpy as np
    from PIL import Image

    paths = [item["image"] if isinstance(item["image"], str) else item["image"]["path"] for item in result[0]]
    return [np.asarray(Image.open(p)) for p in paths]


def reference_pixels(url: str, combos) -> tuple[dict, list[float]]:
    """{(checkpoint, seed): pixels of the single image} from one request each, in turn; and their latencies."""
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=DOWNLOAD, ssl_verify=False)
    refs, times = {}, []
    for ckpt, seed in combos:
        endpoint, args = request_args(ckpt, seed)
        t0 = time.perf_counter()
        res = client.predict(**args, api_name=endpoint)
        times.append(time.perf_counter() - t0)
        refs[(ckpt, seed)] = _pixels(res)[0]
    return refs, times


STOP_RUN_STEPS = 10   # steps of the runs that are stopped (Stop is sent once the first step is reported)


def _run_op(client, op: Op, refs: dict, timeout: float, rec: Record) -> None:
    import numpy as np

    tab = CHECKPOINTS[op.checkpoint]
    if op.kind == "stop":
        rec.status = client.predict(api_name=f"/stop_{tab}")
        return
    over = {"steps": STOP_RUN_STEPS} if op.kind == "stop-run" else {}
    endpoint, args = request_args(op.checkpoint, op.seed, **over)
    job = client.submit(**args, api_name=endpoint)
    if op.kind == "stop-run":
        deadline = time.monotonic() + timeout
        while not job.done() and time.monotonic() < deadline:
            if any(isinstance(o[2], str) and o[2].startswith("step ") for o in job.outputs()):
                rec.stop_answer = client.predict(api_name=f"/stop_{tab}")
                break
            time.sleep(0.01)
    res = job.result(timeout=timeout)
    rec.status = res[2]
    rec.stopped = rec.status.startswith("stopped after")
    imgs = _pixels(res)
    rec.images = len(imgs)
    if op.kind == "generate" and not rec.stopped:
        rec.equal = len(imgs) == 1 and np.array_equal(imgs[0], refs[(op.checkpoint, op.seed)])


def run_load(url: str, plans: list[list[Op]], refs: dict, rounds: int = 5, timeout: float = 60.0,
             on_round=None) -> tuple[list[Record], float, float]:
    """Run every client's plan on its own thread and gradio_client session, `rounds` rounds with a barrier after
    each (`on_round(i)` runs there, alone). Returns (a record per request, wall seconds, CPU seconds of this
    process: the app and the clients together). Errors and timeouts are recorded, not raised, so a caller sees
    all of them."""
    from gradio_client import Client

    n = len(plans)
    per_round = [max(1, -(-len(p) // rounds)) for p in plans]
    barrier = threading.Barrier(n)
    records: list[list[Record]] = [[] for _ in range(n)]
    clients = [Client(url, verbose=False, download_files=DOWNLOAD, ssl_verify=False) for _ in range(n)]

    def worker(c: int) -> None:
        plan = plans[c]
        for r in range(rounds):
            for i in range(r * per_round[c], min(len(plan), (r + 1) * per_round[c])):
                rec = Record(c, i, plan[i], 0.0)
                t0 = time.perf_counter()
                try:
                    _run_op(clients[c], plan[i], refs, timeout, rec)
                except Exception as e:  # noqa: BLE001 - recorded for the caller
                    rec.error = f"{type(e).__name__}: {e}"
                rec.latency = time.perf_counter() - t0
                records[c].append(rec)
            if barrier.wait(timeout=timeout * per_round[c] + 60) == 0 and on_round is not None:
                on_round(r)
            barrier.wait(timeout=120)  # everyone waits for on_round to finish

    threads = [threading.Thread(target=worker, args=(c,), name=f"load-client-{c}", daemon=True) for c in range(n)]
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout * max(map(len, plans)) + 120)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    for c in clients:
        c.close()
    return [r for rs in records for r in rs], wall, cpu


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))] if s else float("nan")


def summarize(records: list[Record], wall: float, cpu: float = float("nan")) -> dict:
    gens = [r.latency for r in records if r.op.kind == "generate" and r.error is None]
    return {"requests": len(records), "wall_s": wall, "cpu_s": cpu,
            "rate": len(records) / wall if wall else float("nan"),
            "p50_s": percentile(gens, 50), "p95_s": percentile(gens, 95),
            "stopped": sum(r.stopped for r in records), "errors": sum(r.error is not None for r in records)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="requests per client")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=2, help="the app's --concurrency")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--cfg", type=float, default=BASE["cfg"], help="CFG scale (1: one UNet call a step)")
    ap.add_argument("--download", action="store_true", help="download result images as a remote client would")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    BASE.update(steps=args.steps, width=args.size, height=args.size, cfg=args.cfg)
    global DOWNLOAD
    if args.download:
        from gradio_client.client import DEFAULT_TEMP_DIR
        DOWNLOAD = DEFAULT_TEMP_DIR
    from tests.tiny import write_tiny

    with tempfile.TemporaryDirectory() as tmp:
        models, outputs = Path(tmp) / "models", Path(tmp) / "outputs"
        for name, layout in TINY_LAYOUTS.items():
            write_tiny(layout, models / name)
        url, demo = start_app(models, outputs, args.concurrency)
        try:
            combos = [(c, s) for c in sorted(CHECKPOINTS) for s in SEEDS]
            refs, _ = reference_pixels(url, combos)          # also loads both models
            _, single = reference_pixels(url, combos)        # warm single-request latency
            mem = {}
            records, wall, cpu = run_load(url, make_plans(args.clients, args.requests), refs, rounds=args.rounds,
                                     on_round=lambda r: mem.setdefault(r, rss_bytes()))
        finally:
            demo.close()
    s = summarize(records, wall, cpu)
    wrong = sum(r.equal is False for r in records)
    print(f"{args.clients} clients x {args.requests} requests ({args.size}x{args.size}, {args.steps} steps, "
          f"concurrency {args.concurrency}, {os.cpu_count()} CPUs)")
    print(f"single request (warm, one at a time): p50 {percentile(single, 50) * 1000:.0f} ms")
    print(f"{s['requests']} requests in {s['wall_s']:.1f} s ({s['cpu_s']:.0f} CPU s): {s['rate']:.2f} requests/s; "
          "generation latency "
          f"p50 {s['p50_s'] * 1000:.0f} ms, p95 {s['p95_s'] * 1000:.0f} ms")
    print(f"stopped {s['stopped']}, errors {s['errors']}, pixel mismatches {wrong}; RSS after round 1 "
          f"{mem.get(0, 0) / 2**20:.0f} MiB, after the last {mem.get(args.rounds - 1, 0) / 2**20:.0f} MiB")
    return 1 if s["errors"] or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
