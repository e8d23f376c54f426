"""Engine ``megatron`` on CPU: megatron-core's GPTModel / MambaModel against transformers on the same weights.

HF -> Megatron logits within 1e-5 on packed rows; HF -> Megatron -> HF bit-exact (state dict and
``save_pretrained``); 2 gloo processes (TP=2, TP=2+SP, EP=2) equal to one process. The CPU shim for megatron-core's
CUDA-only helpers is in tests/parallel/megatron_cpu.py. Nemotron-H's Mamba layers need mamba_ssm's CUDA kernels
in megatron-core: those tests carry the ``gpu`` marker.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="engine megatron needs pip install 'audex[megatron]'")

from megatron_cpu import KINDS as CFGS  # noqa: E402
from megatron_cpu import (  # noqa: E402
    NO_AUX,
    SEGMENTS,
    layout_worker,
    megatron_state,
    one_process,
    run_step,
    tiny_hf,
    train_steps,
    train_worker,
)
from parallel_workers import spawn  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from audex import config_path  # noqa: E402
from audex.models.audex_model import AudexModel  # noqa: E402
from audex.modules.megatron_backbone import MegatronCausalLM  # noqa: E402
from audex.parallel.config import ParallelismConfig  # noqa: E402
from audex.parallel.megatron_convert import from_te_names, hf_to_megatron, megatron_to_hf, to_te_names  # noqa: E402
from audex.parallel.megatron_shard import _join, _split, tp_parts  # noqa: E402
from audex.parallel.megatron_specs import shard_dims  # noqa: E402
from audex.parallel.megatron_strategy import init_model_parallel  # noqa: E402

KINDS = ("llama", "nemotron_h")


def ids_batch() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process: both models converted, a step run, HF references computed per sample."""
    tmp = tmp_path_factory.mktemp("mc1")
    out = {}
    with one_process(tmp):
        for kind in KINDS:
            hf = tiny_hf(kind)
            lm = MegatronCausalLM(hf).eval()
            ids = ids_batch()
            refs = {(b, s, e): hf(input_ids=ids[b:b + 1, s:e]).logits[0].detach()
                    for b, row in enumerate(SEGMENTS) for s, e in row}
            state = lm.state_dict()
            folder = tmp / f"{kind}_hf"
            lm.save_pretrained(folder)
            out[kind] = dict(hf=hf, step=run_step(lm, ids), refs=refs, state=state, folder=folder,
                             local_params=sum(t.numel() for t in lm.mcore.parameters()))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_hf_to_megatron_logits_within_1e5(single, kind):
    got = single[kind]["step"]["logits"]
    for (b, s, e), ref in single[kind]["refs"].items():
        assert (got[b, s:e] - ref).abs().max().item() <= 1e-5, (kind, b, s, e)
    assert torch.count_nonzero(got[1, 9:]) == 0          # padding never enters the model: zero logits


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_to_hf_is_bit_exact(single, kind):
    ref = single[kind]["hf"].state_dict()
    state = single[kind]["state"]
    assert set(state) == set(ref)
    assert all(torch.equal(state[k], ref[k]) for k in ref)
    again = AutoModelForCausalLM.from_pretrained(single[kind]["folder"], local_files_only=True).state_dict()
    assert all(torch.equal(again[k], ref[k]) for k in ref)
    # and the pure conversion, both ways, without megatron-core
    back = megatron_to_hf(hf_to_megatron(ref, single[kind]["hf"].config), single[kind]["hf"].config)
    assert all(torch.equal(back[k], ref[k]) for k in ref)


