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

from megatron_cpu import SEGMENTS, one_process, run_step, tiny_hf, layout_worker  # noqa: E402
from parallel_workers import spawn  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from audex.modules.megatron_backbone import MegatronCausalLM  # noqa: E402
from audex.parallel.megatron_convert import hf_to_megatron, megatron_to_hf  # noqa: E402

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
    from transformers import AutoConfig

    from megatron_cpu import KINDS as CFGS, megatron_state

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
