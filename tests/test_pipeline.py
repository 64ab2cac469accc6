"""The whole SD3.5 pipeline against diffusers' StableDiffusion3Pipeline on a tiny random model saved in
the real layouts, and its answers to bad input."""
import warnings

import pytest
import torch

from pipeline_fixture import load_reference, max_diff, parity_cases
from sd_book.pipeline import SD3Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
TOLERANCE = 1e-4   # pictures in [0, 1], fp32 on the CPU: the same arithmetic in a different order (measured: a few 1e-6, at most ~5e-6)
CASES = list(parity_cases())


@pytest.fixture(scope="module")
def pipes(tiny_folder):
    "(ours, diffusers) with T5 and without it."
    return {"with T5": (SD3Pipeline.from_pretrained(tiny_folder), load_reference(tiny_folder)),
            "without T5": (SD3Pipeline.from_pretrained(tiny_folder, t5=False), load_reference(tiny_folder, text_encoder_3=None, tokenizer_3=None))}


@pytest.mark.parametrize("t5", ["with T5", "without T5"])
@pytest.mark.parametrize("case", CASES)
def test_same_pictures_as_diffusers(pipes, case, t5):
    ours_kwargs, reference_kwargs, image_to_image = parity_cases()[case]        # fresh: a case's generator is used up by one run
    ours, reference = pipes[t5]
    assert max_diff(ours, reference, ours_kwargs, reference_kwargs, image_to_image) < TOLERANCE


def test_single_files_give_the_same_pictures(pipes, single_folder):
    ours_kwargs, reference_kwargs, _ = parity_cases()["text-to-image"]
    from_single = SD3Pipeline.from_pretrained(single_folder)
    assert max_diff(from_single, pipes["with T5"][1], ours_kwargs, reference_kwargs) < TOLERANCE
    assert torch.equal(from_single(**ours_kwargs, output_type="latent", progress=False), pipes["with T5"][0](**ours_kwargs, output_type="latent", progress=False))


SMALL = dict(height=32, width=48, num_inference_steps=2, progress=False)


def test_empty_prompt_is_allowed(pipes):
    pictures = pipes["with T5"][0]("", seed=0, **SMALL)
    assert len(pictures) == 1 and pictures[0].size == (48, 32)


def test_negative_steps(pipes):
    with pytest.raises(ValueError, match="num_inference_steps must be a positive int, got -2"):       # chapter 2's scheduler checks it
        pipes["with T5"][0]("a cat", **{**SMALL, "num_inference_steps": -2})


def test_guidance_below_one_turns_guidance_off(pipes):
    ours = pipes["with T5"][0]
    calls = []
    hook = ours.mmdit.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        low = ours("a cat", "anything", seed=1, guidance_scale=0.5, output_type="latent", **SMALL)
        one = ours("a cat", "something else", seed=1, guidance_scale=1.0, output_type="latent", **SMALL)
    finally: hook.remove()
    assert calls == [1] * 4                      # a batch of one per step: no negative prompt, no CFG
    assert torch.equal(low, one)


@pytest.mark.parametrize("size, message", [((1000, 1024), r"height=1000: the picture's sides must be positive multiples of 16"),
                                           ((1024, 1000), r"width=1000: the picture's sides must be positive multiples of 16"),
                                           ((24, 32), r"height=24: the picture's sides must be positive multiples of 16"),
                                           ((0, 32), r"height must be a positive multiple of 8, got 0")])     # chapter 8's latent_shape
def test_size_not_divisible_by_16(pipes, size, message):
    with pytest.raises(ValueError, match=message):
        pipes["with T5"][0]("a cat", height=size[0], width=size[1], num_inference_steps=1, progress=False)


@pytest.mark.parametrize("part", ["transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"])
def test_folder_missing_a_component(tiny_folder, tmp_path, part):
    import shutil
    shutil.copytree(tiny_folder, tmp_path / "model", ignore=shutil.ignore_patterns(part))
    with pytest.raises(FileNotFoundError, match=f"it has no {part}/"):
        SD3Pipeline.from_pretrained(tmp_path / "model")


