"""Engine ``hf`` on 2 gloo processes against one process on the same weights (issue 11, point 2 in part).

* TP=2 through transformers' own Llama plan (``DistributedConfig``), and TP=2 + SP through the written Llama SP
  plan: loss within 1e-5, gradients within 1e-6, and the weights after one SGD step (so that the ``Partial``
  gradients of the sequence-parallel norms are reduced where the optimizer uses them); SP also with the row given
  as ``inputs_embeds`` (AudexModel's way in, audio merged).
* FSDP2 (torch ``fully_shard``) over 2 data-parallel ranks, each with half the batch: loss and gradients equal
  one process on the whole batch.
* EP=2 on a tiny Nemotron-H (8 routed experts, 4 on each rank) through transformers' EP plan.
"""

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from parallel_workers import spawn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM

from audex import config_path
from audex.parallel.config import ParallelismConfig
from audex.parallel.hf_engine import distributed_config, fully_shard_backbone, load_tensor_parallel

VOCAB, BATCH, LENGTH = 96, 4, 12
EP2 = ParallelismConfig(world_size=2, tensor=2, expert=2, expert_tensor=1)


def make_nemotron_folder(tmp):
    cfg = OmegaConf.to_container(OmegaConf.load(config_path("model", "tiny_hybrid.yaml")).backbone.config)
    cfg.update(vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("nemotron_h", **cfg)).save_pretrained(tmp / "nemotron_h")


def make_folder(tmp):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               tie_word_embeddings=True)                  # tied, as the 2B backbone
    lm = AutoModelForCausalLM.from_config(cfg)
    lm.save_pretrained(tmp / "llama")
    return tmp / "llama"


def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def step(lm, ids, embeds: bool = False):
    """Loss (transformers' token mean; every position trainable, so halves weigh equally), gradients, and the
    weights after one SGD step. ``embeds``: the row goes in as ``inputs_embeds`` (as AudexModel sends it)."""
    lm.train()
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    inputs = {"inputs_embeds": lm.get_input_embeddings()(ids) * 1.5} if embeds else {"input_ids": ids}
    loss = lm(**inputs, position_ids=positions, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: full(p.grad).detach().clone() for n, p in lm.named_parameters()}
    torch.optim.SGD(lm.parameters(), lr=0.5).step()
    return loss.detach(), grads, {n: full(p).detach().clone() for n, p in lm.named_parameters()}


def hf_worker(rank, world, tmp):
    folder = tmp / "llama"
    for mode, sequence, embeds in (("tp", False, False), ("sp", True, False), ("sp_embeds", True, True)):
        tp = load_tensor_parallel(str(folder), ParallelismConfig(world_size=world, tensor=2, sequence=sequence),
                                  dtype=torch.float32)
        assert isinstance(tp.model.layers[0].self_attn.q_proj.weight, DTensor)             # really sharded
        assert ("audex_sp_gather" in tp.tp_plan.values()) == sequence
        torch.save(step(tp, batch(), embeds), tmp / f"{mode}{rank}.pt")
        if sequence and not embeds:
            with pytest.raises(ValueError, match="needs the whole row's position_ids"):
                tp(input_ids=batch())

    lm = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    fully_shard_backbone(lm, init_device_mesh("cpu", (world,)))
    half = batch().chunk(world)[rank]                                                      # disjoint halves
    loss, grads, weights = step(lm, half)
    dist.all_reduce(loss)
    torch.save((loss / world, grads, weights), tmp / f"fsdp{rank}.pt")

    ep = load_tensor_parallel(str(tmp / "nemotron_h"), EP2, dtype=torch.float32)
    experts = ep.model.layers[1].mixer.experts
    assert isinstance(experts.up_proj, DTensor) and experts.up_proj.to_local().shape[0] == 4     # 4 of 8 experts
    torch.save(step(ep, batch()), tmp / f"ep{rank}.pt")


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf2")
    make_folder(tmp)
    make_nemotron_folder(tmp)
    spawn(hf_worker, 2, tmp)
    ref = {}
    for name in ("llama", "nemotron_h"):
        lm = AutoModelForCausalLM.from_pretrained(str(tmp / name), local_files_only=True, dtype=torch.float32)
        ref[name] = step(lm, batch())
    lm = AutoModelForCausalLM.from_pretrained(str(tmp / "llama"), local_files_only=True, dtype=torch.float32)
    ref["llama_embeds"] = step(lm, batch(), embeds=True)
    return tmp, ref


@pytest.mark.parametrize("mode", ["tp", "sp", "sp_embeds", "fsdp", "ep"])
def test_two_processes_equal_one(hf_run, mode):
    tmp, ref = hf_run
    loss, grads, weights = ref[{"ep": "nemotron_h", "sp_embeds": "llama_embeds"}.get(mode, "llama")]
    for rank in range(2):
        got_loss, got_grads, got_weights = torch.load(tmp / f"{mode}{rank}.pt")
        assert abs(float(got_loss) - float(loss)) <= 1e-5
        assert got_grads.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(got_grads[name], g, rtol=0, atol=1e-6, msg=name)
            torch.testing.assert_close(got_weights[name], weights[name], rtol=0, atol=1e-6, msg=name)


def test_layouts_engine_hf_does_not_have_yet_are_refused():
    with pytest.raises(NotImplementedError, match="sequence=true has a written plan for \\['llama'\\]"):
        distributed_config(ParallelismConfig(tensor=2, sequence=True), model_type="nemotron_h")
    with pytest.raises(NotImplementedError, match="EP across data-parallel ranks"):
        distributed_config(ParallelismConfig(expert=2))
    assert distributed_config(EP2, model_type="nemotron_h").ep_size == 2
    assert distributed_config(ParallelismConfig(tensor=2)).tp_size == 2
    sp = distributed_config(ParallelismConfig(tensor=2, sequence=True), model_type="llama")
    assert sp.tp_plan["model.layers.*.self_attn.o_proj"] == "audex_rowwise_to_sequence"
