"""The ``parallelism:`` block and the layout planner (issue 11, points 1 and 8) with the paper's numbers.

Section 4.5: 512 H100s, TP4 · EP32 · CP8 · SP, 262,144-token packed rows; the 30B-A3B has 32 attention heads,
2 KV heads, 64 Mamba heads in 8 groups, 128 routed experts (top-6), and the vocabulary is padded to 205,312.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from audex import config_path
from audex.modules.backbone import AudexBackbone
from audex.parallel.config import ModelDims, ParallelismConfig, ParallelismError, check_engine
from audex.parallel.planner import format_plan, plan_layout

ROOT = Path(__file__).resolve().parents[2]
PAPER = dict(world_size=512, tensor=4, sequence=True, context=8, expert=32)
DIMS_30B = ModelDims(num_attention_heads=32, num_key_value_heads=2, vocab_size=205312, hidden_size=2688,
                     num_layers=52, mamba_num_heads=64, mamba_groups=8, num_experts=128, experts_per_token=6)


def load(name: str) -> ParallelismConfig:
    return ParallelismConfig.from_dict(OmegaConf.load(config_path("parallelism", f"{name}.yaml")))


def test_paper_yaml_is_the_papers_layout():
    p = load("paper")
    assert p == ParallelismConfig(**PAPER, data=16)
    assert (p.data, p.expert_tensor_size, p.expert_data) == (16, 4, 4)        # 512 / (4*8); 512 / (4*32)
    assert p.sample_pad_multiple == 64                                         # 2 x CP 8 x TP 4
    p.check_model(DIMS_30B)
    p.check_data(packing=True, max_length=262144)
    assert load("none").is_trivial and load("none").sample_pad_multiple == 1


@pytest.mark.parametrize("sizes, message", [
    (dict(world_size=500, tensor=4, context=8), "500 is not divisible by tensor x context x pipeline"),
    (dict(tensor=1, sequence=True), "sequence=true needs parallelism.tensor > 1"),
    (dict(world_size=512, tensor=4, context=8, data=8), "data=8 but world_size 512"),
    (dict(world_size=64, expert=128, tensor=1), "expert_tensor x expert x pipeline"),
    (dict(world_size=8, fsdp=3), "fsdp=3 must divide the data-parallel size 8"),
    (dict(tensor=0), "tensor=0 must be an integer >= 1"),
])
def test_impossible_sizes_are_refused_with_the_key(sizes, message):
    with pytest.raises(ParallelismError, match=message):
        ParallelismConfig(**sizes)


def test_unknown_key_is_an_error_not_ignored():
    with pytest.raises(ParallelismError, match=r"unknown parallelism keys \['tensor_parallel'\]"):
        ParallelismConfig.from_dict({"tensor_parallel": 2})


@pytest.mark.parametrize("sizes, dims, message", [
    (dict(tensor=3), DIMS_30B, "tensor=3 must divide the 32 attention heads"),
    (dict(tensor=16), DIMS_30B, "must divide the 8 Mamba groups"),
    (dict(tensor=4), ModelDims(8, 3, 1024, 64, 2), "multiple of the 3 KV heads"),
    (dict(tensor=4), ModelDims(8, 6, 1024, 64, 2), "must divide the 6 KV heads"),
    (dict(tensor=4), ModelDims(8, 8, 1026, 64, 2), "vocabulary of 1026 rows"),
    (dict(expert=256), DIMS_30B, "expert=256 is larger than the 128 routed experts"),
    (dict(expert=48), DIMS_30B, "expert=48 must divide the 128 routed experts"),
    (dict(expert=2), ModelDims(16, 4, 205312, 2048, 28), "no routed experts"),
    (dict(pipeline=5), DIMS_30B, "pipeline=5 must divide the 52 layers"),
])
def test_layouts_the_model_cannot_be_split_by(sizes, dims, message):
    with pytest.raises(ParallelismError, match=message):
        ParallelismConfig(**sizes).check_model(dims)


def test_kv_heads_fewer_than_tp_are_replicated_not_refused():
    ParallelismConfig(tensor=8).check_model(DIMS_30B)                         # 2 KV heads, each on 4 ranks


def test_context_parallelism_needs_packed_rows():
    p = ParallelismConfig(**PAPER)
    with pytest.raises(ParallelismError, match="data.packing.enabled is false"):
        p.check_data(packing=False, max_length=262144)
    with pytest.raises(ParallelismError, match="max_length=262100 must be a multiple of 64"):
        p.check_data(packing=True, max_length=262100)


def test_engine_switch():
    assert check_engine("hf") == "hf"
    # engine megatron builds megatron-core's model only inside an initialised model parallel state
    with pytest.raises((RuntimeError, ImportError), match="model parallel state|audex\\[megatron\\]"):
        AudexBackbone(model_type="llama", engine="megatron",
                      config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=64))
    with pytest.raises(ParallelismError, match="use one of"):
        check_engine("deepspeed")
    for name in ("audex_2b", "audex_30b_a3b", "tiny", "tiny_hybrid"):
        assert OmegaConf.load(config_path("model", f"{name}.yaml")).backbone.engine == "hf"


@pytest.fixture(scope="module")
def plan_30b():
    model = OmegaConf.load(config_path("model", "audex_30b_a3b.yaml"))
    return plan_layout(model, load("paper"), packing=True, max_length=262144, model_name="audex_30b_a3b")


def test_planner_prints_the_papers_layout_for_the_30b(plan_30b):
    plan = plan_30b
    assert plan.tokens_per_rank == 32768 and plan.max_length == 262144
    assert (plan.attention_heads_per_rank, plan.kv_head_replicas, plan.kv_heads_per_rank) == (8, 2, 1)
    assert (plan.mamba_heads_per_rank, plan.mamba_groups_per_rank) == (16, 2)
    assert plan.experts_per_rank == 4 and plan.vocab_rows_per_rank == 51328
    m = plan.memory_gib
    assert m["weights"] == pytest.approx(2 * plan.params_per_rank / 1024 ** 3)
    assert m["grads"] == pytest.approx(4 * plan.trainable_params_per_rank / 1024 ** 3)
    assert 0 < m["activations_recompute"] < m["activations"] and m["total_recompute"] < m["total"]
    text = format_plan(plan)
    for line in ("world 512 = TP 4 x CP 8 x PP 1 x DP 16 (+ sequence parallel)",
                 "tokens: 32,768 of 262,144 per packed row on each CP rank",
                 "every packed sample padded to a multiple of 64 (2 x CP 8 x TP 4)",
                 "2 KV heads -> each replicated on 2 TP ranks", "mamba: 64 heads -> 16 per TP rank",
                 "experts: 128 routed (top-6) -> 4 per rank at EP 32"):
        assert line in text


def test_planner_activations_scale_with_tokens_per_rank(plan_30b):
    model = OmegaConf.load(config_path("model", "audex_30b_a3b.yaml"))
    cp16 = plan_layout(model, ParallelismConfig(**{**PAPER, "context": 16}), max_length=262144)
    assert cp16.parallelism.data == 8 and cp16.tokens_per_rank == 16384
    for key in ("activations", "activations_recompute"):
        assert cp16.memory_gib[key] == pytest.approx(plan_30b.memory_gib[key] / 2)
    assert cp16.memory_gib["weights"] == pytest.approx(plan_30b.memory_gib["weights"])


def test_planner_for_the_dense_2b_and_its_refusal():
    model = OmegaConf.load(config_path("model", "audex_2b.yaml"))
    with pytest.raises(ParallelismError, match="no routed experts"):
        plan_layout(model, load("paper"))
    plan = plan_layout(model, ParallelismConfig(**{**PAPER, "expert": 1}))
    assert (plan.attention_heads_per_rank, plan.kv_head_replicas, plan.experts_per_rank) == (4, 1, 0)
    assert "4 KV heads -> 1 per TP rank" in format_plan(plan)
    with pytest.raises(ParallelismError, match="data.packing.enabled is false"):
        plan_layout(model, ParallelismConfig(**{**PAPER, "expert": 1}), packing=False)


@pytest.mark.slow
def test_plan_parallelism_script(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "audex_plan_parallelism.py"), "model=audex_30b_a3b", "parallelism=paper"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "world 512 = TP 4 x CP 8 x PP 1 x DP 16" in out.stdout
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert (last["parallelism"]["data"], last["experts_per_rank"], last["tokens_per_rank"]) == (16, 4, 32768)
    assert list(tmp_path.iterdir()) == []                                      # a dry run writes nothing
    bad = subprocess.run(cmd + ["parallelism.expert=256", "parallelism.expert_tensor=1"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert bad.returncode == 2 and "expert=256 is larger than the 128 routed experts" in bad.stderr
