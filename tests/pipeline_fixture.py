"""A tiny random SD3.5 pipeline in both file layouts, built with the reference libraries.

Used by tests/ (through conftest.py) and by the parity section of nbs/11_pipeline.ipynb, so the two
check the same thing. Everything is random and small (seconds on a CPU), but every file sits where the
real releases put it:

- `build_diffusers_folder(folder)`: what `StableDiffusion3Pipeline.save_pretrained` writes (transformer/,
  vae/, text_encoder/, text_encoder_2/, text_encoder_3/, tokenizer/, tokenizer_2/, tokenizer_3/,
  scheduler/, model_index.json). CLIP tokenizers from sd_book's shipped vocabulary (tokenizer_2 pads
  with "!" like SD3.5's), a T5 tokenizer trained here with SentencePiece using T5's settings.
- `random_diffusers(seed, config)`: a random diffusers MMDiT for an `MMDiTConfig` (also used by nbs/10_mmdit.ipynb's parity section).
- `write_single_files(diffusers_folder, folder)`: Stability's layout, one file with
  `model.diffusion_model.*` and `first_stage_model.*`, and text_encoders/clip_l (without a projection:
  SD3 uses CLIP-L's pooled vector unprojected, so the diffusers CLIP-L here has the identity), clip_g,
  t5xxl_fp16 (+ the T5 tokenizer's spiece.model there, since a single-file folder has no tokenizer_3/).
"""
import io
import re
import tempfile
from pathlib import Path

import torch

TINY = dict(clip_l=64, clip_g=128, t5=256, mmdit_heads=2, mmdit_depth=3, t5_vocab=300)


def train_t5_spiece(folder: Path, vocab_size: int = TINY["t5_vocab"]) -> Path:
    "A small SentencePiece unigram model trained with T5's settings on the standard library's docstrings; returns spiece.model's path."
    import sentencepiece as spm
    from sd_book.bpe import docstring_corpus
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docstring_corpus(max_lines=3000)), model_writer=buf, vocab_size=vocab_size,
                                   model_type="unigram", normalization_rule_name="nmt_nfkc", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   byte_fallback=False, split_digits=False, num_threads=1, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    return folder / "spiece.model"


def _clip(width: int, act: str, seed: int, identity_projection: bool = False):
    "A random CLIPTextModelWithProjection with CLIP's real vocabulary and 64-wide heads (so the single files need no config); SD3's CLIP-L has the identity as projection."
    import transformers
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                         num_attention_heads=width // 64, max_position_embeddings=77, projection_dim=width,
                                         hidden_act=act, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    model = transformers.CLIPTextModelWithProjection(config).eval()
    if identity_projection: model.text_projection.weight.data = torch.eye(width)
    return model


def _t5(vocab_size: int, seed: int):
    "A random T5 v1.1 encoder as wide as the MMDiT's context."
    import transformers
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=vocab_size, d_model=TINY["t5"], d_kv=64, d_ff=2 * TINY["t5"], num_layers=2, num_heads=TINY["t5"] // 64,
                                   feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return transformers.T5EncoderModel(config).eval()


def _vae(seed: int):
    "A random 16-channel AutoencoderKL with 4 levels (8x downsampling), SD3's 32 norm groups (single files do not say) and latent scale and shift."
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=32, sample_size=32,
                         scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False).eval()


def random_diffusers(seed: int, config):
    "A random diffusers SD3Transformer2DModel for sd_book's MMDiTConfig `config` (through `to_diffusers_config`), in eval mode; the QK-norm gains, which diffusers sets to 1, are randomised too."
    from diffusers import SD3Transformer2DModel
    from sd_book.mmdit import to_diffusers_config
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**to_diffusers_config(config)).eval()
    for name, p in model.named_parameters():
        if re.search(r"\.norm_(added_)?[qk]\.weight$", name): p.data.normal_(1.0, 0.3)      # attn.norm_q, norm_k, norm_added_q, norm_added_k, attn2.norm_q ...
    return model


def _mmdit(seed: int):
    "A random SD3.5-style MMDiT in diffusers' classes: QK-norm, one MMDiT-X block, 64-wide heads, as wide as T5's context."
    from sd_book.mmdit import MMDiTConfig
    config = MMDiTConfig(depth=TINY["mmdit_depth"], hidden_size=64 * TINY["mmdit_heads"], num_heads=TINY["mmdit_heads"], pos_embed_max_size=16, sample_size=16,
                         context_dim=TINY["t5"], pooled_dim=TINY["clip_l"] + TINY["clip_g"], qk_norm="rms", attn2_layers=(0,))
    return random_diffusers(seed, config)