def test_folder_without_t5_runs_with_a_warning(tiny_folder, tmp_path):
    import shutil
    shutil.copytree(tiny_folder, tmp_path / "model", ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = SD3Pipeline.from_pretrained(tmp_path / "model")
    assert pipe.t5 is None and any("running without it" in str(w.message) for w in caught)
    with pytest.raises(FileNotFoundError, match="t5=True, but"):
        SD3Pipeline.from_pretrained(tmp_path / "model", t5=True)


def test_long_prompt_warns(pipes):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipes["with T5"][0]("a very long prompt " * 30, seed=0, **SMALL, max_sequence_length=64)
    messages = [str(w.message) for w in caught]
    for expected in ("CLIP-L reads 77 tokens", "CLIP-G reads 77 tokens", "T5 reads 64 tokens"):
        assert any(expected in m for m in messages), (expected, messages)


# ---- batches and seeds: num_images_per_prompt, one seed per picture
BATCH = dict(prompt=["a cat", "a dog"], negative_prompt="blurry", height=32, width=48, num_inference_steps=3,
             guidance_scale=4.5)


def _generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("t5", ["with T5", "without T5"])
def test_a_seed_per_picture_against_a_list_of_generators(pipes, t5):
    ours, reference = pipes[t5]
    ours_kwargs = dict(BATCH, num_images_per_prompt=2, seed=[5, 6, 7, 8])
    reference_kwargs = dict(BATCH, num_images_per_prompt=2, generator=_generators(5, 6, 7, 8))
    assert max_diff(ours, reference, ours_kwargs, reference_kwargs) < TOLERANCE


def test_num_images_per_prompt_with_one_generator_as_diffusers(pipes):
    from pipeline_fixture import input_picture
    ours, reference = pipes["with T5"]
    assert max_diff(ours, reference, dict(BATCH, num_images_per_prompt=3, seed=9),
                    dict(BATCH, num_images_per_prompt=3, generator=torch.Generator().manual_seed(9))) < TOLERANCE
    image_to_image = dict(BATCH, image=input_picture(), strength=0.7, num_images_per_prompt=2)
    assert max_diff(ours, reference, dict(image_to_image, seed=4),
                    dict(image_to_image, generator=torch.Generator().manual_seed(4)), image_to_image=True) < TOLERANCE


def _first_latents(pipe, **call):
    "The latents of the MMDiT's first call (the conditional half under guidance) and the call's result."
    seen = []
    hook = pipe.mmdit.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()) if not seen else None)
    try:
        out = pipe(output_type="latent", progress=False, **call)
    finally:
        hook.remove()
    return seen[0][seen[0].shape[0] // 2:], out


@pytest.mark.parametrize("mode", ["text-to-image", "image-to-image"])
def test_picture_i_of_a_batch_is_the_picture_of_seed_i_alone(pipes, mode):
    "Exactly the same start in fp32 on the CPU; the end within the rounding of a batch of 4 against 1 in the MMDiT."
    from pipeline_fixture import input_picture
    ours = pipes["with T5"][0]
    extra = {} if mode == "text-to-image" else dict(image=input_picture(), strength=0.8)
    seeds = [31, 32, 33, 34]
    start, batch = _first_latents(ours, **BATCH, **extra, num_images_per_prompt=2, seed=seeds)
    for i, seed in enumerate(seeds):
        alone_start, alone = _first_latents(ours, **{**BATCH, "prompt": BATCH["prompt"][i // 2]}, **extra, seed=[seed])
        assert torch.equal(alone_start, start[i:i + 1])
        assert (alone - batch[i:i + 1]).abs().max() < 1e-5          # measured: about 1e-6
        assert torch.equal(_first_latents(ours, **{**BATCH, "prompt": BATCH["prompt"][i // 2]}, **extra, seed=seed)[0],
                           alone_start)                          # seed [s] = seed s for one picture


def test_an_int_seed_draws_the_batch_at_once(pipes):
    from sd_book.core import randn
    start, _ = _first_latents(pipes["with T5"][0], **BATCH, num_images_per_prompt=2, seed=3)
    assert torch.equal(start, randn((4, 16, 4, 6), seed=3))


def test_each_prompt_keeps_its_input_picture(pipes):
    "Two prompts, two input pictures, two pictures each: prompt k's start from picture k (diffusers tiles them)."
    from pipeline_fixture import input_picture
    from sd_book.core import cpu_generator
    ours = pipes["with T5"][0]
    pictures = [input_picture(), input_picture().transpose(0)]
    x0, _ = ours.draw_start(2, 2, 32, 48, cpu_generator(0), image=pictures)
    both = ours.encode_image(pictures, 32, 48, cpu_generator(0))
    assert torch.equal(x0, both[[0, 0, 1, 1]])


@pytest.mark.parametrize("call, message", [
    (dict(num_images_per_prompt=2, seed=[1, 2, 3]), "a list of 3 seeds but there are 4 pictures"),
    (dict(seed=[1, "2"]), "seed must be an int, a list of ints"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer")])
def test_bad_seeds_and_batches(pipes, call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        pipes["with T5"][0](["a cat", "a dog"], **SMALL, **call)
