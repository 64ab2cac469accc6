"""Peak memory of loading a checkpoint: sd_book's light loader against the naive way.

This is a script, not a test module (pytest collects only test_*.py). From the repository root:

    python tests/bench_checkpoints.py                  # a ~1 GB random checkpoint
    python tests/bench_checkpoints.py --size-mb 128    # quicker (nbs/05_checkpoints.ipynb runs this one)

It writes a random float32 safetensors file of Linear layers to a temporary folder, then loads it in
fresh subprocesses, so that every measurement starts from the same baseline:

    ours        build the module on the meta device, `load_into` from the memory-mapped file
    ours->bf16  the same, casting to bfloat16 while loading
    naive       build the module on the CPU, `safetensors.torch.load_file`, `module.load_state_dict`

Each child touches every parameter afterwards (a checksum), so pages that are mapped but never read
cannot flatter the numbers. It prints the peak resident set size (VmHWM, reset just before loading so
that transient peaks of the imports do not count) of each, above the RSS the process had before
loading (imports included in the baseline), and the ratios to the file size.
With --json the last line is a JSON object with the same numbers. Linux only (/proc/self/status).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

MODES = ("ours", "ours->bf16", "naive")


class Stack(torch.nn.Module):
    "`n_layers` Linear(width, width) layers: the weights of a transformer without the transformer."

    def __init__(self, n_layers: int, width: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(n_layers))


def status_kb(field: str) -> int:
    "A field of /proc/self/status in kB (VmRSS: resident now, VmHWM: the peak so far)."
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"): return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    "Reset VmHWM to the current RSS (writing 5 to /proc/self/clear_refs, Linux >= 4.0), so that the peak counts from now, not from import time."
    with open("/proc/self/clear_refs", "w") as f: f.write("5")


def child(mode: str, path: str, n_layers: int, width: int) -> None:
    "Load `path` the `mode` way in this (fresh) process and print one JSON line with the memory numbers."
    from safetensors.torch import load_file
    from sd_book.checkpoints import load_into
    reset_peak()
    before = status_kb("VmRSS")
    start = time.perf_counter()
    if mode == "naive":
        model = Stack(n_layers, width)
        model.load_state_dict(load_file(path))
    else:
        model = load_into(lambda: Stack(n_layers, width), path, dtype=torch.bfloat16 if mode == "ours->bf16" else None)
    checksum = sum(p.sum().item() for p in model.parameters())   # touches every byte; sums in the native dtype, so no temporary copy
    seconds = time.perf_counter() - start
    print(json.dumps(dict(before_kb=before, peak_kb=status_kb("VmHWM"), checksum=checksum, seconds=seconds)))


def run(size_mb: float = 1024, width: int = 4096) -> dict:
    "Write a ~`size_mb` MiB random checkpoint to a temporary folder, measure every mode in a subprocess, delete the file."
    from safetensors.torch import save_file
    n_layers = max(1, round(size_mb * 2**20 / (4 * width * (width + 1))))
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_checkpoints_") as folder:
        path = os.path.join(folder, "stack.safetensors")
        state = {}
        for i in range(n_layers):
            state[f"layers.{i}.weight"] = torch.randn(width, width, generator=g)
            state[f"layers.{i}.bias"] = torch.randn(width, generator=g)
        save_file(state, path)
        del state
        results = dict(file_kb=os.path.getsize(path) / 1024, n_layers=n_layers, width=width)
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--child", mode, path, str(n_layers), str(width)],
                                 capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def table(r: dict) -> str:
    "The results side by side."
    mib = lambda kb: kb / 1024
    lines = [f"checkpoint: {mib(r['file_kb']):.0f} MiB ({r['n_layers']} x Linear({r['width']}, {r['width']}), float32)",
             f"{'method':<11} {'RSS before':>11} {'peak RSS':>9} {'peak - before':>14} {'/ file size':>12} {'seconds':>8}"]
    for mode in MODES:
        m = r[mode]
        extra = m["peak_kb"] - m["before_kb"]
        lines.append(f"{mode:<11} {mib(m['before_kb']):>7.0f} MiB {mib(m['peak_kb']):>5.0f} MiB {mib(extra):>10.0f} MiB "
                     f"{extra / r['file_kb']:>11.2f}x {m['seconds']:>8.1f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=float, default=1024, help="size of the random checkpoint in MiB")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    p.add_argument("--child", nargs=4, metavar=("MODE", "PATH", "N_LAYERS", "WIDTH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        mode, path, n_layers, width = args.child
        return child(mode, path, int(n_layers), int(width))
    results = run(args.size_mb)
    print(table(results))
    if args.json: print(json.dumps(results))


if __name__ == "__main__":
    main()
