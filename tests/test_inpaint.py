"""SD3 inpainting (`pipe(..., image=, mask_image=)`) against diffusers' StableDiffusion3InpaintPipeline on the tiny
random SD3.5 saved in the diffusers layout, its masks, and its answers to bad input."""
import re

import pytest
import torch
from PIL import Image

from pipeline_fixture import PROMPTS, input_picture, load_reference
from sd_book.core import cpu_generator
from sd_book.pipeline import SD3Pipeline, check_mask_size, inpaint_mask, keep_outside_mask

pytestmark = pytest.mark.usefixtures("one_thread")
# latents: fp32 on the CPU, the same arithmetic in another order (measured: a few 1e-6, as for text-to-image)
LATENT_TOLERANCE = 1e-4
ASK = dict(prompt=PROMPTS, negative_prompt="blurry", height=32, width=48, num_inference_steps=4, guidance_scale=4.5)


def square_mask(width=48, height=32, box=(16, 8, 40, 24)):
    "A black mask with a white rectangle: repaint `box`."
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


@pytest.fixture(scope="module")
def pipes(tiny_folder):
    "(ours, diffusers' inpainting pipeline) with T5 and without it."
    from diffusers import StableDiffusion3InpaintPipeline

    out = {}
    for name, kw in (("with T5", {}), ("without T5", dict(text_encoder_3=None, tokenizer_3=None))):
        reference = StableDiffusion3InpaintPipeline(**load_reference(tiny_folder, **kw).components)
        reference.set_progress_bar_config(disable=True)
        out[name] = (SD3Pipeline.from_pretrained(tiny_folder, t5=None if not kw else False), reference)
    return out


def grey_levels(pictures) -> torch.Tensor:
    "The 8-bit values of PIL pictures, (B, H * W * 3) as integers."
    return torch.stack([torch.frombuffer(bytearray(p.tobytes()), dtype=torch.uint8) for p in pictures]).int()


@torch.no_grad()
def decoded(reference, latents) -> list:
    """diffusers' latents as pictures, decoded by its VAE with the shift its other SD3 pipelines add (its inpainting
    pipeline leaves it out: diffusers issue 13611)."""
    vae = reference.vae
    x = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    return reference.image_processor.postprocess(x, output_type="pil")


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


CASES = {  # name: (request for both, our seed, a function giving diffusers' generator)
    "strength 0.7": (dict(image=input_picture(), mask_image=square_mask(), strength=0.7), 5, lambda: gens(5)[0]),
    "strength 1": (dict(image=input_picture(), mask_image=square_mask(), strength=1.0), 5, lambda: gens(5)[0]),
    "picture and mask resized": (
        dict(image=input_picture(96, 64), mask_image=square_mask(96, 64, (30, 10, 82, 50)), strength=0.8), 2,
        lambda: gens(2)[0]),
    "a picture per prompt": (
        dict(image=[input_picture(), input_picture().transpose(Image.FLIP_LEFT_RIGHT)], mask_image=square_mask(),
             strength=0.7), 3, lambda: gens(3)[0]),
    "a seed per picture": (
        dict(image=[input_picture()] * 4, mask_image=square_mask(), strength=0.7, num_images_per_prompt=2),
        [1, 2, 3, 4], lambda: gens(1, 2, 3, 4)),
}


@pytest.mark.parametrize("t5", ["with T5", "without T5"])
@pytest.mark.parametrize("case", list(CASES))
def test_same_latents_and_pictures_as_diffusers(pipes, case, t5):
    request, seed, generator = CASES[case]
    ours, reference = pipes[t5]
    lat_ref = reference(**ASK, **request, generator=generator(), output_type="latent").images
    lat_ours = ours(**ASK, **request, seed=seed, output_type="latent", progress=False)
    assert (lat_ours - lat_ref).abs().max() < LATENT_TOLERANCE
    # pictures: one grey level (8-bit rounding of values a few 1e-6 apart may land on either side)
    assert (grey_levels(ours.decode_latents(lat_ours)) - grey_levels(decoded(reference, lat_ref))).abs().max() <= 1


def test_diffusers_own_pictures_lack_the_vae_shift(pipes):
    "The one deliberate difference: ours decode as every SD3 pipeline does; diffusers' inpainting pictures differ."
    ours, reference = pipes["with T5"]
    request, seed, generator = CASES["strength 0.7"]
    theirs = reference(**ASK, **request, generator=generator()).images
    assert (grey_levels(ours(**ASK, **request, seed=seed, progress=False)) - grey_levels(theirs)).abs().max() > 5


def test_black_mask_keeps_the_picture_white_mask_is_image_to_image(pipes):
    ours = pipes["with T5"][0]
    kw = dict(ASK, image=input_picture(), strength=0.6, seed=4, output_type="latent", progress=False)
    x0, _ = ours.draw_start(2, 1, 32, 48, cpu_generator(4), image=input_picture())
    assert torch.equal(ours(**kw, mask_image=Image.new("L", (48, 32), 0)), x0)
    assert torch.equal(ours(**kw, mask_image=Image.new("L", (48, 32), 255)), ours(**kw))


