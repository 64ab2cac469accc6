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


def test_text_encoders_on_cpu(capsys, tiny_folder, tmp_path):
    "--text-encoders-on-cpu: the encoders in float32 on the CPU beside a bf16 MMDiT; a picture comes out."
    seen = []
    original = pipeline.SD3Pipeline.place_text_encoders
    def spy(self, device="cpu", dtype=None):
        seen.append((str(device), dtype))
        return original(self, device, dtype)
    pipeline.SD3Pipeline.place_text_encoders = spy
    try:
        status, out, err = run(capsys, "generate", "a red square", "--model", tiny_folder, "--steps", 2, "--size", "64x64", "--dtype", "bf16",
                               "--device", "cpu", "--text-encoders-on-cpu", "-q", "--out", tmp_path / "out.png")
    finally:
        pipeline.SD3Pipeline.place_text_encoders = original
    assert status == 0, err
    assert seen == [("cpu", torch.float32)] and Image.open(tmp_path / "out.png").format == "PNG"


def test_console_script_help():
    script = Path(sys.executable).parent / "sd-book"
    assert script.exists(), "the console script is missing: pip install -e . --no-deps"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("generate", "--model", "--negative", "--steps", "--guidance", "--seed", "--size", "--out", "--image", "--strength",
                   "--dtype", "--device", "--no-t5", "--offload", "--sampler", "--shift", "--lora", "--mask",
                   "train-lora", "--mask-blur", "--num-images", "--text-encoders-on-cpu"):
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


def test_lora_option_applies_the_file_at_its_scale(capsys, tmp_path):
    "--lora PATH:SCALE on the shipped model: scale 0 draws what no LoRA draws, scale 1 something else."
    from sd_book.lora import DEFAULT_TARGETS, add_lora, pipe_root, save_lora

    torch.manual_seed(0)
    lora = add_lora(pipe_root(pipeline.SD3Pipeline.from_pretrained()), 4, 8, DEFAULT_TARGETS)
    for _, update in lora.items():
        update.B.data.normal_(std=0.05)
    save_lora(lora, tmp_path / "style.safetensors")
    pictures = {}
    for name, extra in [("none", []), ("zero", ["--lora", f"{tmp_path / 'style.safetensors'}:0"]),
                        ("one", ["--lora", tmp_path / "style.safetensors"])]:
        status, out, err = run(capsys, "generate", "a photo of a red circle", "--seed", 0, "--steps", 4, "-q",
                               "--out", tmp_path / f"{name}.png", *extra)
        assert status == 0, err
        pictures[name] = torch.tensor(list(Image.open(tmp_path / f"{name}.png").tobytes()), dtype=torch.float32)
    assert torch.equal(pictures["zero"], pictures["none"])
    assert (pictures["one"] - pictures["none"]).abs().max() > 1


def test_lora_option_errors(capsys, tmp_path):
    status, out, err = run(capsys, "generate", "a cat", "--lora", tmp_path / "missing.safetensors", "-q")
    assert status == 1 and "missing.safetensors" in err


def _grey_levels(path) -> torch.Tensor:
    return torch.frombuffer(bytearray(Image.open(path).convert("RGB").tobytes()), dtype=torch.uint8).int()


