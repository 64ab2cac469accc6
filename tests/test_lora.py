"""sd_book.lora at the level of files and the command line: train-lora on folders (and each bad folder), LoRA files
in diffusers / peft and kohya names saved and loaded, and each error naming its keys."""
import argparse

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sd_book.lora import (
    DEFAULT_TARGETS,
    TEXT_TARGETS,
    add_lora,
    add_train_lora_arguments,
    apply_loras,
    load_lora,
    parse_lora_arg,
    pipe_root,
    read_lora_file,
    save_lora,
    train_lora_command,
    unload_lora,
)
from sd_book.pipeline import SD3Pipeline


@pytest.fixture(scope="module")
def tiny():
    torch.set_grad_enabled(True)
    return SD3Pipeline.from_pretrained()


def _inputs(pipe):
    ids = pipe.tokenizer_l(["a photo of a red circle"], max_length=16)
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 16, 16, generator=g), torch.tensor([400.0]), ids, ids


def _random_lora(pipe, rank=4, alpha=8):
    torch.manual_seed(0)
    lora = add_lora(pipe_root(pipe), rank, alpha, f"{DEFAULT_TARGETS}|{TEXT_TARGETS}")
    for _, u in lora.items():
        u.B.data.normal_(std=0.05)
    return lora


def _saved_random_lora(pipe, path):
    "A random LoRA saved to `path` and detached: (root, inputs, output with it, output without it, the LoRA)."
    root, inputs = pipe_root(pipe), _inputs(pipe)
    lora = _random_lora(pipe)
    with torch.no_grad():
        expected = root(*inputs)
        lora.detach()
        plain = root(*inputs)
    save_lora(lora, path)
    return root, inputs, expected, plain, lora


def _folder(path, n=2, caption=True):
    path.mkdir()
    for i in range(n):
        Image.new("RGB", (80, 64), (200, 30 * i, 30)).save(path / f"p{i}.png")
        if caption:
            (path / f"p{i}.txt").write_text("a photo of a red square\n")
    return path


def _run(args):
    parser = argparse.ArgumentParser()
    add_train_lora_arguments(parser)
    return train_lora_command(parser.parse_args(args))


def test_train_lora_on_a_folder(tmp_path, tiny):
    out = tmp_path / "x.safetensors"
    assert _run(["--data", str(_folder(tmp_path / "d")), "--out", str(out), "--rank", "2", "--steps", "2", "--batch-size", "2", "-q"]) == 0
    tensors, _ = read_lora_file(out)
    assert tensors and all(k.startswith("transformer.transformer_blocks.") for k in tensors)
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")} == {2}


def test_train_lora_with_a_new_word(tmp_path):
    "--new-word writes the word's rows beside the LoRA; generate --lora loads both, and the word is one token."
    folder = _folder(tmp_path / "d")
    for caption in folder.glob("*.txt"):
        caption.write_text("a photo of a wug\n")
    out = tmp_path / "w.safetensors"
    args = ["--data", str(folder), "--out", str(out), "--rank", "2", "--steps", "2", "--batch-size", "2", "-q"]
    assert _run(args + ["--new-word", "wug", "--new-word", "blicket"]) == 0
    rows, _ = read_lora_file(tmp_path / "w_emb.safetensors")
    assert {k: tuple(v.shape) for k, v in rows.items()} == {"clip_l": (2, 64), "clip_g": (2, 64)}
    pipe = SD3Pipeline.from_pretrained()
    apply_loras(pipe, [parse_lora_arg(str(out))])
    assert len(pipe.tokenizer_l.encode("wug blicket")) == 2
    assert _run(args + ["--new-word", "two words"]) == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), "No pictures in"),
        (lambda p: _folder(p, caption=False), "have no caption file (name.txt beside name.png): p0.png, p1.png"),
        (lambda p: (_folder(p), (p / "bad.png").write_bytes(b"junk"), (p / "bad.txt").write_text("x")), "Cannot read 1 file(s)"),
        (lambda p: None, "No folder"),
    ],
)
def test_train_lora_bad_folders(tmp_path, capsys, make, message):
    make(tmp_path / "d")
    assert _run(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "x.safetensors"), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sd-book train-lora: error:") and message in err
    assert not (tmp_path / "x.safetensors").exists()


