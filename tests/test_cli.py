"""The `sd-book` command line, end to end on the tiny model, and its messages for the usual mistakes."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import sd_book.pipeline as pipeline
from sd_book.pipeline import main

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *args):
    "(exit status, stdout, stderr) of `sd-book *args`, run in this process."
    try: status = main([str(a) for a in args])
    except SystemExit as e: status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_generate_writes_a_png_of_the_right_size(capsys, tiny_folder, tmp_path):
    out_file = tmp_path / "pictures" / "cat.png"
    status, out, err = run(capsys, "generate", "a photo of a cat", "--model", tiny_folder, "--steps", 2, "--guidance", 4.5,
                           "--seed", 0, "--size", "64x32", "--negative", "blurry", "--out", out_file)
    assert status == 0, err
    assert out.strip() == str(out_file)
    picture = Image.open(out_file)
    assert (picture.format, picture.size) == ("PNG", (64, 32))


def test_image_to_image_no_t5_dtype_device(capsys, tiny_folder, tmp_path):
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "in.png")
    status, out, err = run(capsys, "generate", "a red square", "--model", tiny_folder, "--image", tmp_path / "in.png", "--strength", 0.5,
                           "--steps", 2, "--no-t5", "--dtype", "fp32", "--device", "cpu", "--sampler", "dpmpp_2m", "-q", "--out", tmp_path / "out.png")
    assert status == 0, err
    assert Image.open(tmp_path / "out.png").size == (48, 32)          # the input's size, rounded down to multiples of 16


def test_console_script_help():
    script = Path(sys.executable).parent / "sd-book"
    assert script.exists(), "the console script is missing: pip install -e . --no-deps"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("generate", "--model", "--negative", "--steps", "--guidance", "--seed", "--size", "--out", "--image", "--strength",
                   "--dtype", "--device", "--no-t5", "--offload", "--sampler", "--shift"):
        assert option in out


@pytest.mark.parametrize("size", ["1000x1000", "1024x1000", "abc", "0x64"])
def test_bad_size(capsys, tiny_folder, size):
    status, out, err = run(capsys, "generate", "a cat", "--model", tiny_folder, "--size", size)
    assert status == 2 and "--size" in err


def test_negative_steps(capsys, tiny_folder):
    status, out, err = run(capsys, "generate", "a cat", "--model", tiny_folder, "--steps", "-4")
    assert status == 2 and "not a positive integer" in err


def test_missing_model(capsys, tmp_path):
    status, out, err = run(capsys, "generate", "a cat", "--model", tmp_path / "no-such-model")
    assert status == 1 and "sd-book: error: No model at" in err


def test_gated_repository_without_token(capsys, monkeypatch):
    "The Hub's GatedRepoError, raised where sd_book.checkpoints.download calls huggingface_hub, reaches the user as chapter 5's explanation."
    import huggingface_hub
    from huggingface_hub import errors
    http = sys.modules[errors.Response.__module__]                  # the HTTP library huggingface_hub uses (httpx)
    def refuse(repo_id, **kwargs):
        response = http.Response(401, request=http.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
        raise errors.GatedRepoError(f"401 Client Error: access to {repo_id} is restricted", response=response)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    status, out, err = run(capsys, "generate", "a cat", "--model", "stabilityai/stable-diffusion-3.5-large")
    assert status == 1 and "stabilityai/stable-diffusion-3.5-large is a gated repository" in err and "accept its licence" in err and "HF_TOKEN" in err


def test_out_of_memory(capsys, monkeypatch, tiny_folder, tmp_path):
    def too_big(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(pipeline.SD3Pipeline, "__call__", too_big)
    status, out, err = run(capsys, "generate", "a cat", "--model", tiny_folder, "--out", tmp_path / "x.png")
    assert status == 1 and "out of memory" in err and "--offload" in err and not (tmp_path / "x.png").exists()


def test_no_command_prints_help(capsys):
    status, out, err = run(capsys)
    assert status == 2 and "generate" in err