def test_qkv_interleave_per_group():
    """Megatron's fused QKV rows are [q heads of group g, k_g, v_g] per KV group (4 heads, 2 groups, dim 16)."""
    cfg = tiny_hf("llama").config
    mc = hf_to_megatron(tiny_hf("llama").state_dict(), cfg)
    hf = tiny_hf("llama").state_dict()
    qkv = mc["decoder.layers.0.self_attention.linear_qkv.weight"]
    q, k, v = (hf[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(qkv[0:32], q[0:32]) and torch.equal(qkv[32:48], k[0:16]) and torch.equal(qkv[48:64], v[0:16])
    assert torch.equal(qkv[64:96], q[32:64]) and torch.equal(qkv[96:112], k[16:32])


LAYOUTS = [("llama", dict(tensor=2)), ("nemotron_h", dict(tensor=2)), ("nemotron_h", dict(expert=2))]


@pytest.mark.parametrize("kind,layout", LAYOUTS, ids=["llama-tp2", "moe-tp2", "moe-ep2"])
def test_two_processes_equal_one(single, tmp_path, kind, layout):
    torch.save(ids_batch(), tmp_path / "ids.pt")
    spawn(layout_worker, 2, tmp_path, kind, layout)
    one = single[kind]["step"]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert (got["logits"] - one["logits"]).abs().max().item() <= 1e-5
        assert abs(got["loss"].item() - one["loss"].item()) <= 1e-5
        assert (got["grad"] - one["grad"]).abs().max().item() <= 1e-6
        assert got["local_params"] < single[kind]["local_params"]   # each rank holds a shard, not a copy
    state, ref = torch.load(tmp_path / "rank0.pt", weights_only=False)["state"], single[kind]["hf"].state_dict()
    assert set(state) == set(ref) and all(torch.equal(state[k], ref[k]) for k in ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="megatron-core's Mamba mixer needs mamba_ssm/causal_conv1d "
                    "CUDA kernels; run in tests/gpu")
def test_nemotron_h_with_mamba_layers_matches_hf_on_gpu(tmp_path):
    cfg = AutoConfig.for_model("nemotron_h", **{**CFGS["nemotron_h"], "hybrid_override_pattern": "ME*E"})
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).cuda().eval()
    torch.distributed.init_process_group("nccl", init_method=f"file://{tmp_path}/rv", rank=0, world_size=1)
    try:
        with megatron_state():
            lm = MegatronCausalLM(hf).cuda().eval()
            ids = ids_batch().cuda()
            got = lm(input_ids=ids, audex_segments=SEGMENTS).logits
            for b, row in enumerate(SEGMENTS):
                for s, e in row:
                    ref = hf(input_ids=ids[b:b + 1, s:e]).logits[0]
                    assert (got[b, s:e] - ref).abs().max().item() <= 1e-3
            state = lm.state_dict()
            assert all(torch.equal(state[k].cpu(), v.cpu()) for k, v in hf.state_dict().items())
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def trained_one(tmp_path_factory):
    """Two training steps in one process on the whole batch (megatron DDP + finalize_model_grads + AdamW)."""
    tmp = tmp_path_factory.mktemp("mct")
    with one_process(tmp):
        return train_steps(MegatronCausalLM(tiny_hf("nemotron_h"), overrides=NO_AUX), ids_batch(), [0, 1])


def test_training_step_moves_weights_and_router_bias(trained_one):
    ref = tiny_hf("nemotron_h").state_dict()
    state = trained_one["state"]
    bias = "model.layers.1.mixer.gate.e_score_correction_bias"
    # the aux-loss-free update moves every expert's bias by +-rate per step (rate 1e-3, 2 steps)
    assert torch.allclose((state[bias] - ref[bias]).abs(), torch.full((8,), 2e-3), atol=1e-6)
    assert not torch.equal(state["model.layers.0.mixer.q_proj.weight"], ref["model.layers.0.mixer.q_proj.weight"])


def test_data_and_expert_parallel_training_equals_one_process(trained_one, tmp_path):
    """EP=2 with DP=2 (each rank its own row): megatron DDP's grad reduce, the expert grads and the router
    bias update from token counts all-reduced over DP give the one-process weights."""
    torch.save(ids_batch(), tmp_path / "ids.pt")
    spawn(train_worker, 2, tmp_path, "nemotron_h", dict(expert=2))
    got = torch.load(tmp_path / "trained.pt", weights_only=False)["state"]
    ref = trained_one["state"]
    assert set(got) == set(ref)
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert worst <= 1e-5, worst


def test_audex_model_same_interface_on_both_engines(tmp_path):
    """The tiny AudexModel with engine megatron: loads engine hf's state dict, gives its packed-row logits
    (audio-free prompt, three samples + padding) within 1e-5, and hands back the same state dict."""
    torch.manual_seed(0)
    hf_model = AudexModel.from_config_file(config_path("model", "tiny.yaml")).eval()
    sample_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 3 + [-1]])
    position_ids = torch.tensor([list(range(5)) + list(range(7)) + list(range(3)) + [0]])
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(5))
    want = hf_model(input_ids=ids, position_ids=position_ids, sample_ids=sample_ids).logits
    with one_process(tmp_path):
        mc_model = AudexModel.from_config_file(config_path("model", "tiny.yaml"), **{"backbone.engine": "megatron"})
        mc_model.load_state_dict(hf_model.state_dict())
        got = mc_model.eval()(input_ids=ids, position_ids=position_ids, sample_ids=sample_ids).logits
        state = mc_model.state_dict()
    assert (got[0, :15] - want[0, :15]).abs().max().item() <= 1e-5
    ref = hf_model.state_dict()
    assert set(state) == set(ref) and all(torch.equal(state[k], ref[k]) for k in ref)


