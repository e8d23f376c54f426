"""Packing: the balanced greedy knapsack, the online packer, and the packed batch layout the model and loss see."""

import math
import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from audex.data import schema
from audex.data.collate import PackedBatch, collate_padded, collate_rows
from audex.data.packing import OnlinePacker, pack_balanced_greedy
from audex.data.sequence import IGNORE_INDEX, BuiltSequence, SequenceBuilder
from audex.data.skips import TOO_LONG_FOR_CONTEXT
from audex.parts.losses import language_model_loss


def fake_sequence(n: int, cut_id: str, seed: int = 0, n_audio: int = 0, task: str = "text") -> BuiltSequence:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 400, (n,), generator=g)
    labels = ids.clone()
    labels[: n // 2] = IGNORE_INDEX  # the prompt half is not trained
    audios = [torch.full((100 + i,), float(seed)) for i in range(n_audio)]
    return BuiltSequence(ids, labels, audios, task, cut_id, [1] * n_audio)


# ---- the knapsack ---------------------------------------------------------------------------------
def test_pack_balanced_greedy_examples():
    assert pack_balanced_greedy([900, 700, 500, 400, 300, 100], 1000) == [[0, 5], [1, 4], [2, 3]]
    # 3,000 tokens need 3 bins of 1,000, but the 200 fits into none of them: a 4th bin opens
    assert pack_balanced_greedy([900, 700, 500, 400, 300, 200], 1000) == [[0], [1, 4], [2, 3], [5]]
    assert pack_balanced_greedy([], 1000) == []
    # a preset number of bins is honoured and balanced: 8 x 100 into 4 bins -> 200 each
    bins = pack_balanced_greedy([100] * 8, 1000, num_bins=4)
    assert [len(b) for b in bins] == [2, 2, 2, 2]


def test_pack_balanced_greedy_rejects_bad_lengths():
    with pytest.raises(ValueError, match="item 1 has 1001 tokens, more than max_length=1000"):
        pack_balanced_greedy([10, 1001], 1000)
    with pytest.raises(ValueError, match="positive lengths"):
        pack_balanced_greedy([10, 0], 1000)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=300), st.integers(1000, 3000))
def test_pack_keeps_every_item_and_respects_capacity(lengths, max_length):
    bins = pack_balanced_greedy(lengths, max_length)
    flat = [i for b in bins for i in b]
    assert sorted(flat) == list(range(len(lengths)))               # none lost, none twice
    assert all(sum(lengths[i] for i in b) <= max_length for b in bins)
    assert len(bins) >= math.ceil(sum(lengths) / max_length)         # never below the lower bound
    assert bins == pack_balanced_greedy(lengths, max_length)         # deterministic


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=20, max_size=400), st.integers(2, 8))
def test_pack_balances_bins(lengths, num_bins):
    """With room to spare (no overflow bin), worst-fit decreasing leaves the bins within one item of each other."""
    max_length = sum(lengths)  # every item fits anywhere: no bin is ever opened beyond num_bins
    bins = pack_balanced_greedy(lengths, max_length, num_bins=num_bins)
    fills = [sum(lengths[i] for i in b) for b in bins]
    assert len(bins) == min(num_bins, len(lengths))
    assert max(fills) - min(fills) <= max(lengths)


def _megatron_balanced_greedy_knapsack(item_sizes, max_capacity, delta):
    """Megatron-LM's ``balanced_greedy_knapsack`` (examples/multimodal/data_loading/knapsacks.py) written out,
    on item indices; its empty knapsacks are dropped (Audex drops them too)."""
    order = sorted(range(len(item_sizes)), key=lambda i: item_sizes[i], reverse=True)
    n = (sum(item_sizes) + max_capacity - 1) // max_capacity + delta
    knapsacks, fills = [[] for _ in range(n)], [0] * n
    ks, k = 0, 0
    while k < len(order):
        size = item_sizes[order[k]]
        if fills[ks] + size <= max_capacity:
            knapsacks[ks].append(order[k])
            fills[ks] += size
            k += 1
        else:
            knapsacks.append([])
            fills.append(0)
        ks = fills.index(min(fills))
    return [b for b in knapsacks if b]


def test_extra_bins_hand_example():
    # 2,900 tokens: 3 bins + 1 extra -> 4 bins; the 300 and the 100 go to the two emptiest
    assert pack_balanced_greedy([900, 700, 500, 400, 300, 100], 1000, extra_bins=1) == [[0], [1], [2, 5], [3, 4]]
    with pytest.raises(ValueError, match="extra_bins"):
        pack_balanced_greedy([10], 1000, extra_bins=-1)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=200), st.integers(1000, 3000), st.integers(0, 20))
def test_pack_equals_megatron_balanced_greedy_knapsack(lengths, max_length, delta):
    assert pack_balanced_greedy(lengths, max_length, extra_bins=delta) == \
        _megatron_balanced_greedy_knapsack(lengths, max_length, delta)


