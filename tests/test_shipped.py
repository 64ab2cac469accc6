"""The tiny SD3 shipped in sd_book/assets/tiny-sd3: loaded by default, a genuine SD3 that diffusers draws the same pictures with,
and the default model of `sd-book generate`."""
import json
import warnings

import pytest
import torch
from PIL import Image

from sd_book.core import randn
from sd_book.pipeline import SD3Pipeline, main, shipped_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a photo of a red circle above a blue square", "a photo of three triangles", "a photo of a square", ""]


@pytest.fixture(scope="module")
def tiny():
    return SD3Pipeline.from_pretrained()


def test_loads_by_default_with_its_settings(tiny):
    card = json.loads((shipped_model() / "sd_book.json").read_text())
    assert tiny.name == card["name"] == "tiny-sd3"
    assert tiny.recommended == card["recommended"] and tiny.recommended["height"] == tiny.recommended["width"] == 64
    assert tiny.t5 is None and tiny.recommended["max_sequence_length"] == 0
    assert tiny("a photo of a circle", seed=0, progress=False)[0].size == (64, 64)         # unset arguments take the recommended settings


def test_loads_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # a model made without T5 does not warn that T5 is missing
        SD3Pipeline.from_pretrained()


def test_within_the_size_budget():
    files = [p for p in shipped_model().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 16 * 2**20
    assert not any(p.suffix in (".pt", ".ckpt") for p in files)                             # final weights only, no checkpoints
    weights = [p for p in files if p.suffix == ".safetensors"]
    from safetensors import safe_open
    for p in weights:
        with safe_open(p, "pt") as f: assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, p


def test_diffusers_draws_the_same_pictures(tiny):
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.set_verbosity_error(); diffusers.utils.logging.disable_progress_bar()
    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(shipped_model(), text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    settings = {k: v for k, v in tiny.recommended.items() if k not in ("shift", "sampler")}   # diffusers: the scheduler config's shift, Euler
    assert tiny.recommended["sampler"] == "euler" and reference.scheduler.config.shift == tiny.recommended["shift"]
    latents = randn(tiny.latent_shape(len(PROMPTS), 64, 64), seed=3)
    ours = tiny(PROMPTS, latents=latents, output_type="pt", progress=False, **settings)
    theirs = reference(PROMPTS, latents=latents, output_type="pt", **settings).images
    assert (ours - theirs).abs().max().item() * 255 <= 1                                      # within one pixel level


def test_sd_book_generate_uses_it(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("SD_BOOK_MODEL", raising=False)
    status = main(["generate", "a photo of a red circle above a blue square", "--seed", "0", "--out", str(tmp_path / "x.png")])
    out = capsys.readouterr()
    assert status == 0 and out.out.strip() == str(tmp_path / "x.png")
    assert "using the tiny SD3 shipped with sd_book" in out.err
    picture = Image.open(tmp_path / "x.png")
    assert (picture.format, picture.size) == ("PNG", (64, 64))
    assert picture.tobytes() == SD3Pipeline.from_pretrained()("a photo of a red circle above a blue square", seed=0, progress=False)[0].tobytes()
