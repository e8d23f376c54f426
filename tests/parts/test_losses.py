"""Losses of section 4.3: eq. (2) per sample and per turn against hand-computed values and Megatron's
scaled_loss_func, packing invariance, MoE balancing terms."""

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from tiny_moe import tiny_nemotron_h

from audex.models.audex_model import AudexModel
from audex.parts.losses import (
    IGNORE_INDEX,
    language_model_loss,
    mean_token_loss,
    square_averaged_loss,
    token_cross_entropy,
    turn_ids,
)
from audex.parts.moe import MoeBalancer

V = 37


def _sample(length: int, n_prompt: int, gen: torch.Generator):
    """One sample: ids, labels (prompt untrainable), and logits of a fixed random 'model'."""
    ids = torch.randint(0, V, (length,), generator=gen)
    labels = ids.clone()
    labels[:n_prompt] = IGNORE_INDEX
    logits = torch.randn(length, V, generator=gen) * 3
    return ids, labels, logits


def _reference_eq2(samples):
    """Eq. (2) written out with Python loops: the per-sample reference."""
    num, den = 0.0, 0.0
    for _, labels, logits in samples:
        L = [-torch.log_softmax(logits[t], -1)[labels[t + 1]].item()
             for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]
        if L:
            num += sum(L) / math.sqrt(len(L))
            den += math.sqrt(len(L))
    return num / den


def _pack(samples, row_length):
    """Pack samples into one row (with trailing padding), as the data pipeline does."""
    ids = torch.full((1, row_length), 0)
    labels = torch.full((1, row_length), IGNORE_INDEX)
    logits = torch.zeros(1, row_length, V)
    sids = torch.full((1, row_length), -1)
    pos = 0
    for j, (i, lab, g) in enumerate(samples):
        n = len(i)
        ids[0, pos:pos + n], labels[0, pos:pos + n], logits[0, pos:pos + n], sids[0, pos:pos + n] = i, lab, g, j
        pos += n
    return ids, labels, logits, sids


def _pad_rows(samples):
    width = max(len(s[0]) for s in samples)
    B = len(samples)
    labels = torch.full((B, width), IGNORE_INDEX)
    logits = torch.zeros(B, width, V)
    sids = torch.full((B, width), -1)
    for b, (i, lab, g) in enumerate(samples):
        labels[b, :len(i)], logits[b, :len(i)], sids[b, :len(i)] = lab, g, 0
    return labels, logits, sids


@pytest.fixture
def samples():
    gen = torch.Generator().manual_seed(0)
    # lengths chosen so that trainable counts differ a lot (sqrt weighting matters)
    return [_sample(n, p, gen) for n, p in [(12, 4), (40, 5), (7, 6), (25, 20), (60, 2)]]


def test_square_averaged_loss_equals_reference_packed(samples):
    _, labels, logits, sids = _pack(samples, 160)
    losses, trainable, target_sids = token_cross_entropy(logits, labels, sids)
    got = square_averaged_loss(losses, trainable, target_sids)
    assert got.item() == pytest.approx(_reference_eq2(samples), rel=1e-5)


def test_square_averaged_loss_equals_reference_unpacked_and_packing_invariant(samples):
    labels, logits, sids = _pad_rows(samples)
    losses, trainable, target_sids = token_cross_entropy(logits, labels, sids)
    unpacked = square_averaged_loss(losses, trainable, target_sids)
    assert unpacked.item() == pytest.approx(_reference_eq2(samples), rel=1e-5)
    # two rows of packed samples give the same objective as one sample per row
    a = _pack(samples[:2], 80)
    b = _pack(samples[2:], 100)
    width = 100
    lab = torch.full((2, width), IGNORE_INDEX)
    lg = torch.zeros(2, width, V)
    sd = torch.full((2, width), -1)
    lab[0, :80], lg[0, :80], sd[0, :80] = a[1][0], a[2][0], a[3][0]
    lab[1], lg[1], sd[1] = b[1][0], b[2][0], b[3][0]
    packed2 = square_averaged_loss(*token_cross_entropy(lg, lab, sd))
    assert packed2.item() == pytest.approx(unpacked.item(), rel=1e-6)


