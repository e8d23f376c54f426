"""Context parallelism over packed rows (issue 11, point 3): CP=2 over gloo equals one process.

A packed row of three samples of awkward lengths (11, 6, 17 tokens, then 6 padding) is split TE-THD style
(each sample padded to a multiple of 2·CP, mirrored halves). Against one process on the same weights: the
attention outputs and dQ/dK/dV, the logits of a tiny Llama and a tiny Nemotron-H (Mamba spans, MoE), the
square-averaged loss of eq. (2) after the all-reduce of per-sample token counts, and the parameter gradients;
then the tiny AudexModel with two audio clips in the row (frames embedded row-wide, gradients to the frames).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from parallel_workers import spawn
from transformers import AutoConfig, AutoModelForCausalLM

from audex import config_path
from audex.models.audex_model import AudexModel
from audex.parallel.context_parallel import (
    context_parallel,
    cp_inputs_embeds,
    cp_sdpa_attention,
    cp_square_averaged_loss,
    plan_context_parallel,
    shard_packed_batch,
    shift_labels,
)
from audex.parts.losses import IGNORE_INDEX, language_model_loss, token_cross_entropy

LENGTHS = (11, 6, 17)
ROW = 40
VOCAB = 64
KINDS = ("llama", "nemotron_h")


def packed_row(seed: int = 0):
    """input_ids, labels (first 3 tokens of each sample untrainable), position_ids, sample_ids: [1, 40]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (1, ROW), generator=g)
    labels, pos, sids = ids.clone(), torch.zeros(1, ROW, dtype=torch.long), torch.full((1, ROW), -1)
    at = 0
    for j, n in enumerate(LENGTHS):
        sids[0, at:at + n] = j
        pos[0, at:at + n] = torch.arange(n)
        labels[0, at:at + 3] = IGNORE_INDEX
        at += n
    ids[0, at:] = 0
    labels[0, at:] = IGNORE_INDEX
    return ids, labels, pos, sids


def spans():
    out, at = [], 0
    for n in LENGTHS:
        out.append((at, at + n))
        at += n
    return out


# ---- layout ------------------------------------------------------------------------------------------------
def test_layout_pads_samples_and_mirrors_halves():
    _, _, _, sids = packed_row()
    layout = plan_context_parallel(sids, cp_size=2)
    assert layout.spans[0] == [(0, 12), (12, 20), (20, 40)]          # 11 -> 12, 6 -> 8, 17 -> 20 (multiples of 4)
    assert layout.length == 40
    # rank 0: chunks 0 and 3 of each sample; rank 1: chunks 1 and 2 (chunk = padded length / 4)
    assert layout.local_index[0, 0].tolist() == [0, 1, 2, 9, 10, 11, 12, 13, 18, 19, 20, 21, 22, 23, 24, 35, 36, 37, 38, 39]
    assert layout.local_index[1, 0].tolist() == [3, 4, 5, 6, 7, 8, 14, 15, 16, 17, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34]
    both = torch.cat([layout.local_index[0, 0], layout.local_index[1, 0]])
    assert torch.equal(both[layout.restore[0]], torch.arange(40))
    sp = plan_context_parallel(sids, cp_size=2, pad_multiple=8)       # CP2 x TP2 with sequence parallelism
    assert sp.spans[0] == [(0, 16), (16, 24), (24, 48)] and sp.length == 48


def test_layout_of_two_rows_shares_one_length():
    sids = torch.tensor([[0] * 5 + [1] * 9 + [-1] * 2, [0] * 16])
    layout = plan_context_parallel(sids, cp_size=2)
    assert layout.spans == [[(0, 8), (8, 20)], [(0, 16)]] and layout.length == 20          # row 1: 4 tokens of padding
    assert layout.local_index.shape == (2, 2, 10)
    assert layout.local_index[0, 1].tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 16, 19]       # sample + trailing padding
    for b in range(2):
        assert sorted(torch.cat([layout.local_index[0, b], layout.local_index[1, b]]).tolist()) == list(range(20))


def test_layout_refuses_a_row_too_short_for_the_padding():
    _, _, _, sids = packed_row()
    with pytest.raises(ValueError, match="needs 40 tokens"):
        plan_context_parallel(sids, cp_size=2, length=36)
    with pytest.raises(ValueError, match="multiple of 2 x cp_size"):
        plan_context_parallel(sids, cp_size=4, pad_multiple=4)


def test_labels_shift_before_the_split_like_the_loss():
    ids, labels, _, sids = packed_row()
    targets = shift_labels(labels, sids)
    _, trainable, _ = token_cross_entropy(torch.zeros(1, ROW, 5), labels.clamp(max=4).where(labels < 0, labels % 5), sids)
    assert torch.equal(targets[:, :-1] != IGNORE_INDEX, trainable)
    assert targets[0, 10] == IGNORE_INDEX and targets[0, 9] == labels[0, 10]   # no target across a sample boundary
    shard = shard_packed_batch(ids, labels, torch.zeros_like(ids), sids, cp_size=2, cp_rank=1, pad_id=0)
    assert shard.targets[0, :6].tolist() == targets[0, 3:9].tolist()           # rank 1 starts at position 3


