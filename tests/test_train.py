"""`sd-book train` as a command: data-parallel training under torchrun equals one process with the same global batch,
for every stage: the VAE, the contrastive pretraining of each text tower (whose loss couples the whole batch, gathered
across processes) and the MMDiT."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SD_BOOK = Path(sys.executable).parent / "sd-book"
TINY_RUN = ["--quick", "--scenes", "64", "--vae-steps", "3", "--text-pretrain-steps", "3", "--steps", "4", "--batch-size", "8", "--eval-every", "0", "-q"]
STAGES = ("vae", "text_1", "text_2", "sd3")


def train(out: Path, processes: int) -> dict:
    "The training checkpoints of a tiny `sd-book train` run with `processes` processes under torchrun (gloo on the CPU)."
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", str(SD_BOOK), "train", "--out", str(out), *TINY_RUN]
    subprocess.run(command, check=True, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": str(SD_BOOK.parent)})
    return {stage: torch.load(out / "training" / f"{stage}.pt", weights_only=True) for stage in STAGES}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return train(root / "one", 1), train(root / "two", 2)


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_train_the_weights_of_one(runs, stage):
    one, two = (r[stage] for r in runs)
    assert one["step"] == two["step"] > 0
    assert one["model"].keys() == two["model"].keys()
    worst = max((one["model"][k] - two["model"][k]).abs().max().item() for k in one["model"])
    # the same arithmetic but for the order in which the gradient all-reduce adds the two halves: fp32 rounding, ~1e-7 per value
    assert worst < 1e-5, worst
    assert one["history"]["loss"] != [] and len(one["history"]["loss"]) == len(two["history"]["loss"])


@pytest.mark.parametrize("stage", STAGES)
def test_the_loss_history_is_the_whole_batch_loss(runs, stage):
    "The history keeps the loss of the whole batch, as one process does (the mean of the halves', or the gathered loss)."
    one, two = (r[stage]["history"]["loss"] for r in runs)
    assert one == pytest.approx(two, rel=1e-5)