def test_square_averaging_differs_from_token_mean_and_sample_mean(samples):
    """Eq. (2) sits between the per-token mean (eq. 1) and the mean of per-sample means."""
    _, labels, logits, sids = _pack(samples, 160)
    losses, trainable, target_sids = token_cross_entropy(logits, labels, sids)
    eq2 = square_averaged_loss(losses, trainable, target_sids).item()
    eq1 = mean_token_loss(losses, trainable).item()
    per_sample = []
    for _, lab, g in samples:
        ls, tr, _ = token_cross_entropy(g.unsqueeze(0), lab.unsqueeze(0))
        per_sample.append(mean_token_loss(ls, tr).item())
    sample_mean = sum(per_sample) / len(per_sample)
    assert abs(eq2 - eq1) > 1e-3 and abs(eq2 - sample_mean) > 1e-3
    assert min(eq1, sample_mean) < eq2 < max(eq1, sample_mean)


def _hand_row():
    """One packed row of per-target losses: sample 0 has two assistant turns ([1, 2] and [3]), sample 1 one
    turn ([4, 4, 4, 4]); ``None`` = untrainable (prompt, the header of the second turn, sample start)."""
    row = [(None, 0), (1.0, 0), (2.0, 0), (None, 0), (3.0, 0), (None, 0),
           (None, 1), (4.0, 1), (4.0, 1), (4.0, 1), (4.0, 1), (None, -1)]
    losses = torch.tensor([[v or 0.0 for v, _ in row]])
    trainable = torch.tensor([[v is not None for v, _ in row]])
    sids = torch.tensor([[s for _, s in row]])
    return losses, trainable, sids


def test_square_average_units_against_hand_computed_values():
    losses, trainable, sids = _hand_row()
    # per sample (the paper): sample 0 sums 6 over 3 tokens, sample 1 sums 16 over 4
    per_sample = square_averaged_loss(losses, trainable, sids, unit="sample").item()
    assert per_sample == pytest.approx((6 / math.sqrt(3) + 16 / 2) / (math.sqrt(3) + 2), rel=1e-6)
    assert per_sample == pytest.approx(3.0717968, rel=1e-6)
    # per turn (Megatron): [1, 2] over 2, [3] over 1, [4, 4, 4, 4] over 4
    per_turn = square_averaged_loss(losses, trainable, sids, unit="turn").item()
    assert per_turn == pytest.approx((3 / math.sqrt(2) + 3 / 1 + 16 / 2) / (math.sqrt(2) + 1 + 2), rel=1e-6)
    assert per_turn == pytest.approx(2.9725160, rel=1e-6)
    assert turn_ids(trainable).tolist() == [[-1, 0, 0, -1, 1, -1, -1, 2, 2, 2, 2, -1]]


def _megatron_scaled_loss(losses, loss_mask):
    """Megatron-LM's ``scaled_loss_func`` (examples/multimodal/train.py) written out: turns are the contiguous
    runs of the loss mask of each row."""
    means, lengths = [], []
    for row_losses, row_mask in zip(losses.tolist(), loss_mask.tolist()):
        t = 0
        while t < len(row_mask):
            if row_mask[t]:
                end = t
                while end + 1 < len(row_mask) and row_mask[end + 1]:
                    end += 1
                n = end - t + 1
                means.append(sum(row_losses[t:end + 1]) / n)
                lengths.append(n)
                t = end + 1
            else:
                t += 1
    base = sum(math.sqrt(n) for n in lengths)
    return sum(m * math.sqrt(n) / base for m, n in zip(means, lengths))


def test_turn_unit_equals_megatron_and_sample_unit_on_single_turn_samples(samples):
    # a two-turn chat packed with the fixture's single-turn samples: its middle prompt tokens split it
    gen = torch.Generator().manual_seed(1)
    ids, labels, logits = _sample(30, 3, gen)
    labels[12:16] = IGNORE_INDEX
    _, lab, lg, sids = _pack(samples + [(ids, labels, logits)], 200)
    losses, trainable, target_sids = token_cross_entropy(lg, lab, sids)
    per_turn, _ = language_model_loss(lg, lab, sids, unit="turn")
    assert per_turn.item() == pytest.approx(_megatron_scaled_loss(losses, trainable), rel=1e-5)
    assert per_turn.item() != pytest.approx(language_model_loss(lg, lab, sids, unit="sample")[0].item(), rel=1e-4)
    # every fixture sample is one turn: the units agree there
    _, lab, lg, sids = _pack(samples, 160)
    assert language_model_loss(lg, lab, sids, unit="turn")[0].item() == pytest.approx(
        language_model_loss(lg, lab, sids, unit="sample")[0].item(), rel=1e-6)
    with pytest.raises(ValueError, match="square_average_unit"):
        language_model_loss(lg, lab, sids, unit="chat")


