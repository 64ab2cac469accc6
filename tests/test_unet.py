"""sd_book.unet: checkpoint layouts (LDM .ckpt / .safetensors, full checkpoints, diffusers folders) and errors."""

import pytest
import torch

from sd_book.checkpoints import CheckpointError
from sd_book.unet import LDM_UNET_PREFIX, UNetConfig, UNetModel, load_unet, save_unet

CONFIG = UNetConfig.tiny(channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1), context_dim=24)
HEADS = dict(num_heads=2, norm_num_groups=8)  # not in the weights


@pytest.fixture(autouse=True)
def no_grad():
    "These tests only run models; other test files may have left gradients on."
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    m = UNetModel(CONFIG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m


def _predict(m):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 5, 24, generator=g)
    return m(x, torch.tensor([1.0, 800.0]), ctx)


@pytest.mark.parametrize("layout", ["diffusers", "ldm", "ckpt", "pipeline"])
def test_layouts_round_trip(unet, tmp_path, layout):
    if layout == "diffusers":
        source, kw = save_unet(unet, tmp_path / "unet"), {}
    elif layout == "pipeline":
        save_unet(unet, tmp_path / "pipe" / "unet")
        source, kw = tmp_path / "pipe", {}
    elif layout == "ldm":
        source, kw = save_unet(unet, tmp_path / "m.safetensors", layout="ldm"), HEADS
    else:
        state = {LDM_UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
        state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(2)
        torch.save({"state_dict": state}, tmp_path / "m.ckpt")
        source, kw = tmp_path / "m.ckpt", HEADS
    loaded = load_unet(source, **kw)
    assert loaded.config == CONFIG
    assert torch.equal(_predict(loaded), _predict(unet))


def test_strict_loading_names_keys(unet):
    state = dict(unet.state_dict())
    del state["middle_block.1.proj_out.weight"]
    with pytest.raises(CheckpointError, match="missing 1 key: middle_block.1.proj_out.weight"):
        load_unet(state, **HEADS)
    with pytest.raises(CheckpointError, match="unexpected 1 key: extra.weight"):
        load_unet({**unet.state_dict(), "extra.weight": torch.zeros(1)}, **HEADS)
    with pytest.raises(CheckpointError, match="does not look like an SD 1.x / 2.x UNet"):
        load_unet({"joint_blocks.0.x": torch.zeros(1)})


def test_dtype_follows(unet):
    half = load_unet(unet.state_dict(), dtype=torch.bfloat16, **HEADS)
    assert next(half.parameters()).dtype == torch.bfloat16
    x = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    assert half(x, 10, torch.randn(1, 3, 24)).dtype == torch.bfloat16


def test_bad_inputs(unet):
    ctx = torch.randn(1, 5, 24)
    with pytest.raises(ValueError, match="multiples of 4"):
        unet(torch.randn(1, 4, 10, 8), 1, ctx)
    with pytest.raises(ValueError, match="context must be shaped"):
        unet(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 24))
