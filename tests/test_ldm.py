"SD 1 / 2 pipelines (chapter 17): layout detection and bad inputs."
import json

import pytest
import torch

from sd_book.ldm import LDMSchedule, is_ldm_model, ldm_schedule_from_config, sample_ldm
from safetensors.torch import save_file


def test_is_ldm_model(tmp_path):
    (tmp_path / "sd15" / "unet").mkdir(parents=True)
    assert is_ldm_model(tmp_path / "sd15")
    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert not is_ldm_model(sd3)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, tmp_path / "sd1.safetensors")
    save_file({"model.diffusion_model.joint_blocks.0.x": torch.zeros(1)}, tmp_path / "sd3.safetensors")
    assert is_ldm_model(tmp_path / "sd1.safetensors")
    assert not is_ldm_model(tmp_path / "sd3.safetensors")
    assert not is_ldm_model(tmp_path / "missing")


def test_schedule_errors():
    with pytest.raises(ValueError, match="pass sampler="):
        ldm_schedule_from_config({"_class_name": "LMSDiscreteScheduler"})
    with pytest.raises(ValueError, match="Unknown sampler"):
        LDMSchedule(sampler="euler")
    with pytest.raises(ValueError, match="timestep_spacing"):
        LDMSchedule(timestep_spacing="uniform")
    ts, sg = LDMSchedule().set_timesteps(3)
    with pytest.raises(ValueError, match="Unknown sampler"):
        sample_ldm(lambda x, t: x, torch.zeros(1, 4, 2, 2), ts, sg, "heun")


def test_from_pretrained_rejects_other_models(tmp_path):
    from sd_book.ldm import LDMPipeline

    with pytest.raises(FileNotFoundError, match="not an SD 1 / 2 model"):
        LDMPipeline.from_pretrained(tmp_path)