# ---- attention: outputs and dQ/dK/dV ---------------------------------------------------------------------
H, HKV, D = 4, 2, 8


def attention_inputs():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, ROW, D, generator=g, dtype=torch.float64) for h in (H, HKV, HKV))
    grad_out = torch.randn(1, ROW, H, D, generator=g, dtype=torch.float64)
    return q, k, v, grad_out


def reference_attention():
    q, k, v, grad_out = (t.requires_grad_(t.dim() == 4 and t.shape[2] == ROW) for t in attention_inputs())
    out = torch.zeros(1, ROW, H, D, dtype=torch.float64)
    for s, e in spans():
        o = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=True)
        out[:, s:e] = o.transpose(1, 2)
    (out * grad_out).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _local(x_bl, shard):
    """[1, L, ...] in original order -> this rank's padded positions (padding: fresh random values)."""
    src = shard.layout.source[0, shard.index[0]]
    noise = torch.randn((1, src.numel()) + x_bl.shape[2:], dtype=x_bl.dtype)
    return torch.where((src >= 0).view(1, -1, *[1] * (x_bl.dim() - 2)), x_bl[:, src.clamp(min=0)], noise)


def attention_worker(rank, world, tmp):
    ids, labels, pos, sids = packed_row()
    shard = shard_packed_batch(ids, labels, pos, sids, cp_size=world, cp_rank=rank, pad_id=0, group=dist.group.WORLD)
    q, k, v, grad_out = attention_inputs()
    q, k, v = (_local(t.transpose(1, 2), shard).transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    real = (shard.layout.source[0, shard.index[0]] >= 0).view(1, -1, 1, 1)
    g = _local(grad_out, shard) * real                                           # no gradient into padding rows
    module = torch.nn.Module().eval()
    out, _ = cp_sdpa_attention(module, q, k, v, None, audex_cp=shard)
    (out * g).sum().backward()
    torch.save({"src": shard.layout.source[0, shard.index[0]], "out": out.detach(), "dq": q.grad.transpose(1, 2),
                "dk": k.grad.transpose(1, 2), "dv": v.grad.transpose(1, 2)}, tmp / f"attn{rank}.pt")


def cp_worker(rank, world, tmp):
    """One process group for every CP check of this file (a spawn costs tens of seconds of imports)."""
    attention_worker(rank, world, tmp)
    for kind in KINDS:
        backbone_worker(rank, world, tmp, kind)
    audex_worker(rank, world, tmp)


@pytest.fixture(scope="module")
def cp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp2")
    for kind in KINDS:
        build_backbone(kind, tmp)                                                 # the weights both sides load
    build_audex(tmp)
    spawn(cp_worker, 2, tmp)
    return tmp


def test_cp2_attention_outputs_and_dq_dk_dv_equal_one_process(cp_run):
    tmp_path = cp_run
    out, dq, dk, dv = reference_attention()
    for rank in range(2):
        got = torch.load(tmp_path / f"attn{rank}.pt")
        real = got["src"] >= 0
        src = got["src"][real]
        assert real.sum() > 0
        torch.testing.assert_close(got["out"][0, real], out[0, src], rtol=0, atol=1e-12)
        torch.testing.assert_close(got["dq"][0, real], dq.transpose(1, 2)[0, src], rtol=0, atol=1e-12)
        torch.testing.assert_close(got["dk"][0, real], dk.transpose(1, 2)[0, src], rtol=0, atol=1e-12)
        torch.testing.assert_close(got["dv"][0, real], dv.transpose(1, 2)[0, src], rtol=0, atol=1e-12)
        if rank == 0:                                                             # rank 0 holds padding here
            assert float(got["dk"][0, ~real].abs().max()) == 0.0                 # padding keys get no gradient


# ---- whole backbones: logits, eq. (2) loss, parameter gradients -------------------------------------------
def backbone_config(kind: str):
    if kind == "llama":
        return AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=H, num_key_value_heads=HKV, max_position_embeddings=128)
    cfg = OmegaConf.to_container(OmegaConf.load(config_path("model", "tiny_hybrid.yaml")).backbone.config)
    cfg.update(vocab_size=VOCAB, max_position_embeddings=128)
    return AutoConfig.for_model("nemotron_h", **cfg)


def build_backbone(kind: str, tmp):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(backbone_config(kind), experts_implementation="eager").double()
    state = tmp / f"{kind}.pt"
    if state.exists():
        lm.load_state_dict(torch.load(state))
    else:
        torch.save(lm.state_dict(), state)
    return lm.train()


def backbone_worker(rank, world, tmp, kind):
    lm = build_backbone(kind, tmp)
    ids, labels, pos, sids = packed_row()
    shard = shard_packed_batch(ids, labels, pos, sids, cp_size=world, cp_rank=rank, pad_id=0, group=dist.group.WORLD)
    with context_parallel(lm):
        logits = lm(input_ids=shard.input_ids, position_ids=shard.position_ids, use_cache=False,
                    audex_cp=shard).logits
    share, loss = cp_square_averaged_loss(logits, shard)
    share.backward()
    grads = {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}
    for g in grads.values():
        dist.all_reduce(g)                                                        # CP gradients add up
    torch.save({"src": shard.layout.source[0, shard.index[0]], "logits": logits.detach(), "loss": loss,
                "grads": grads}, tmp / f"{kind}{rank}.pt")


