"""Speed and peak memory of sd_book's MMDiT against diffusers' SD3Transformer2DModel: same weights, same inputs, one run.

This is a script, not a test module (pytest collects only test_*.py). From the repository root:

    python tests/bench_mmdit.py                              # CPU, float32 (nbs/10_mmdit.ipynb runs this, flagged slow)
    python tests/bench_mmdit.py --device cuda --dtype bf16   # the GPU path: bfloat16, SDPA's flash kernels

It builds a mid-size SD3.5-Medium-like model in diffusers (4 blocks, 512 wide, QK-norm, attn2 in blocks 0
and 1) with diffusers' random initialisation, loads ours from its state dict with `load_mmdit`, moves both to
the device and dtype, and checks that they agree. Then, on 64 x 64 latents (1024 image tokens), 154 text tokens
and a batch of 2, it alternates the two models over `--rounds` forward passes each after `--warmup` passes each,
and reports the fastest and the median time of each, and the peak memory that one forward pass allocates above what was allocated before:
`sd_book.core.peak_memory`: torch.profiler's allocation events on the CPU, torch.cuda.max_memory_allocated
on a GPU. The last line is JSON with the numbers (--json).

Timing on a shared CPU: by default the script runs torch on one thread and measures the CPU time of its own
process (time.process_time), which other processes do not inflate; wall-clock time, or several threads whose
OpenMP workers spin while a sibling is descheduled, would measure the neighbours as much as the models. The
ratio uses the fastest run of each model (other load only ever adds time, as timeit's documentation says);
the medians are printed too. On a GPU it is wall-clock time with the device synchronised.
"""
import argparse
import json
import statistics
import sys
import time

import torch

from sd_book.core import get_device, get_dtype, peak_memory, randn
from sd_book.mmdit import MMDiTConfig, load_mmdit, to_diffusers_config


def seconds(fn, device: torch.device) -> float:
    "Time of fn(): wall clock with the GPU synchronised around it on a GPU, CPU time of this process on the CPU."
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    if device.type == "cuda": torch.cuda.synchronize()
    start = clock()
    fn()
    if device.type == "cuda": torch.cuda.synchronize()
    return clock() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4); p.add_argument("--width", type=int, default=512)
    p.add_argument("--latent", type=int, default=64); p.add_argument("--text", type=int, default=154); p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7); p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto for the best available (default: cpu)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: get_dtype's for the device: fp32 on the CPU, bf16 on a recent GPU)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1; 0: torch's choice)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    import diffusers
    from diffusers import SD3Transformer2DModel
    diffusers.utils.logging.set_verbosity_error()
    device = get_device(a.device)
    dtype = get_dtype(a.dtype, device)
    if a.threads: torch.set_num_threads(a.threads)
    config = MMDiTConfig(depth=a.depth, hidden_size=a.width, num_heads=a.width // 64, pos_embed_max_size=a.latent, qk_norm="rms", attn2_layers=(0, 1))
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**to_diffusers_config(config)).eval()
    ours = load_mmdit({k: v.clone() for k, v in ref.state_dict().items()})
    ref, ours = ref.to(device, dtype), ours.to(device, dtype)
    B, S = a.batch, a.latent
    x, ctx, y = (randn(s, seed=i, device=device, dtype=dtype) for i, s in enumerate([(B, 16, S, S), (B, a.text, 4096), (B, 2048)]))
    t = torch.linspace(100.0, 900.0, B, device=device)
    run_ours = lambda: ours(x, t, ctx, y)
    run_ref = lambda: ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t, return_dict=False)[0]
    with torch.inference_mode():
        diff = (run_ours().float() - run_ref().float()).abs().max().item()
        for _ in range(a.warmup): run_ours(); run_ref()
        times = {"ours": [], "diffusers": []}
        for i in range(a.rounds):                                   # alternate, and alternate who goes first
            order = [("ours", run_ours), ("diffusers", run_ref)][:: 1 if i % 2 == 0 else -1]
            for name, fn in order: times[name].append(seconds(fn, device))
        memory = {"ours": peak_memory(run_ours, device=device), "diffusers": peak_memory(run_ref, device=device)}
    med, best = ({k: f(v) for k, v in times.items()} for f in (statistics.median, min))
    r = dict(device=str(device), dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads(), depth=a.depth, width=a.width,
             image_tokens=(S // 2) ** 2, text_tokens=a.text, batch=B, rounds=a.rounds, max_abs_diff=diff,
             seconds_ours=best["ours"], seconds_diffusers=best["diffusers"], time_ratio=best["ours"] / best["diffusers"],
             median_seconds_ours=med["ours"], median_seconds_diffusers=med["diffusers"], median_time_ratio=med["ours"] / med["diffusers"],
             peak_mib_ours=memory["ours"] / 2**20, peak_mib_diffusers=memory["diffusers"] / 2**20, memory_ratio=memory["ours"] / memory["diffusers"])
    print(f"MMDiT-X {a.depth} blocks x {a.width} wide, {r['image_tokens']} image + {a.text} text tokens, batch {B}, {r['dtype']} on {device}"
          + (f" ({r['threads']} threads)" if device.type == "cpu" else f" ({torch.cuda.get_device_name(device)})"))
    print(f"largest |ours - diffusers|: {diff:.1e}")
    print(f"{'':10s} {'fastest s':>9s} {'median s':>9s} {'all runs (s)':>48s} {'peak MiB':>9s}")
    for k in ("ours", "diffusers"):
        print(f"{k:10s} {best[k]:9.3f} {med[k]:9.3f} {' '.join(f'{s:.3f}' for s in times[k]):>48s} {memory[k] / 2**20:9.1f}")
    print(f"ours / diffusers: time {r['time_ratio']:.3f} (fastest runs), {r['median_time_ratio']:.3f} (medians); peak memory {r['memory_ratio']:.3f}")
    if a.json: print(json.dumps(r))
    return r


if __name__ == "__main__":
    main(sys.argv[1:])
