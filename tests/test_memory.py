"""Chapter 18 across chapters: fp8 parts of an all-in-one single file (chapters 5, 8, 10), and the CUDA paths of block
offload and peak-memory measurement, which run only where a GPU is present."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from sd_book.checkpoints import CheckpointError
from sd_book.memory import (
    MODES,
    FP8Linear,
    disable_block_offload,
    enable_block_offload,
    expected_peak_memory,
    load_mmdit_fp8,
    load_t5_fp8,
    module_bytes,
    quantize_fp8,
)
from sd_book.mmdit import MMDiT, MMDiTConfig
from sd_book.t5 import T5Config, T5Encoder

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_mmdit(config: MMDiTConfig, seed: int = 0) -> MMDiT:
    "An MMDiT with every weight random (chapter 10's init zeroes adaLN and the output layer), in eval mode."
    g = torch.Generator().manual_seed(seed)
    model = MMDiT(config).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        scale = p[0].numel() ** -0.5 if p.ndim >= 2 else 0.02
        p.copy_(
            torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith(("ln_q.weight", "ln_k.weight")) else 0)
        )
    return model


def inputs(config: MMDiTConfig, batch: int = 2, size: int = 16, text: int = 7, device="cpu", seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, config.in_channels, size, size, generator=g).to(device),
        torch.linspace(900, 100, batch).to(device),
        torch.randn(batch, text, config.context_dim, generator=g).to(device),
        torch.randn(batch, config.pooled_dim, generator=g).to(device),
    )


@torch.no_grad()
def test_all_in_one_fp8_file(tmp_path):
    "An SD3-style all-in-one file: a scaled fp8 MMDiT (ComfyUI's names) beside an unscaled fp8 T5; each loads alone."
    mmdit = quantize_fp8(random_mmdit(MMDiTConfig.tiny()))
    t5 = T5Encoder(T5Config.tiny()).eval()
    state = {"model.diffusion_model.scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in mmdit.state_dict().items():
        state["model.diffusion_model." + (k[:-5] + "scale_weight" if k.endswith(".scale") else k)] = v
    state |= {f"text_encoders.t5xxl.transformer.{k}": v.to(torch.float8_e4m3fn) for k, v in t5.state_dict().items()}
    save_file(state, tmp_path / "all_in_one_fp8.safetensors")

    loaded = load_mmdit_fp8(tmp_path / "all_in_one_fp8.safetensors", dtype=torch.float32)
    assert torch.equal(loaded(*inputs(MMDiTConfig.tiny())), mmdit(*inputs(MMDiTConfig.tiny())))
    assert module_bytes(loaded) == module_bytes(mmdit)
    t5_loaded = load_t5_fp8(tmp_path / "all_in_one_fp8.safetensors", dtype=torch.float32)
    ids = torch.randint(0, 32000, (2, 5), generator=torch.Generator().manual_seed(0))
    upcast = copy.deepcopy(t5)
    for p in upcast.parameters():
        p.data = p.data.to(torch.float8_e4m3fn).float()  # what the file holds
    assert torch.equal(t5_loaded(ids), upcast(ids))
    assert isinstance(t5_loaded.encoder.block[0].layer[0].SelfAttention.q, FP8Linear)


def test_scaled_fp8_in_diffusers_layout_is_refused():
    state = {
        "pos_embed.proj.weight": torch.zeros(8, 16, 2, 2),
        "transformer_blocks.0.attn.to_q.weight": torch.zeros(8, 8, dtype=torch.float8_e4m3fn),
        "transformer_blocks.0.attn.to_q.scale_weight": torch.ones(()),
    }
    with pytest.raises(CheckpointError, match="diffusers' layout"):
        load_mmdit_fp8(state)


@cuda
@torch.no_grad()
def test_block_offload_on_cuda():
    "Prefetching on a side stream: the same velocity as the model on the GPU, blocks home and pinned, less memory."
    config = MMDiTConfig(
        depth=6,
        hidden_size=256,
        num_heads=4,
        pos_embed_max_size=32,
        sample_size=32,
        context_dim=128,
        pooled_dim=64,
        qk_norm="rms",
    )
    model = random_mmdit(config).to("cuda", torch.bfloat16)
    x = inputs(config, size=32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    reference, skipped = model(*x), model(*x, skip_layers=[2, 3])
    torch.cuda.synchronize()
    peak_on_gpu = torch.cuda.max_memory_allocated()

    offloaded = enable_block_offload(copy.deepcopy(model), "cuda", prefetch=True)
    del model
    state = offloaded.block_offload
    assert state.stream is not None and state.pin
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):  # several calls: the prefetch of block 0 and the releases must line up each time
        assert torch.equal(offloaded(*x), reference)
        assert torch.equal(offloaded(*x, skip_layers=[2, 3]), skipped)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() < peak_on_gpu
    assert state.loaded == {}
    for block in offloaded.joint_blocks:
        for p in block.parameters():
            assert p.device.type == "cpu" and p.is_pinned()
    assert offloaded.x_embedder.proj.weight.device.type == "cuda"
    disable_block_offload(offloaded)
    assert all(p.device.type == "cuda" for p in offloaded.parameters())
    assert torch.equal(offloaded(*x), reference)


@cuda
def test_measured_peak_memory_is_near_the_expected():
    from sd_book.memory import measure_peak_memory
    from sd_book.pipeline import SD3Pipeline

    pipe = SD3Pipeline.from_pretrained(device="cuda", dtype=torch.bfloat16)
    settings = dict(pipe.recommended, height=256, width=256, progress=False)
    for mode in MODES:
        if mode == "model":
            pipe.enable_offload("cuda")
        if mode == "block":
            enable_block_offload(pipe)
        expected = expected_peak_memory(
            pipe,
            mode,
            height=256,
            width=256,
            batch=2,
            max_sequence_length=settings["max_sequence_length"],
            t5=pipe.t5 is not None,
        )["peak"]
        measured = measure_peak_memory(pipe, ["a red circle", "two blue squares"], **settings)
        assert 0.5 * expected < measured < 2 * expected + 2**25, (mode, measured, expected)