def test_each_step_keeps_the_noised_picture_outside_the_mask(pipes):
    "After step i, outside the mask: the picture's latents at the next level with the starting noise (diffusers' loop)."
    ours = pipes["without T5"][0]
    seen = []
    kw = dict(ASK, image=input_picture(), mask_image=square_mask(), strength=0.75, seed=8, progress=False)
    ours(**kw, output_type="latent", callback=lambda i, x, x0: seen.append(x.clone()))
    x0, noise = ours.draw_start(2, 1, 32, 48, cpu_generator(8), image=input_picture())
    outside = 1 - ours.latent_mask(square_mask(), input_picture(), 32, 48, 2)
    sigmas = ours.scheduler(4).sigmas[1:]  # strength 0.75 of 4 steps: from the second level on
    assert len(seen) == 3
    for i, x in enumerate(seen):
        assert torch.equal(x * outside, (sigmas[i + 1] * noise + (1 - sigmas[i + 1]) * x0) * outside)
    assert torch.equal(seen[-1] * outside, x0 * outside)


def test_a_seed_per_picture_redraws_any_picture_alone(pipes):
    ours = pipes["with T5"][0]
    kw = dict(ASK, image=input_picture(), mask_image=square_mask(), strength=0.7, output_type="latent", progress=False)
    starts = {}

    def first_latents(key):
        def hook(module, args):  # the conditional half of the MMDiT's first input (returns None: args unchanged)
            starts.setdefault(key, args[0][args[0].shape[0] // 2 :].clone())

        return hook

    hook = ours.mmdit.register_forward_pre_hook(first_latents("batch"))
    batch = ours(**kw, num_images_per_prompt=2, seed=[21, 22, 23, 24])
    hook.remove()
    for i in range(4):
        hook = ours.mmdit.register_forward_pre_hook(first_latents(i))
        alone = ours(**{**kw, "prompt": PROMPTS[i // 2]}, seed=[21 + i])
        hook.remove()
        assert torch.equal(starts[i], starts["batch"][i : i + 1])  # the same start, bit for bit
        assert (alone - batch[i : i + 1]).abs().max() < 1e-5  # a batch of 4 against 1 in the MMDiT: fp32 rounding


def test_masks():
    box = square_mask()
    m = inpaint_mask(box, 32, 48)
    assert m.shape == (1, 1, 32, 48) and m.sum() == 24 * 16 and set(m.unique().tolist()) == {0.0, 1.0}
    # black and white at another size stays black and white (diffusers: Lanczos, then a threshold at 0.5)
    resized = inpaint_mask(box.resize((96, 64), Image.NEAREST), 40, 56)
    assert set(resized.unique().tolist()) == {0.0, 1.0}
    grey = inpaint_mask(Image.new("L", (48, 32), 191), 32, 48)  # grey levels are kept
    assert torch.allclose(grey, torch.full_like(grey, 191 / 255))
    soft = inpaint_mask(box, 32, 48, blur=1.5)
    assert 0 < soft[0, 0, 16, 16] < 1 and soft[0, 0, 16, 28] > 0.99 and soft[0, 0, 0, 0] < 1e-3
    x, x0, noise = torch.full((1, 1, 1, 2), 3.0), torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2)
    assert keep_outside_mask(x, x0, noise, torch.tensor([[[[0.0, 0.5]]]]), 0.5).tolist() == [[[[0.5, 1.75]]]]


@pytest.mark.parametrize("call, message", [
    (dict(mask_image=square_mask()), "mask_image needs image="),
    (dict(image=input_picture(), mask_image=square_mask(96, 64)), "The mask is 96x64 but its picture is 48x32"),
    (dict(image=[input_picture()] * 3, mask_image=[square_mask()] * 2), "2 masks for 3 pictures"),
    (dict(image=input_picture(), mask_image=torch.full((32, 48), 1.5)), "values must lie in [0, 1]"),
    (dict(image=input_picture(), mask_image="mask.png"), "mask_image must be a PIL image"),
    (dict(image=input_picture(), mask_image=square_mask(), mask_blur=-1), "mask_blur must be a radius"),
])
def test_bad_masks(pipes, call, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        pipes["with T5"][0]("a cat", height=32, width=48, num_inference_steps=2, progress=False, **call)


def test_check_mask_size_accepts_one_mask_for_every_picture():
    check_mask_size(square_mask(), [input_picture()] * 3)
    check_mask_size([square_mask()] * 2, [input_picture()] * 2)
    check_mask_size(torch.zeros(32, 48), torch.zeros(3, 32, 48))