def test_init_model_parallel_is_idempotent_and_checks_sizes(tmp_path):
    with one_process(tmp_path) as ps:
        init_model_parallel(ParallelismConfig())            # already initialised with these sizes: no-op
        assert ps.get_tensor_model_parallel_world_size() == 1
        with pytest.raises(ValueError, match=r"\(TP, CP, EP, PP\) = \(1, 1, 1, 1\)"):
            init_model_parallel(ParallelismConfig(tensor=2))


def test_nemotron_h_mamba_and_mlp_layers_convert_both_ways_and_shard_per_part():
    """The Mamba and dense-MLP layers' conversion on CPU (megatron-core's Mamba mixer itself needs CUDA): the
    round trip is bit-exact, Transformer Engine names map both ways, and a TP shard of ``in_proj`` is
    [z, x, B, C, dt] of that rank, each part split on its own."""
    cfg = AutoConfig.for_model("nemotron_h", **{**CFGS["nemotron_h"], "hybrid_override_pattern": "ME*-",
                                                 "intermediate_size": 48})
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).state_dict()
    mc = hf_to_megatron(hf, cfg)
    back = megatron_to_hf(mc, cfg)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    te = to_te_names(mc, fused_mlp_norm=True)
    assert "decoder.layers.0.mixer.in_proj.layer_norm_weight" in te           # Mamba norm fused into in_proj
    assert "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.3.mlp.linear_fc1.layer_norm_weight" in te           # dense MLP norm fused into fc1
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in te                   # MoE keeps its own norm
    assert "decoder.layers.1.mlp.experts.linear_fc1.weight7" in te             # grouped experts
    assert from_te_names(te).keys() == mc.keys()
    dims = shard_dims(cfg)                     # d_inner 128, B/C 2 groups x 16, 4 heads: 128+128+32+32+4 = 324
    name = "decoder.layers.0.mixer.in_proj.weight"
    whole = mc[name]
    shards = _split(whole, tp_parts(name, dims), 0, 2)
    z, x, b, c, dt = torch.split(whole, [128, 128, 32, 32, 4])
    assert torch.equal(shards[1], torch.cat([z[64:], x[64:], b[16:], c[16:], dt[2:]]))
    assert torch.equal(_join(shards, tp_parts(name, dims), 0), whole)
    conv = "decoder.layers.0.mixer.conv1d.weight"
    assert torch.equal(_join(_split(mc[conv], tp_parts(conv, dims), 0, 2), tp_parts(conv, dims), 0), mc[conv])
