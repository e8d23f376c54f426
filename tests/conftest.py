"""Shared fixtures: a tiny Audex model built from conf/model/tiny.yaml, and generated audio."""

import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "conf" / "model" / "tiny.yaml"

# one thread: the tiny models are latency-bound and 2-core CI machines run pytest beside other work
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool / a GPU agent)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model():
    from audex.models.audex_model import AudexModel

    torch.manual_seed(0)
    model = AudexModel.from_config_file(str(TINY_YAML))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_yaml() -> Path:
    return TINY_YAML


def make_tone(seconds: float, freq: float = 440.0, sr: int = 16000, amp: float = 0.3) -> torch.Tensor:
    t = torch.arange(int(round(seconds * sr))) / sr
    return amp * torch.sin(2 * math.pi * freq * t)


@pytest.fixture
def tone():
    return make_tone
