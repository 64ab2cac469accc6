"""tests/bench_gpu.py on the CPU: tiny SD3.5 Large- and Medium-shaped models in fp32, the rows it prints, and what
they must say about agreement and compilation. Timing is never asserted.

The compiled rows here use the `aot_eager` backend (Dynamo and AOTAutograd, no code generation): the graphs and
recompilations counted are Dynamo's, the same with Inductor, and the run takes seconds instead of a minute of C++
compiles. nbs/19_speed.ipynb compiles with Inductor (and runs this script with it, in a slow cell)."""

import json
import subprocess
import sys
from pathlib import Path

import bench_gpu  # tests/ is on sys.path (conftest.py)
import pytest
import torch

from sd_book.mmdit_exercises import mmdit_flops

ROOT = Path(__file__).resolve().parents[1]
MODELS, IMPLS = ("SD3.5 Large", "SD3.5 Medium"), ("sd_book", "diffusers")
PEAK = 0.5  # TFLOP/s given with --peak-tflops, so that the 'of peak' column is printed


@pytest.fixture(scope="module")
def bench():
    "The script's stdout and its JSON rows, from one run in a fresh process (Dynamo's caches start empty)."
    args = ["--small", "--device", "cpu", "--backend", "aot_eager", "--rounds", "2", "--warmup", "1"]
    args += ["--peak-tflops", str(PEAK), "--json"]
    done = subprocess.run(
        [sys.executable, "tests/bench_gpu.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(done.stdout.splitlines()[-1])


def test_small_is_the_default_without_cuda():
    test_args = bench_gpu.parse_args([])
    assert test_args.small == (not torch.cuda.is_available())
    assert (test_args.batch, test_args.compile) == (2, "regional")


def test_every_row_is_printed(bench):
    out, rows = bench
    want = [(m, i, mode) for m in MODELS for mode in ("eager", "compiled") for i in IMPLS]
    assert [(r["model"], r["impl"], r["mode"]) for r in rows] == want
    table = [line.split() for line in out.splitlines() if line.split()[:1] in (["sd_book"], ["diffusers"])]
    assert [(line[0], line[1]) for line in table] == [(i, mode) for _, i, mode in want]
    assert out.count("-shaped MMDiT (small), random weights") == 2
    for line, r in zip(table, rows):
        assert float(line[2]) == pytest.approx(r["median_s"] * 1e3, abs=0.006)  # ms/step, 2 decimals
        assert line[4] == f"{r['tflops'] / PEAK:.1%}"  # the fraction of the peak
        assert line[7] == (f"{r['graphs_warm']}->{r['graphs']}" if r["mode"] == "compiled" else "-")


def test_flops_are_chapter_10s(bench):
    "The FLOPs the script divides by are chapter 10's count (an independent solution, batch 1) times the batch."
    _, rows = bench
    for r in rows:
        config = bench_gpu.SMALL["large" if r["model"] == "SD3.5 Large" else "medium"][1]
        assert r["flops"] == 2 * mmdit_flops(config, 16, 16, 16)
        assert r["tflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e12)


def test_agreement(bench):
    """Same weights and inputs in fp32: diffusers within 1e-5 of sd_book (a different order of the same sums: split
    q, k, v against our fused qkv, ~1e-7 per operation; measured 4e-7), compiled within 1e-5 of eager."""
    _, rows = bench
    assert rows[0]["rel_diff"] == 0.0  # the reference itself
    assert all(r["rel_diff"] < 1e-5 for r in rows)


def test_compiled_once_and_never_again(bench):
    """Regional compilation: one graph per kind of block (Large: plain + last; Medium: attn2 + plain + last), for
    both implementations, all during warm-up: no timed step (each with a new timestep) recompiled."""
    _, rows = bench
    for r in rows:
        if r["mode"] == "compiled":
            kinds = 2 if r["model"] == "SD3.5 Large" else 3
            assert (r["graphs_warm"], r["graphs"]) == (kinds, kinds), r