def test_inpainting_and_several_pictures(capsys, tiny_folder, tmp_path):
    "SD3 inpainting with --mask; --num-images 3 --seed 10: seeds 10, 11, 12, each printed, each redrawn alone."
    from pipeline_fixture import input_picture
    from sd_book.pipeline import SD3Pipeline
    input_picture(50, 40).save(tmp_path / "in.png")                 # drawn at 48 x 32: rounded down to multiples of 16
    mask = Image.new("L", (50, 40), 0)
    mask.paste(255, (10, 5, 40, 30))
    mask.save(tmp_path / "mask.png")
    args = ["generate", "a cat", "--model", tiny_folder, "--image", tmp_path / "in.png",
            "--mask", tmp_path / "mask.png", "--steps", 2, "--strength", 1]
    status, out, err = run(capsys, *args, "--seed", 10, "--num-images", 3, "--out", tmp_path / "cat.png")
    assert status == 0, err
    names = [tmp_path / f"cat-{i}.png" for i in range(3)]
    assert out.split() == [str(n) for n in names]
    assert all(f"seed {10 + i}: {n}" in err for i, n in enumerate(names))
    status, out, err = run(capsys, *args, "--seed", 11, "-q", "--out", tmp_path / "alone.png")
    assert status == 0 and out.strip() == str(tmp_path / "alone.png")
    # a batch of 3 against 1 in the MMDiT: fp32 rounding, at most one grey level
    assert (_grey_levels(names[1]) - _grey_levels(tmp_path / "alone.png")).abs().max() <= 1
    direct = SD3Pipeline.from_pretrained(tiny_folder)("a cat", image=Image.open(tmp_path / "in.png").convert("RGB"),
                                                      mask_image=mask, strength=1.0, height=32, width=48,
                                                      num_inference_steps=2, seed=11, progress=False)[0]
    assert Image.open(tmp_path / "alone.png").tobytes() == direct.tobytes()
    assert not torch.equal(_grey_levels(names[0]), _grey_levels(names[1]))
    status, out, err = run(capsys, *args, "--seed", 11, "--mask-blur", 2, "-q", "--out", tmp_path / "blurred.png")
    assert status == 0 and not torch.equal(_grey_levels(tmp_path / "blurred.png"), _grey_levels(tmp_path / "alone.png"))


def test_mask_errors(capsys, tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    Image.new("L", (32, 32)).save(tmp_path / "small_mask.png")
    status, out, err = run(capsys, "generate", "a cat", "--mask", tmp_path / "in.png")
    assert status == 1 and "--mask needs --image" in err
    status, out, err = run(capsys, "generate", "a cat", "--image", tmp_path / "in.png",
                           "--mask", tmp_path / "small_mask.png")
    assert status == 1 and "The mask is 32x32 but its picture is 64x64" in err
    status, out, err = run(capsys, "generate", "a cat", "--image", tmp_path / "in.png", "--mask", tmp_path / "none.png")
    assert status == 1 and "none.png" in err
    status, out, err = run(capsys, "generate", "a cat", "--mask-blur", "-2")
    assert status == 2 and "not a radius" in err


def _tiny_sd1(folder):
    "A tiny random SD 1-like pipeline, built and saved by diffusers (the oracle of chapter 17)."
    import diffusers
    import transformers

    from sd_book.bpe import CLIPTokenizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    CLIPTokenizer().save_pretrained(folder / "tok", model_max_length=77)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=clip, tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tok"), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def test_generate_runs_sd12_models_through_chapter_17(capsys, tmp_path):
    "An SD 1 folder goes to LDMPipeline: the same picture as calling it directly, --mask for inpainting, --lora refused."
    from sd_book.ldm import LDMPipeline

    model = _tiny_sd1(tmp_path / "sd1")
    status, out, err = run(capsys, "generate", "a cat", "--model", model, "--seed", 3, "--steps", 3, "--size", "32x32",
                           "--sampler", "ddim", "-q", "--out", tmp_path / "cli.png")
    assert status == 0, err
    direct = LDMPipeline.from_pretrained(model)("a cat", "", 32, 32, 3, None, seed=3, sampler="ddim", progress=False)[0]
    assert Image.open(tmp_path / "cli.png").tobytes() == direct.tobytes()
    Image.new("RGB", (35, 34), (200, 30, 30)).save(tmp_path / "in.png")  # rounded down to the model's multiple, 4
    Image.new("L", (35, 34), 255).save(tmp_path / "mask.png")
    status, out, err = run(capsys, "generate", "a cat", "--model", model, "--image", tmp_path / "in.png",
                           "--mask", tmp_path / "mask.png", "--steps", 2, "-q", "--out", tmp_path / "inpaint.png")
    assert status == 0, err
    assert Image.open(tmp_path / "inpaint.png").size == (32, 32)
    status, out, err = run(capsys, "generate", "a cat", "--model", model, "--lora", tmp_path / "x.safetensors")
    assert status == 1 and "--lora is for SD3" in err
    status, out, err = run(capsys, "generate", "a cat", "--model", model, "--num-images", 2)
    assert status == 1 and "--num-images is for SD3" in err