def test_diffusers_and_kohya_files_load_the_same(tmp_path, tiny):
    root, inputs, expected, plain, lora = _saved_random_lora(tiny, tmp_path / "d.safetensors")
    with torch.no_grad():
        prefix = {"mmdit": "lora_unet", "clip_l": "lora_te1", "clip_g": "lora_te2"}
        kohya = {}
        for path, u in lora.items():
            component, rest = path.split(".", 1)
            name = f"{prefix[component]}_{rest.replace('.', '_')}"
            kohya |= {f"{name}.lora_down.weight": u.A.data, f"{name}.lora_up.weight": u.B.data, f"{name}.alpha": torch.tensor(8.0)}
        save_file(kohya, str(tmp_path / "k.safetensors"))
        for file in ("d", "k"):
            load_lora(tiny, tmp_path / f"{file}.safetensors")
            torch.testing.assert_close(root(*inputs), expected, atol=1e-4, rtol=0)
            unload_lora(tiny)
            assert torch.equal(root(*inputs), plain)
        apply_loras(tiny, [parse_lora_arg(f"{tmp_path / 'd.safetensors'}:0.5"), parse_lora_arg(f"{tmp_path / 'k.safetensors'}:0.5")])
        torch.testing.assert_close(root(*inputs), expected, atol=2e-2, rtol=0)  # two halves ~ one whole (to second order)
        unload_lora(tiny)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t | {"transformer.transformer_blocks.0.attn.to_q.dora_scale": torch.ones(1)}, "1 unknown key(s)"),
        (lambda t: t | {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 128)}, "lora_B / lora_up is missing"),
        (lambda t: t | {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 64), "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(384, 2)}, "do not fit mmdit.joint_blocks.0.x_block.attn.qkv"),
        (lambda t: t | {"lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 8), "lora_unet_no_such_layer.lora_up.weight": torch.zeros(8, 2)}, "the model has no such layer (mmdit no_such_layer)"),
        (lambda t: t | {"text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.zeros(2, 8)}, "LoRA on T5 is not supported"),
    ],
)
def test_bad_lora_files_name_their_keys(tmp_path, tiny, change, message):
    lora = _random_lora(tiny)
    lora.detach()
    save_lora(lora, tmp_path / "good.safetensors")
    good, _ = read_lora_file(tmp_path / "good.safetensors")
    save_file(change(good), str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="Cannot load this LoRA") as e:
        load_lora(tiny, tmp_path / "bad.safetensors")
    assert message in str(e.value)
    assert getattr(tiny, "loras", {}) == {}


def test_parse_lora_arg():
    assert parse_lora_arg("a.safetensors:0.3")[1] == 0.3
    assert parse_lora_arg("C:/x/a.safetensors") == (parse_lora_arg("C:/x/a.safetensors")[0], 1.0)


def test_pipeline_methods_load_and_unload(tmp_path, tiny):
    "SD3Pipeline.load_lora / unload_lora (attached in chapter 11) are chapter 15's functions: same output, exact undo."
    root, inputs, expected, plain, _ = _saved_random_lora(tiny, tmp_path / "style.safetensors")
    with torch.no_grad():
        attached = tiny.load_lora(tmp_path / "style.safetensors", scale=1.0, name="style")
        assert tiny.loras == {"style": attached}
        torch.testing.assert_close(root(*inputs), expected, atol=1e-4, rtol=0)  # the file folds alpha/r into B: fp32 rounding, far below 1e-4
        with pytest.raises(ValueError, match="already loaded"):
            tiny.load_lora(tmp_path / "style.safetensors", name="style")
        tiny.unload_lora("style")
        assert torch.equal(root(*inputs), plain) and tiny.loras == {}