def test_loss_unit_is_read_from_the_model_config():
    loss_unit = AudexModel.loss_unit.fget
    assert loss_unit(SimpleNamespace(cfg=OmegaConf.create({"loss": {"square_average_unit": "turn"}}))) == "turn"
    assert loss_unit(SimpleNamespace(cfg=OmegaConf.create({"loss": {"reduction": "square_averaged"}}))) == "sample"


def test_no_prediction_across_packed_boundary(samples):
    # make the first token of every sample trainable: it must still not count (it starts a new sample)
    s = [(i, torch.cat([i[:1], lab[1:]]), g) for i, lab, g in samples]
    _, labels, logits, sids = _pack(s, 160)
    _, trainable, _ = token_cross_entropy(logits, labels, sids)
    starts = [0]
    for i, _, _ in s[:-1]:
        starts.append(starts[-1] + len(i))
    for st in starts[1:]:
        assert not trainable[0, st - 1]  # position st-1 predicts token st, the next sample's first


def test_gradient_flows_and_empty_batch_is_zero(samples):
    _, labels, logits, sids = _pack(samples, 160)
    logits.requires_grad_(True)
    loss, stats = language_model_loss(logits, labels, sids)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    assert int(stats["trainable_tokens"]) == sum(int((lab[1:] != IGNORE_INDEX).sum()) for _, lab, _ in samples)
    empty = torch.full_like(labels, IGNORE_INDEX)
    zero, _ = language_model_loss(logits, empty, sids)
    assert zero.item() == 0.0 and zero.requires_grad


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="labels"):
        token_cross_entropy(torch.zeros(1, 4, V), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="vocabulary"):
        token_cross_entropy(torch.zeros(1, 4, V), torch.full((1, 4), V + 3))
    with pytest.raises(ValueError, match="reduction"):
        language_model_loss(torch.zeros(1, 4, V), torch.zeros(1, 4, dtype=torch.long), reduction="mean")


def test_moe_balancing_terms_present_finite_and_bias_moves_toward_balance():
    lm = tiny_nemotron_h()
    balancer = MoeBalancer(lm, bias_update_rate=1e-3, aux_loss_coeff=1e-6)
    assert len(balancer.routers) == 2
    balancer.check_routing_scale(2.5)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[1, 20:] = False  # padding is not counted
    with balancer.recording(valid):
        out = lm(input_ids=ids, use_cache=False)  # a training forward, as AudexModel calls it
    aux = balancer.load_balancing_loss()
    assert aux is not None and torch.isfinite(aux)
    # E * sum f_i P_i >= 1 with equality only for perfect balance; times the 1e-6 coefficient
    assert 1e-6 * 0.999 <= aux.item() <= 1e-6 * 8
    loads = {name: load.clone() for name, load in balancer._loads.items()}
    assert all(float(load.sum()) == (24 + 20) * 2 for load in loads.values())  # valid tokens x top-k
    before = {name: r.e_score_correction_bias.clone() for name, r in balancer.routers}
    (out.logits.sum() * 0 + aux).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lm.named_parameters() if n.endswith("gate.weight"))
    stats = balancer.update_bias()
    assert stats["moe_max_load_over_mean"] >= 1.0
    for name, router in balancer.routers:
        delta = router.e_score_correction_bias - before[name]
        load = loads[name]
        over, under = load > load.mean(), load < load.mean()
        assert torch.allclose(delta[over], torch.full_like(delta[over], -1e-3))
        assert torch.allclose(delta[under], torch.full_like(delta[under], 1e-3))
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        balancer.check_routing_scale(1.0)
    balancer.remove()
