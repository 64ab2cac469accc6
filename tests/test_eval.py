"""`sd-book eval` end to end on the shipped tiny SD3, and its messages for the usual mistakes."""
import json

import pytest

from sd_book.metrics import evaluate_model, load_eval_networks
from sd_book.pipeline import SD3Pipeline, main

def run(capsys, *args):
    "(exit status, stdout, stderr) of `sd-book *args`, run in this process."
    try:
        status = main([str(a) for a in args])
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_eval_prints_the_table_and_saves_geneval_layout(capsys, tmp_path):
    status, out, err = run(capsys, "eval", "--images-per-prompt", 1, "--steps", 8, "--save", tmp_path / "run", "-q")
    assert status == 0, err
    for row in ("GenEval single_object", "GenEval color_attr", "GenEval overall", "held_out", "FID", "KID", "CLIP score"):
        assert row in out
    prompts = sorted((tmp_path / "run").glob("*/metadata.jsonl"))
    assert len(prompts) == 240 and all((p.parent / "samples" / "0000.png").is_file() for p in prompts)
    saved = json.loads((tmp_path / "run" / "scores.json").read_text())
    # the command's numbers are evaluate_model's with the same settings
    table = evaluate_model(SD3Pipeline.from_pretrained(), 1, nets=load_eval_networks(), progress=False, num_inference_steps=8)[0]
    for key in ("overall", "fid", "kid", "clip_score", "fid_real"):
        assert saved[key] == pytest.approx(table[key], rel=1e-6), key
    assert f"{table['overall']:.3f}" in out


def test_eval_missing_networks(capsys, tmp_path):
    status, out, err = run(capsys, "eval", "--nets", tmp_path)
    assert status == 1 and "No evaluation networks" in err and "--train-networks" in err


def test_eval_bad_count(capsys):
    status, out, err = run(capsys, "eval", "--images-per-prompt", 0)
    assert status == 1 and "--images-per-prompt must be at least 1" in err


def test_eval_refuses_a_model_outside_the_world(capsys, tiny_folder):
    status, out, err = run(capsys, "eval", "--model", tiny_folder)     # a random SD3.5 drawing 1024 x 1024 pictures
    assert status == 1 and "know only chapter 12's world" in err