# ---- the packed batch layout -----------------------------------------------------------------------
def test_collate_rows_layout():
    a, b, c = fake_sequence(7, "a", 1, n_audio=1), fake_sequence(5, "b", 2), fake_sequence(4, "c", 3, n_audio=2)
    batch = collate_rows([[a, b], [c]], pad_id=8, pad_to_multiple_of=8)
    assert batch.input_ids.shape == (2, 16) and batch.num_samples == 3 and batch.num_rows == 2
    assert batch.cut_ids == ["a", "b", "c"] and batch.samples_per_row == [2, 1]
    # position ids restart at 0 for every sample; padding positions are 0
    assert batch.position_ids[0].tolist() == list(range(7)) + list(range(5)) + [0] * 4
    assert batch.position_ids[1].tolist() == list(range(4)) + [0] * 12
    assert batch.sample_ids[0].tolist() == [0] * 7 + [1] * 5 + [-1] * 4
    assert batch.sample_ids[1].tolist() == [0] * 4 + [-1] * 12
    # ids and (unshifted) labels are each sample's own, padding is <pad> / -100
    assert torch.equal(batch.input_ids[0, :7], a.input_ids) and torch.equal(batch.labels[0, 7:12], b.labels)
    assert batch.input_ids[0, 12:].eq(8).all() and batch.labels[0, 12:].eq(IGNORE_INDEX).all()
    # audios in row-major order of appearance: a's clip, then c's two clips
    assert [x.shape[0] for x in batch.audios] == [100, 100, 101]
    assert batch.audios[0][0] == 1.0 and batch.audios[1][0] == 3.0
    assert batch.num_real_tokens == 16 and batch.real_token_share == 16 / 32


def test_collate_padded_is_one_sample_per_row():
    seqs = [fake_sequence(n, f"s{n}", n) for n in (3, 9, 5)]
    batch = collate_padded(seqs, pad_id=8)
    assert isinstance(batch, PackedBatch) and batch.input_ids.shape == (3, 9)
    assert batch.samples_per_row == [1, 1, 1] and batch.sample_ids.max() == 0
    assert batch.sample_ids.ge(0).sum(dim=1).tolist() == [3, 9, 5]


def test_collate_rows_fixed_length_too_short():
    with pytest.raises(ValueError, match="more than the fixed length 8"):
        collate_rows([[fake_sequence(5, "a"), fake_sequence(5, "b")]], pad_id=8, length=8)


def test_packed_and_padded_batches_give_the_same_loss():
    """The loss sees only sample_ids/labels/positions: a position-wise model gives identical eq. (2) and eq. (1)
    losses for the same samples padded one per row or packed several per row."""
    rng = random.Random(0)
    seqs = [fake_sequence(rng.randint(6, 40), f"s{i}", i) for i in range(9)]
    bins = pack_balanced_greedy([len(s) for s in seqs], 64)
    packed = collate_rows([[seqs[i] for i in b] for b in bins], pad_id=8)
    padded = collate_padded(seqs, pad_id=8)
    assert packed.num_rows < padded.num_rows

    g = torch.Generator().manual_seed(0)
    by_token, by_position = torch.randn(512, 512, generator=g), torch.randn(64, 512, generator=g)

    def logits(batch):  # a "model" whose output depends on the token and its position in its own sample
        return by_token[batch.input_ids] + by_position[batch.position_ids]

    for reduction in ("square_averaged", "token_mean"):
        loss_packed, stats_packed = language_model_loss(logits(packed), packed.labels, packed.sample_ids, reduction)
        loss_padded, stats_padded = language_model_loss(logits(padded), padded.labels, padded.sample_ids, reduction)
        assert torch.allclose(loss_packed, loss_padded, atol=1e-6), reduction
        assert int(stats_packed["trainable_tokens"]) == int(stats_padded["trainable_tokens"])


# ---- the online packer -----------------------------------------------------------------------------
@pytest.mark.parametrize("rows_per_batch", [1, 3])
def test_online_packer_keeps_every_sample(rows_per_batch):
    rng = random.Random(rows_per_batch)
    seqs = [fake_sequence(rng.randint(5, 300), f"s{i}", i, n_audio=i % 2) for i in range(500)]
    seqs.insert(17, fake_sequence(1200, "too-long"))
    skipped = []
    packer = OnlinePacker(max_length=1000, pad_id=8, buffer_size=64, rows_per_batch=rows_per_batch,
                          on_skip=skipped.append)
    batches = list(packer(iter(seqs)))
    assert [(s.reason, s.cut_id) for s in skipped] == [(TOO_LONG_FOR_CONTEXT, "too-long")]
    seen = Counter(c for b in batches for c in b.cut_ids)
    assert seen == Counter(s.cut_id for s in seqs if s.cut_id != "too-long")    # every sample exactly once
    by_id = {s.cut_id: s for s in seqs}
    for b in batches:
        assert b.input_ids.shape[1] <= 1000 and b.num_rows <= rows_per_batch
        k = 0
        for row in range(b.num_rows):
            for j in range(int(b.sample_ids[row].max()) + 1):
                seq = by_id[b.cut_ids[k]]
                span = (b.sample_ids[row] == j).nonzero().flatten()
                assert span.numel() == len(seq) and int(span[-1] - span[0]) + 1 == len(seq)  # contiguous
                assert torch.equal(b.input_ids[row, span], seq.input_ids)
                assert torch.equal(b.labels[row, span], seq.labels)
                assert b.position_ids[row, span].tolist() == list(range(len(seq)))
                k += 1
        assert len(b.audios) == sum(len(by_id[c].audios) for c in b.cut_ids)
    # whole micro-batches while the stream lasts; only the flush at its end may be short
    assert all(b.num_rows == rows_per_batch for b in batches[:-1])


