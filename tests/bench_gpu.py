"""One denoising step of SD3.5 Large- and Medium-shaped MMDiTs: sd_book against diffusers, eager and compiled.

This is a script, not a test module (pytest collects only test_*.py; tests/test_speed.py runs it small). From the
repository root:

    python tests/bench_gpu.py                     # on a CUDA GPU: SD3.5 Large and Medium shapes, 1024 x 1024, bf16
    python tests/bench_gpu.py --small             # tiny shapes in fp32 on the CPU (the default without CUDA)
    python tests/bench_gpu.py --models large --compile whole --mode max-autotune-no-cudagraphs --sdpa cudnn

Both models get random weights, never downloaded: sd_book's MMDiT is built on the meta device, moved to the GPU
empty (`to_empty`) and initialised there, and diffusers' SD3Transformer2DModel, also built on the meta device, is
given the same tensors (`mmdit_to_diffusers` + `load_state_dict(assign=True)`: the two models share their weights'
memory). For each model the script times one forward pass at batch 2 (classifier-free guidance runs the conditional
and unconditional halves as one batch) with 333 text tokens (77 CLIP + 256 T5): sd_book eager, diffusers eager, then
both compiled (sd_book with `compile_mmdit`, diffusers with the same regional or whole compile), each the median of
--rounds steps after --warmup steps, with a new timestep every step. It prints, for each, the time per step, the
FLOP/s achieved (FLOPs from `mmdit_forward_flops`) and their fraction of the GPU's dense bf16 peak (`peak_tflops`, or
--peak-tflops), the peak memory of the step (above what was allocated before it) and, on a GPU, the allocator's
absolute peak (torch.cuda.max_memory_allocated), the number of graphs each compiled model compiled (before timing
and after: equal when no step recompiled), the first compiled call's seconds (compile time), and the largest
difference from sd_book eager relative to its largest output. The last line is JSON (--json).

Timing: on a GPU, wall-clock time with torch.cuda.synchronize() around each step; on the CPU, the CPU time of this
process on one thread (time.process_time, which other processes do not inflate). Nothing here asserts a time.
"""

import argparse
import contextlib
import json
import statistics
import sys
import time
import types

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sd_book.core import get_device, get_dtype, peak_memory, randn
from sd_book.mmdit import (
    MMDiT,
    MMDiTConfig,
    mmdit_num_params,
    mmdit_to_diffusers,
    sincos_pos_table,
    to_diffusers_config,
)
from sd_book.speed import (
    CompileCounter,
    compile_mmdit,
    mmdit_forward_flops,
    peak_tflops,
)