def build_diffusers_folder(folder, seed: int = 0) -> Path:
    "Save a tiny random StableDiffusion3Pipeline (diffusers layout) into `folder`; returns the folder."
    import diffusers
    import transformers
    transformers.logging.set_verbosity_error(); transformers.logging.disable_progress_bar()     # before the pipeline import, which warns about torchvision
    diffusers.utils.logging.set_verbosity_error(); diffusers.utils.logging.disable_progress_bar()
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from sd_book.bpe import CLIPTokenizer
    folder, tmp = Path(folder), tempfile.TemporaryDirectory(prefix="sd_book_tiny_")
    work = Path(tmp.name)
    CLIPTokenizer().save_pretrained(work / "clip_l")
    CLIPTokenizer(pad_token="!").save_pretrained(work / "clip_g")
    t5_tok = transformers.T5TokenizerFast.from_pretrained(str(train_t5_spiece(work / "t5").parent))
    pipe = StableDiffusion3Pipeline(
        transformer=_mmdit(seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(seed + 1),
        text_encoder=_clip(TINY["clip_l"], "quick_gelu", seed + 2, identity_projection=True), tokenizer=transformers.CLIPTokenizer.from_pretrained(str(work / "clip_l")),
        text_encoder_2=_clip(TINY["clip_g"], "gelu", seed + 3), tokenizer_2=transformers.CLIPTokenizer.from_pretrained(str(work / "clip_g")),
        text_encoder_3=_t5(len(t5_tok), seed + 4), tokenizer_3=t5_tok)
    pipe.save_pretrained(folder)
    (folder / "tokenizer_3" / "spiece.model").write_bytes((work / "t5" / "spiece.model").read_bytes())
    tmp.cleanup()
    return folder


def write_single_files(diffusers_folder, folder, name: str = "sd3.5_tiny.safetensors") -> Path:
    "Write the pipeline in `diffusers_folder` in Stability's single-file layout (through sd_book's loaders, whose state dicts use the original names); returns `folder`."
    from safetensors.torch import save_file
    from sd_book.clip import load_clip
    from sd_book.mmdit import load_mmdit
    from sd_book.t5 import load_t5
    from sd_book.vae import load_vae
    src, folder = Path(diffusers_folder), Path(folder)
    (folder / "text_encoders").mkdir(parents=True, exist_ok=True)
    main = {"model.diffusion_model." + k: v for k, v in load_mmdit(src / "transformer").state_dict().items()}
    main |= {"first_stage_model." + k: v for k, v in load_vae(src / "vae").state_dict().items()}
    save_file({k: v.contiguous() for k, v in main.items()}, str(folder / name))
    for part, model in [("clip_l", load_clip(src / "text_encoder")), ("clip_g", load_clip(src / "text_encoder_2")), ("t5xxl_fp16", load_t5(src / "text_encoder_3"))]:
        state = {k: v.contiguous() for k, v in model.state_dict().items() if not (part == "clip_l" and k == "text_projection.weight")}   # SD3's clip_l has none
        save_file(state, str(folder / "text_encoders" / f"{part}.safetensors"))
    (folder / "text_encoders" / "spiece.model").write_bytes((src / "tokenizer_3" / "spiece.model").read_bytes())
    return folder


def load_reference(folder, **kwargs):
    "diffusers' StableDiffusion3Pipeline from `folder`, fp32 on the CPU, progress bars off; `kwargs` go to from_pretrained (e.g. text_encoder_3=None)."
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), dtype=torch.float32, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPTS = ["a photo of a cat on a mat", "an astronaut riding a horse, oil painting"]


def input_picture(width: int = 48, height: int = 32):
    "A deterministic RGB gradient picture, the input of the image-to-image cases."
    from PIL import Image
    img = Image.new("RGB", (width, height))
    img.putdata([(255 * i // (width - 1), 255 * j // (height - 1), (97 * (i + j)) % 256) for j in range(height) for i in range(width)])
    return img


def parity_cases() -> dict:
    "name -> (keyword arguments for sd_book's pipe, for diffusers' pipe, whether diffusers' image-to-image pipeline runs it): the same request both ways."
    from sd_book.pipeline import SkipLayerGuidance
    common = dict(prompt=PROMPTS, negative_prompt="blurry, low quality", height=32, width=48, num_inference_steps=3, guidance_scale=4.5)
    latents = torch.randn((2, 16, 4, 6), generator=torch.Generator().manual_seed(0))        # seed-derived latents, given to both
    slg = dict(layers=(1,), scale=2.8, start=0.01, stop=0.9)
    return {
        "text-to-image": (dict(common, latents=latents), dict(common, latents=latents), False),
        "guidance off (w = 1)": (dict(common, guidance_scale=1.0, latents=latents), dict(common, guidance_scale=1.0, latents=latents), False),
        "a prompt per encoder": (dict(common, prompt_2=["a tabby", "a horse"], prompt_3=["a long prompt for T5 only", ""], negative_prompt_3="cartoon", latents=latents),
                                 dict(common, prompt_2=["a tabby", "a horse"], prompt_3=["a long prompt for T5 only", ""], negative_prompt_3="cartoon", latents=latents), False),
        "skip-layer guidance": (dict(common, num_inference_steps=4, latents=latents, skip_layer_guidance=SkipLayerGuidance(**slg)),
                                dict(common, num_inference_steps=4, latents=latents, skip_guidance_layers=list(slg["layers"]), skip_layer_guidance_scale=slg["scale"],
                                     skip_layer_guidance_start=slg["start"], skip_layer_guidance_stop=slg["stop"]), False),
        "seed = a CPU generator": (dict(common, seed=3), dict(common, generator=torch.Generator().manual_seed(3)), False),
        "image-to-image": (dict(common, image=input_picture(), strength=0.7, seed=5),
                           dict(common, image=input_picture(), strength=0.7, generator=torch.Generator().manual_seed(5)), True),
    }


def max_diff(ours, reference, ours_kwargs: dict, reference_kwargs: dict, image_to_image: bool = False) -> float:
    "Largest |ours - diffusers| over the pictures (in [0, 1]) of one parity case; `reference` is diffusers' text-to-image pipeline."
    from diffusers import StableDiffusion3Img2ImgPipeline
    if image_to_image:
        reference = StableDiffusion3Img2ImgPipeline(**reference.components)
        reference.set_progress_bar_config(disable=True)
    a = ours(**ours_kwargs, output_type="pt", progress=False)
    b = reference(**reference_kwargs, output_type="pt").images
    return (a - b).abs().max().item()
