"""Shared fixtures: a tiny random SD3.5 in the diffusers layout and in Stability's single-file layout
(built once per test session by tests/pipeline_fixture.py, the same builder the notebook uses)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline_fixture  # noqa: E402


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    "A tiny random SD3.5 saved by diffusers' StableDiffusion3Pipeline.save_pretrained."
    return pipeline_fixture.build_diffusers_folder(tmp_path_factory.mktemp("tiny") / "tiny-sd3.5")


@pytest.fixture(scope="session")
def single_folder(tiny_folder, tmp_path_factory):
    "The same model in Stability's single-file layout."
    return pipeline_fixture.write_single_files(tiny_folder, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def one_thread():
    "Run a module's tests on one thread (tiny models: waking a second thread on a busy 2-core CPU costs more than it gives)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
