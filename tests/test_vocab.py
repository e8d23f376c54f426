"""The extended vocabulary of section 3.3: layout, sizes, codec <-> token maps, RVQ flattening."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from audex.vocab import AudexVocab

REAL = AudexVocab()  # 131,072 text + 65,536 + 8,192 + 5, padded to 512


def test_real_layout_numbers():
    assert REAL.unpadded_size == 131072 + 65536 + 8192 + 5 == 204805
    assert REAL.size == 205312 and REAL.size % 512 == 0
    assert REAL.speech_range == range(131072, 196608)
    assert REAL.audio_range == range(196608, 204800)
    assert [REAL.speechgen_start, REAL.speechgen_end, REAL.audiogen_start, REAL.audiogen_end, REAL.audiogen] == list(
        range(204800, 204805))
    assert REAL.audio_layer_range(3) == range(196608 + 3 * 1024, 196608 + 4 * 1024)
    assert REAL.tokens_per_second("speech") == 50
    assert REAL.tokens_per_second("audio") == 200
    assert REAL.id_to_token(131072 + 123) == "<speechcodec_123>"
    assert REAL.id_to_token(196608 + 2 * 1024 + 7) == "<audiocodec_2055>"
    assert REAL.id_to_token(204801) == "<speechgen_end>"


@pytest.mark.parametrize("yaml", ["audex_2b.yaml", "audex_30b_a3b.yaml"])
def test_real_configs_give_205312(yaml, tiny_yaml):
    cfg = OmegaConf.load(tiny_yaml.parent / yaml)
    v = AudexVocab(**OmegaConf.to_container(cfg.vocab))
    assert v.size == 205312
    assert cfg.backbone.config.vocab_size == v.text_vocab_size == 131072


def test_speech_round_trip():
    codes = torch.tensor([0, 1, 65535, 4242])
    ids = REAL.speech_codes_to_ids(codes)
    assert ids.tolist() == [131072, 131073, 196607, 135314]
    assert torch.equal(REAL.ids_to_speech_codes(ids), codes)
    with pytest.raises(ValueError, match="out of range"):
        REAL.speech_codes_to_ids([65536])
    with pytest.raises(ValueError, match="not <speechcodec_i>"):
        REAL.ids_to_speech_codes([5])


def test_rvq_flatten_is_frame_major():
    codes = torch.tensor([[1, 2, 3], [10, 20, 30], [100, 200, 300], [1000, 1001, 1002]])  # [4 layers, 3 frames]
    flat = AudexVocab.flatten_rvq(codes)
    assert flat.tolist() == [1, 10, 100, 1000, 2, 20, 200, 1001, 3, 30, 300, 1002]
    assert torch.equal(AudexVocab.unflatten_rvq(flat, 4), codes)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_audio_round_trip_property(frames, n_q, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1024, (n_q, frames), generator=g)
    ids = REAL.audio_codes_to_ids(codes)
    assert ids.numel() == frames * n_q
    assert bool(REAL.is_audio(ids).all())
    # position t*n_q + q carries a token of layer q
    layers = (ids - REAL.audio_offset) // 1024
    assert layers.tolist() == [q for _ in range(frames) for q in range(n_q)]
    assert torch.equal(REAL.ids_to_audio_codes(ids, n_q), codes)


def test_ten_seconds_of_audio_is_2000_tokens():
    codes = torch.zeros(4, 10 * 50, dtype=torch.long)
    assert REAL.audio_codes_to_ids(codes).numel() == 2000


def test_audio_ids_in_wrong_layer_order_rejected():
    ids = REAL.audio_codes_to_ids(torch.zeros(4, 2, dtype=torch.long))
    swapped = ids.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    with pytest.raises(ValueError, match="layer order"):
        REAL.ids_to_audio_codes(swapped)


def test_bad_vocab_config():
    with pytest.raises(ValueError, match="audio_rvq_used"):
        AudexVocab(audio_rvq_used=9)
    with pytest.raises(ValueError, match="positive"):
        AudexVocab(text_vocab_size=0)