FULL = {"large": ("SD3.5 Large", MMDiTConfig.sd35_large()), "medium": ("SD3.5 Medium", MMDiTConfig.sd35_medium())}
TINY = {
    "hidden_size": 128,
    "num_heads": 2,
    "pos_embed_max_size": 16,
    "sample_size": 16,
    "context_dim": 64,
    "pooled_dim": 32,
}
SMALL = {  # the same kinds of blocks, tiny: Large has plain blocks and a last block, Medium adds MMDiT-X's attn2 blocks
    "large": ("SD3.5 Large", MMDiTConfig(depth=2, qk_norm="rms", **TINY)),
    "medium": ("SD3.5 Medium", MMDiTConfig(depth=3, qk_norm="rms", attn2_layers=(0,), **TINY)),
}
SDPA = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def parse_args(argv=None) -> argparse.Namespace:
    "The options; --small is the default where CUDA is not available."
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--small",
        action="store_true",
        default=not torch.cuda.is_available(),
        help="tiny shapes (default without CUDA): 2-3 blocks 128 wide, 128 x 128 pixels, 16 text tokens",
    )
    p.add_argument("--models", default="large,medium", help="comma-separated: large, medium (default: both)")
    p.add_argument("--size", type=int, help="picture side in pixels (default 1024; 128 with --small)")
    p.add_argument("--text", type=int, help="text tokens (default 333 = 77 CLIP + 256 T5; 16 with --small)")
    p.add_argument("--batch", type=int, default=2, help="batch (default 2: classifier-free guidance)")
    p.add_argument("--rounds", type=int, default=10, help="timed steps per variant; the median is reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first compiled one compiles)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default: auto)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument(
        "--compile",
        default="regional",
        choices=["regional", "whole", "none"],
        help="regional: each joint block compiled on its own (default); whole: the whole forward",
    )
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--mode", help="Inductor mode, e.g. max-autotune-no-cudagraphs (default: Inductor's default)")
    p.add_argument(
        "--sdpa", default="auto", choices=["auto", *SDPA], help="attention kernel (default: PyTorch's choice)"
    )
    p.add_argument(
        "--peak-tflops", type=float, help="the device's dense peak in TFLOP/s, if not in sd_book.speed's table"
    )
    p.add_argument("--skip-diffusers", action="store_true", help="time sd_book only")
    p.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    return p.parse_args(argv)


def random_mmdit(config: MMDiTConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> MMDiT:
    """An MMDiT with random weights made on `device` directly: built on the meta device (no memory, no init), moved
    empty, then filled: weights N(0, 1/fan_in), biases N(0, 0.02^2), RMSNorm weights 1, the sin-cos position table."""
    with torch.device("meta"):
        model = MMDiT(config)
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, (p[0].numel()) ** -0.5, generator=g)
            elif name.endswith(("ln_q.weight", "ln_k.weight")):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        grid, base = config.pos_embed_max_size, config.sample_size // config.patch_size
        model.pos_embed.copy_(sincos_pos_table(config.hidden_size, grid, base, device=device)[None])
    return model.eval()


def diffusers_twin(model: MMDiT):
    "diffusers' SD3Transformer2DModel holding `model`'s tensors (shared, not copied), built on the meta device."
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        ref = SD3Transformer2DModel(**to_diffusers_config(model.config))
    ref.load_state_dict(mmdit_to_diffusers(model.state_dict()), strict=True, assign=True)
    left = [n for n, t in [*ref.named_parameters(), *ref.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"diffusers' model kept tensors on the meta device: {left[:5]}")
    return ref.eval()


def compile_diffusers(ref, args) -> CompileCounter:
    "Compile diffusers' model as compile_mmdit compiles ours: each transformer block's forward, or the whole forward."
    counter = CompileCounter(args.backend, args.mode)
    if args.compile == "regional":
        forward = torch.compile(type(ref.transformer_blocks[0]).forward, backend=counter, fullgraph=True, dynamic=False)
        for block in ref.transformer_blocks:
            block.forward = types.MethodType(forward, block)
    else:
        ref.compile(backend=counter, dynamic=False)  # not fullgraph: a graph break shows as more graphs
    return counter


def seconds(fn, device: torch.device) -> float:
    "Time of fn(): wall clock with the GPU synchronised on a GPU, CPU time of this process on the CPU."
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def measure(step, args, device, graphs=lambda: 0) -> dict:
    """Run step(0) (timed as first_s: it includes compiling), step(1 ... warmup - 1), then --rounds timed steps with
    new timesteps, then one more for the memory; graphs() is read after the warm-up and at the end. The output of
    step(0) is returned as 'out'."""
    outs = []
    first = seconds(lambda: outs.append(step(0).float()), device)
    for i in range(1, args.warmup):
        step(i)
    warm = graphs()
    times = [seconds(lambda i=i: step(args.warmup + i), device) for i in range(args.rounds)]
    extra = peak_memory(lambda: step(0), device=device)  # resets the allocator's peak on a GPU
    top = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "out": outs[0],
        "first_s": first,
        "median_s": statistics.median(times),
        "times_s": times,
        "step_bytes": extra,
        "max_bytes": top,
        "graphs_warm": warm,
        "graphs": graphs(),
    }


def bench_model(key: str, args, device, dtype) -> list:
    "The rows (sd_book and diffusers, eager and compiled) of one model."
    name, config = (SMALL if args.small else FULL)[key]
    size, text, B = args.size or (128 if args.small else 1024), args.text or (16 if args.small else 333), args.batch
    S = size // 8  # latent side
    torch._dynamo.reset()
    ours = random_mmdit(config, device, dtype)
    ref = None if args.skip_diffusers else diffusers_twin(ours)
    shapes = [(B, config.in_channels, S, S), (B, text, config.context_dim), (B, config.pooled_dim)]
    x, ctx, y = (randn(s, seed=i + 1, device=device, dtype=dtype) for i, s in enumerate(shapes))
    ts = torch.linspace(1000.0, 0.0, args.warmup + args.rounds + 1, device=device)  # a new timestep every step
    run = {
        "sd_book": lambda i: ours(x, ts[i].expand(B), ctx, y),
        "diffusers": lambda i: ref(
            hidden_states=x,
            encoder_hidden_states=ctx,
            pooled_projections=y,
            timestep=ts[i].expand(B),
            return_dict=False,
        )[0],
    }
    impls = ["sd_book"] + ([] if ref is None else ["diffusers"])
    flops = mmdit_forward_flops(config, S, S, text, B)
    n_params = mmdit_num_params(config)
    print(
        f"\n{name}-shaped MMDiT{' (small)' if args.small else ''}, random weights: {config.depth} blocks x "
        f"{config.hidden_size}, {n_params / 1e9:.3f} B parameters "
        f"({n_params * dtype.itemsize / 2**30:.2f} GiB, shared by both models)"
    )
    print(
        f"{size} x {size} pixels = {S} x {S} latent: {(S // config.patch_size) ** 2} image + {text} text tokens, "
        f"batch {B}; one forward = {flops / 1e12:.4g} TFLOP"
    )
    rows, reference = [], None
    with torch.inference_mode():
        for compiled in [False, True] if args.compile != "none" else [False]:
            counters = {}
            if compiled:
                regional = args.compile == "regional"
                counters["sd_book"] = compile_mmdit(ours, args.mode, regional, args.backend).compile_counter
                if ref is not None:
                    counters["diffusers"] = compile_diffusers(ref, args)
            for impl in impls:
                r = measure(run[impl], args, device, (lambda c=counters[impl]: c.count) if compiled else (lambda: 0))
                out = r.pop("out")
                reference = out if reference is None else reference
                rel = ((out - reference).abs().max() / reference.abs().max()).item()
                r.update(
                    model=name,
                    impl=impl,
                    mode="compiled" if compiled else "eager",
                    rel_diff=rel,
                    flops=flops,
                    tflops=flops / r["median_s"] / 1e12,
                )
                rows.append(r)
    return rows


def print_rows(rows: list, peak: tuple | None) -> None:
    "The table: one row per implementation and mode."
    mib = lambda b: "-" if b is None else f"{b / 2**20:9.1f}"
    print(
        f"{'':10s} {'':9s} {'ms/step':>9s} {'TFLOP/s':>8s} {'of peak':>8s} {'step MiB':>9s} {'max MiB':>9s} "
        f"{'graphs':>7s} {'first s':>8s} {'rel diff':>9s}"
    )
    for r in rows:
        frac = f"{r['tflops'] / peak[1]:8.1%}" if peak else f"{'-':>8s}"
        graphs = f"{r['graphs_warm']}->{r['graphs']}" if r["mode"] == "compiled" else "-"
        print(
            f"{r['impl']:10s} {r['mode']:9s} {r['median_s'] * 1e3:9.2f} {r['tflops']:8.3f} {frac} "
            f"{mib(r['step_bytes']):>9s} {mib(r['max_bytes']):>9s} {graphs:>7s} {r['first_s']:8.2f} "
            f"{r['rel_diff']:9.1e}"
        )


def main(argv=None) -> list:
    args = parse_args(argv)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    device = get_device("cpu" if args.small and args.device == "auto" else args.device)
    dtype = get_dtype(args.dtype or ("fp32" if device.type == "cpu" else None), device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    peak = ("--peak-tflops", args.peak_tflops) if args.peak_tflops else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, 1 thread"
    peak = peak or (peak_tflops(name) if device.type == "cuda" else None)
    print(
        f"{name}; {str(dtype).replace('torch.', '')}; torch {torch.__version__}, diffusers {diffusers.__version__}; "
        f"compile: {args.compile} ({args.backend}, mode {args.mode or 'default'}); sdpa: {args.sdpa}; "
        + (f"peak {peak[1]:g} TFLOP/s ({peak[0]})" if peak else "peak unknown (pass --peak-tflops)")
    )
    rows = []
    with sdpa_kernel([SDPA[args.sdpa]]) if args.sdpa != "auto" else contextlib.nullcontext():
        for key in args.models.split(","):
            if key not in FULL:
                raise SystemExit(f"Unknown model {key!r}: expected large or medium")
            rows_model = bench_model(key, args, device, dtype)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the model's weights are gone with bench_model's frame
            print_rows(rows_model, peak)
            rows += rows_model
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "times_s"} | {"times_s": r["times_s"]} for r in rows]))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