def test_online_packer_fills_rows():
    """Holding the overflow back for the next buffer keeps the emitted rows almost full (the bench's >= 98 %)."""
    rng = random.Random(0)
    lengths = [rng.randint(10, 300) for _ in range(3000)]
    packer = OnlinePacker(max_length=1000, pad_id=8, buffer_size=256)
    rows = [row for batch in packer.pack_rows(fake_sequence(n, f"s{i}") for i, n in enumerate(lengths)) for row in batch]
    fills = [sum(len(s) for s in row) for row in rows]
    assert sum(fills) == sum(lengths)
    assert sum(fills) / (len(rows) * 1000) >= 0.98
    assert sorted(fills)[1] >= 900  # only the row flushed at the end of the stream may be short


def test_online_packer_extra_bins_trade_fill_for_more_rows():
    """Megatron's delta: every round opens ``extra_bins`` more rows, so there are more, less full rows; nothing
    is lost."""
    rng = random.Random(0)
    lengths = [rng.randint(10, 300) for _ in range(3000)]

    def fills(extra_bins):
        packer = OnlinePacker(max_length=1000, pad_id=8, buffer_size=256, extra_bins=extra_bins)
        rows = [r for b in packer.pack_rows(fake_sequence(n, f"s{i}") for i, n in enumerate(lengths)) for r in b]
        return [sum(len(s) for s in r) for r in rows]

    base, extra = fills(0), fills(4)
    assert sum(base) == sum(extra) == sum(lengths)
    assert len(extra) > len(base)
    assert sum(extra) / (len(extra) * 1000) < sum(base) / (len(base) * 1000)
    with pytest.raises(ValueError, match="extra_bins"):
        OnlinePacker(max_length=1000, pad_id=8, extra_bins=-1)


def test_online_packer_without_on_skip_raises_for_too_long():
    packer = OnlinePacker(max_length=10, pad_id=8, buffer_size=4)
    with pytest.raises(Exception, match="too_long_for_context"):
        list(packer([fake_sequence(11, "x")]))


@pytest.mark.slow
def test_packed_rows_match_padded_rows_in_the_model(tiny_model):
    """Packed rows through the tiny Audex model give each sample the logits it gets alone (no attention across
    samples, positions restart, audio clips land in their own sample's <so_embedding> run)."""
    tok = tiny_model.tokenizer
    builder = SequenceBuilder(tok, tiny_model.frames_for_samples, max_length=4096)
    tone = torch.sin(torch.arange(8000) / 3.0) * 0.3
    cuts = [schema.make_text_cut("t0", [{"role": "user", "content": "Name a color."},
                                        {"role": "assistant", "content": "Blue."}]),
            schema.make_tts_cut("hello", speech_codes=torch.arange(40) % 200, cut_id="tts0"),
            schema.make_text_cut("t1", [{"role": "user", "content": "Count to three."},
                                        {"role": "assistant", "content": "One, two, three."}])]
    seqs = [builder(c) for c in cuts]
    # an audio QA sample with a 0.5 s clip, built by hand around the builder's expansion
    frames = tiny_model.frames_for_samples(tone.numel())
    ids = torch.tensor([tok.im_start, tok.so_start] + [tok.so_embedding] * frames + [tok.so_end, tok.im_end])
    seqs.insert(1, BuiltSequence(ids, ids.clone(), [tone], "audio_qa", "qa0", [frames]))
    packed = collate_rows([seqs], pad_id=tok.pad_id)
    padded = collate_padded(seqs, pad_id=tok.pad_id)  # one sample per row: each sample alone
    with torch.no_grad():
        out_packed = tiny_model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                                sample_ids=packed.sample_ids, audios=packed.audios).logits[0]
        out_padded = tiny_model(input_ids=padded.input_ids, position_ids=padded.position_ids,
                                sample_ids=padded.sample_ids, audios=padded.audios).logits
    for j, seq in enumerate(seqs):
        alone = out_padded[j, : len(seq)]
        assert torch.allclose(out_packed[packed.sample_ids[0] == j], alone, atol=1e-4), seq.cut_id
