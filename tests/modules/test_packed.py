"""Per-sample (varlen) attention over packed rows gives the same logits and gradients as the dense masked
attention of AudexModel.forward, and leaves unpacked use (generation) untouched."""

import pytest
import torch

from audex.modules.packed import enable_varlen_attention, packed_segments, uses_varlen_attention


@pytest.fixture
def model(tiny_yaml):
    from audex.models.audex_model import AudexModel

    torch.manual_seed(0)
    return AudexModel.from_config_file(str(tiny_yaml)).train()


def _packed_batch(model, spans, length):
    g = torch.Generator().manual_seed(1)
    B = len(spans)
    ids = torch.randint(0, 500, (B, length), generator=g)
    ids[ids == model.tokenizer.so_embedding] = 1
    sample_ids = torch.full((B, length), -1)
    position_ids = torch.zeros(B, length, dtype=torch.long)
    for b, row in enumerate(spans):
        for j, (s, e) in enumerate(row):
            sample_ids[b, s:e], position_ids[b, s:e] = j, torch.arange(e - s)
    return {"input_ids": ids, "labels": ids.clone(), "sample_ids": sample_ids, "position_ids": position_ids,
            "audios": []}


def test_packed_segments_reads_sample_ids():
    sids = torch.tensor([[0, 0, 1, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert packed_segments(sids) == [[(0, 2), (2, 5), (5, 6)], [(0, 8)]]


def test_varlen_equals_dense_masked_attention(model):
    batch = _packed_batch(model, [[(0, 40), (40, 130), (130, 150)], [(0, 160)]], 160)
    dense = model.forward_batch(batch).logits
    (dense * torch.linspace(-1, 1, dense.shape[-1])).sum().backward()
    dense_grad = model.backbone.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    assert enable_varlen_attention(model.backbone) and uses_varlen_attention(model.backbone)
    varlen = model.forward_batch(batch).logits
    (varlen * torch.linspace(-1, 1, varlen.shape[-1])).sum().backward()
    valid = batch["sample_ids"] >= 0
    assert torch.allclose(varlen[valid], dense[valid], atol=2e-5)
    assert torch.allclose(model.backbone.model.layers[0].self_attn.q_proj.weight.grad, dense_grad, atol=1e-4)


def test_unpacked_calls_are_plain_sdpa(model):
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0  # left padding, as generation has
    before = model(input_ids=ids, attention_mask=mask).logits
    enable_varlen_attention(model.backbone)
    after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(before[mask.bool()], after[mask.bool()], atol=1e-5)
