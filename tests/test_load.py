"""Load held (issue 8): 8 gradio_client clients x 50 requests against the app with two tiny checkpoints.

The app runs in this process (as in tests/test_app.py) with tiny SD 1.x and SD 2.x checkpoints; each client is a
session of its own running a fixed, seeded plan (bench/app_load.py, shared with the benchmark): 64x64 two-step
generations mixed between the checkpoints and 4 seeds each, ten-step runs stopped through `/stop_<tab>` once
they report a step, and Stops with nothing running. Checked: every request answers within its timeout; every
generation that ran to the end equals its single-request reference pixel for pixel; every stopped run stopped
early with its one image; every idle Stop says "nothing is running"; resident memory after the last round is
within 10% of that after the first; and the run's time is bounded by the single requests' time.
"""
from __future__ import annotations

import os
from collections import Counter

import pytest

from bench.app_load import (CHECKPOINTS, SEEDS, STOP_RUN_STEPS, TINY_LAYOUTS, make_plans, reference_pixels,
                            rss_bytes, run_load, start_app, summarize)

CLIENTS, PER_CLIENT, ROUNDS = 8, 50, 5
REQUEST_TIMEOUT = 60.0     # seconds for one request, queueing included: past it the request counts as hung
# The run's time is bounded relative to this machine's own single-request time, measured in the same run (the
# median latency of the 8 reference requests, one at a time): the 400 requests may take at most WALL_RATIO x and
# CPU_RATIO x (400 x that median) of wall-clock and CPU seconds. On 2026-12-01 the test alone measured 153.5 s wall
# and 194 CPU s for a 471 ms median, ratios 0.81 and 1.03: the requests of eight clients cost about what they cost
# alone, and run on about 1.3 cores (the app and the clients share one process and its GIL). Absolute bounds
# (180 s) had come within 15% of what an idle machine measures; a slower or shared CI machine scales both sides.
WALL_RATIO, CPU_RATIO = 1.25, 1.6


@pytest.fixture(scope="module")
def load_app(tiny_files, tmp_path_factory):
    models = tmp_path_factory.mktemp("load-models")
    for name, layout in TINY_LAYOUTS.items():
        os.symlink(tiny_files(layout), models / name)
    outputs = tmp_path_factory.mktemp("load-outputs")
    url, demo = start_app(models, outputs, concurrency=2)
    yield url, outputs
    demo.close()


def test_eight_clients_fifty_requests_each(load_app):
    url, outputs = load_app
    combos = [(c, s) for c in sorted(CHECKPOINTS) for s in SEEDS]
    refs, single = reference_pixels(url, combos)
    assert len({r.tobytes() for r in refs.values()}) == len(combos)     # 8 different references, none blank
    assert all(r.shape == (64, 64, 3) and r.std() > 0 for r in refs.values())

    plans = make_plans(CLIENTS, PER_CLIENT)
    kinds = Counter(op.kind for plan in plans for op in plan)
    assert sum(kinds.values()) == 400 and kinds["stop"] >= 20 and kinds["stop-run"] >= 20
    assert {op.checkpoint for plan in plans for op in plan} == set(CHECKPOINTS)

    memory = {}
    records, wall, cpu = run_load(url, plans, refs, rounds=ROUNDS, timeout=REQUEST_TIMEOUT,
                                  on_round=lambda r: memory.setdefault(r, rss_bytes()))
    stats = summarize(records, wall, cpu)
    print(f"\nload: {stats['requests']} requests in {wall:.1f} s ({cpu:.0f} CPU s), {stats['rate']:.2f} requests/s, "
          f"generation p50 {stats['p50_s'] * 1000:.0f} ms, p95 {stats['p95_s'] * 1000:.0f} ms; single "
          f"{sorted(single)[len(single) // 2] * 1000:.0f} ms; RSS {memory[0] / 2**20:.0f} -> "
          f"{memory[ROUNDS - 1] / 2**20:.0f} MiB")

    # nothing lost, nothing hung, nothing failed
    assert sorted((r.client, r.index) for r in records) == [(c, i) for c in range(CLIENTS) for i in range(PER_CLIENT)]
    errors = [f"client {r.client} #{r.index} {r.op}: {r.error}" for r in records if r.error]
    assert not errors, "\n".join(errors[:10])
    # every finished generation equals its single-request reference
    gens = [r for r in records if r.op.kind == "generate"]
    assert all(not r.stopped and r.status.startswith("done: 1 image(s), 2 steps") for r in gens)
    assert [r for r in gens if r.equal is not True] == []
    # Stop through the API: the client's own run stops early and returns its image; idle Stops say so
    stop_runs = [r for r in records if r.op.kind == "stop-run"]
    assert all(r.stop_answer == "stopping after the current step" for r in stop_runs)
    done = [int(r.status.split("stopped after ")[1].split()[0]) for r in stop_runs if r.stopped]
    assert len(done) == len(stop_runs) and max(done) < STOP_RUN_STEPS
    assert all(r.images == 1 for r in stop_runs)
    assert {r.status for r in records if r.op.kind == "stop"} == {"nothing is running"}
    # every image that came back was saved once (a stopped run saves its image too)
    assert len(list(outputs.rglob("*.png"))) == len(combos) + len(gens) + len(stop_runs)
    # memory held, time bounded
    assert memory[ROUNDS - 1] <= 1.10 * memory[0], memory
    alone = CLIENTS * PER_CLIENT * sorted(single)[len(single) // 2]   # seconds, had they run one at a time
    assert wall < WALL_RATIO * alone and cpu < CPU_RATIO * alone, (wall, cpu, alone)