def reference_backbone(kind: str, tmp):
    """One process, every sample run on its own (the definition of exact per-sample attention and Mamba)."""
    lm = build_backbone(kind, tmp)
    ids, labels, pos, sids = packed_row()
    logits = torch.zeros(1, ROW, VOCAB, dtype=torch.float64)
    for s, e in spans():
        logits[:, s:e] = lm(input_ids=ids[:, s:e], position_ids=pos[:, s:e], use_cache=False).logits
    loss, _ = language_model_loss(logits, labels, sids, reduction="square_averaged")
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", KINDS)
def test_cp2_backbone_logits_loss_and_grads_equal_one_process(cp_run, kind):
    tmp_path = cp_run
    logits, loss, grads = reference_backbone(kind, tmp_path)
    # float64 weights; Nemotron-H's head casts its logits to float32, so its loss and gradients carry float32 rounding
    atol = 1e-10 if kind == "llama" else 1e-6
    for rank in range(2):
        got = torch.load(tmp_path / f"{kind}{rank}.pt")
        real = got["src"] >= 0
        torch.testing.assert_close(got["logits"][0, real].double(), logits[0, got["src"][real]], rtol=0, atol=atol)
        torch.testing.assert_close(got["loss"].double(), loss.double(), rtol=0, atol=atol)
        assert got["grads"].keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(got["grads"][name], g, rtol=0, atol=atol, msg=name)


# ---- the Audex model: audio frames in a packed row, through the CP split -------------------------------------
SO_RUNS = ((0, 3, 5), (2, 2, 4))   # (sample, offset, frames): one clip inside rank 1's chunk, one split over both ranks


def build_audex(tmp):
    torch.manual_seed(0)
    model = AudexModel.from_config_file(str(config_path("model", "tiny.yaml")))
    state = tmp / "audex.pt"
    if state.exists():
        model.load_state_dict(torch.load(state))
    else:
        torch.save(model.state_dict(), state)
    return model.train()


def audex_row(model):
    ids, labels, pos, sids = packed_row()
    ids = ids + 10                                                                # clear of the special tokens
    ids[sids < 0] = model.tokenizer.pad_id
    g = torch.Generator().manual_seed(5)
    starts = [s for s, _ in spans()]
    audio = []
    for sample, offset, frames in SO_RUNS:
        at = starts[sample] + offset
        ids[0, at:at + frames] = model.tokenizer.so_embedding
        labels[0, at:at + frames] = IGNORE_INDEX
        audio.append(torch.randn(frames, model.backbone.config.hidden_size, generator=g).requires_grad_())
    labels = torch.where(labels == IGNORE_INDEX, labels, ids)
    return ids, labels, pos, sids, audio


def audex_worker(rank, world, tmp):
    model = build_audex(tmp)
    ids, labels, pos, sids, audio = audex_row(model)
    shard = shard_packed_batch(ids, labels, pos, sids, cp_size=world, cp_rank=rank, pad_id=model.tokenizer.pad_id,
                               group=dist.group.WORLD)
    with context_parallel(model.backbone):
        embeds = cp_inputs_embeds(model.embed_inputs, shard, audio)
        logits = model.backbone(inputs_embeds=embeds, position_ids=shard.position_ids, use_cache=False,
                                audex_cp=shard).logits
    share, loss = cp_square_averaged_loss(logits, shard)
    share.backward()
    grads = {n: p.grad for n, p in model.backbone.named_parameters() if p.grad is not None}
    grads |= {f"audio{i}": a.grad for i, a in enumerate(audio)}
    for g in grads.values():
        dist.all_reduce(g)
    torch.save({"src": shard.layout.source[0, shard.index[0]], "logits": logits.detach(), "loss": loss,
                "grads": grads}, tmp / f"audex{rank}.pt")


def test_cp2_audex_model_with_audio_frames_equals_one_process(cp_run):
    model = build_audex(cp_run)
    ids, labels, pos, sids, audio = audex_row(model)
    out = model(input_ids=ids, position_ids=pos, sample_ids=sids, audio_embeds=audio)
    loss, _ = language_model_loss(out.logits, labels, sids, reduction="square_averaged")
    loss.backward()
    grads = {n: p.grad for n, p in model.backbone.named_parameters() if p.grad is not None}
    grads |= {f"audio{i}": a.grad for i, a in enumerate(audio)}
    for rank in range(2):
        got = torch.load(cp_run / f"audex{rank}.pt")
        real = got["src"] >= 0
        torch.testing.assert_close(got["logits"][0, real], out.logits[0, got["src"][real]].detach(), rtol=0, atol=1e-5)
        assert abs(float(got["loss"]) - float(loss.detach())) <= 1e-6
        assert got["grads"].keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(got["grads"][name], g, rtol=0, atol=1e-6, msg=name)
