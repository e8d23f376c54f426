"""Shared fixtures: a tiny Audex model built from conf/model/tiny.yaml, and generated audio."""

import fcntl
import math
from pathlib import Path

import pytest
import torch
from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "conf" / "model" / "tiny.yaml"

# one thread: the tiny models are latency-bound and 2-core CI machines run pytest beside other work
torch.set_num_threads(1)


#: the longest test modules (minutes each on 2 cores), run first: with ``-n 2 --dist loadfile`` (the README's test
#: command) each worker takes whole modules in collection order, so starting the long ones first lets the short
#: ones fill in around them and both workers finish together (longest-processing-time-first scheduling)
LONGEST_FIRST = ("tests/test_readme.py", "tests/parallel/test_lightning_parallel.py", "tests/test_install.py",
                 "tests/parallel/test_lightning_4proc.py",
                 "tests/serving/test_serving_cli.py", "tests/serving/test_triton_ensemble.py",
                 "tests/parallel/test_megatron_engine.py", "tests/parallel/test_context_parallel.py")


def _module_rank(item) -> int:
    path = item.nodeid.split("::")[0]
    return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_module_rank)                    # stable: the order inside a module and among the rest stays
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


@pytest.fixture(scope="session")
def speaker_model_dir(tmp_path_factory):
    """A tiny randomly initialised x-vector model saved as a local Hugging Face folder."""
    folder = tmp_path_factory.mktemp("wavlm_sv")
    torch.manual_seed(0)
    cfg = WavLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=2, tdnn_dim=(16, 16, 32), tdnn_kernel=(5, 3, 1),
                      tdnn_dilation=(1, 2, 1), xvector_output_dim=16, num_buckets=32, max_bucket_distance=100)
    WavLMForXVector(cfg).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                             return_attention_mask=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def triton_server_turn(tmp_path_factory):
    """One Triton server at a time across pytest-xdist workers: a file lock in the folder the workers share, held for
    the requesting module's lifetime (the modules that start a ``tritonserver``). In two CI runs the ensemble's
    python-backend models hung at load (``test_triton_ensemble``: not ready after 600 s). The servers' own logs, left in
    /tmp, show its server started 5-6 s after ``test_serving_cli``'s server stopped on the same xdist worker; once
    while ``test_readme``'s background server ran, once 80 s after it had stopped. Two servers started at once, on
    one cache or apart, and the ensemble started under CPU load or right after ``test_serving_cli`` did not hang in
    14 tries. The cause is not found; the lock keeps CI honest meanwhile. A recurrence now names itself: a worker
    stuck loading is a load error, and a server not ready in time has its workers' stacks in its log."""
    path = tmp_path_factory.getbasetemp().parent / "audex-triton-server.lock"
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
