"""``audex-train``'s checks of the ``parallelism:`` block against the launch, the model and the data, and the
arithmetic that follows from it (data-parallel rank, gradient accumulation) -- no processes started."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from audex.parallel.config import ParallelismConfig, ParallelismError
from audex.parallel.strategy import data_parallel_rank, needs_model_parallel
from audex.training.megatron_run import start_parallel_state
from audex.training.run import gradient_accumulation, launch_layout, run_parallelism

ROOT = Path(__file__).resolve().parents[2]


def stage_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="stage2", overrides=["model=tiny", "data=demo", "trainer=cpu", *overrides])


def test_stage_configs_carry_the_parallelism_group():
    cfg = stage_cfg()
    assert ParallelismConfig.from_dict(cfg.parallelism).is_trivial


def test_layout_follows_the_launch(tiny_model):
    p = run_parallelism(stage_cfg("trainer.devices=2", "parallelism.tensor=2"), tiny_model)
    assert (p.world_size, p.tensor, p.data) == (2, 2, 1) and needs_model_parallel(p)
    p = run_parallelism(stage_cfg("trainer.devices=4", "trainer.num_nodes=2", "parallelism.context=2",
                                  "parallelism.fsdp=4"), tiny_model)
    assert (p.world_size, p.data, p.fsdp) == (8, 4, 4)
    assert not needs_model_parallel(run_parallelism(stage_cfg("trainer.devices=2"), tiny_model))   # plain DDP


@pytest.mark.parametrize("overrides, message", [
    (("trainer.devices=2", "parallelism.world_size=4"), "parallelism.world_size=4 but trainer.devices x trainer.num_nodes = 2"),
    (("trainer.devices=2", "parallelism.tensor=4"), r"world_size 2 is not divisible by tensor x context x pipeline"),
    (("trainer.devices=3", "parallelism.tensor=3"), "parallelism.tensor=3 must divide the 4 attention heads"),
    (("trainer.devices=2", "parallelism.expert=2"), "no routed experts"),
    (("trainer.devices=2", "parallelism.pipeline=2"), "engine hf has no pipeline parallelism"),
    (("trainer.devices=2", "parallelism.context=2", "data.packing.enabled=false"), "data.packing.enabled is false"),
    (("trainer.devices=2", "parallelism.context=2", "data.max_length=4098"), "data.max_length=4098 must be a multiple of 4"),
    (("trainer.devices=2", "parallelism.tp=2"), r"unknown parallelism keys \['tp'\]"),
])
def test_impossible_layouts_stop_with_the_key_named(tiny_model, overrides, message):
    overrides = [o if not o.startswith("parallelism.tp") else "+" + o for o in overrides]
    with pytest.raises(ParallelismError, match=message):
        run_parallelism(stage_cfg(*overrides), tiny_model)


def test_data_parallel_rank_and_accumulation_count_data_ranks_only():
    p = ParallelismConfig(world_size=16, tensor=2, context=2)                 # DP 4; ranks 0-3 are one DP rank
    assert [data_parallel_rank(r, p) for r in range(16)] == [r // 4 for r in range(16)]
    # Table 3's global batch of 16 rows, one row per micro-batch: 4 data-parallel ranks -> 4 micro-batches
    assert gradient_accumulation(16, micro_rows=1, devices=8, nodes=2, model_parallel=4) == 4
    assert gradient_accumulation(16, micro_rows=1, devices=2, nodes=1, model_parallel=2) == 16   # TP 2: one DP rank
    with pytest.raises(ValueError, match=r"/ \(tensor x context = 4\)"):
        gradient_accumulation(6, micro_rows=1, devices=16, nodes=1, model_parallel=4)


@pytest.mark.parametrize("overrides, message", [
    (("parallelism.pipeline=2",), "engine megatron runs the whole backbone in every process"),
    (("parallelism.context=2",), "engine megatron's backbone does not cut packed rows"),
    (("parallelism.fsdp=2",), "parallelism.fsdp > 1 is engine hf's FSDP2"),
])
def test_engine_megatron_layouts_refused_with_its_own_wording(overrides, message):
    with pytest.raises(ParallelismError, match=message):
        launch_layout(stage_cfg("model.backbone.engine=megatron", "trainer.devices=2", *overrides))


def test_engine_megatron_needs_torchrun_for_more_than_one_process(monkeypatch):
    """Lightning's launcher would start rank 1 only at trainer.fit, after rank 0 built its TP shard: refused
    before anything is built, naming the torchrun command."""
    for var in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = stage_cfg("model.backbone.engine=megatron", "trainer.devices=2", "parallelism.tensor=2")
    with pytest.raises(ParallelismError, match=r"launch with torchrun, e\.g\. `python -m torch\.distributed\.run "
                                               r"--nproc_per_node 2 examples/audex_train\.py"):
        start_parallel_state(cfg, launch_layout(cfg))


def test_megatron_strategy_refuses_a_checkpoint_that_is_not_sharded(tmp_path):
    """Engine megatron resumes from its sharded checkpoints only (tests/parallel/test_megatron_lightning.py): a
    single-file Lightning ``.ckpt`` (as written before, with the gathered weights and rank 0's optimizer state
    only) is refused by name, not half-loaded."""
    pytest.importorskip("megatron.core")
    from audex.parallel.megatron_checkpoint import load_sharded

    old = tmp_path / "epoch=0-step=2.ckpt"
    torch.save({"state_dict": {}, "optimizer_states": [{}]}, old)
    with pytest.raises(FileNotFoundError, match="is not a sharded engine-megatron checkpoint"):
        load_sharded(None, [], old)
