"""A training stage through Lightning on 2 CPU processes (gloo) against one process (issue 11, points 2, 5-7, 9).

The same stage (tiny model, 4 optimizer steps of 2 packed rows, AdamW, clipping at norm 1) runs

* in one process (the reference),
* with ``parallelism.tensor=2`` (transformers' Llama TP plan on ``AudexParallelStrategy``'s mesh): both ranks
  read the same rows and every micro-batch's loss equals the reference; the ``.nemo`` written from the
  gathered shards restores in one process with weights bit-equal to the sharded checkpoint (torch DCP) of
  the same step;
* killed at micro-batch 5 and restarted: it resumes from the step-2 distributed checkpoint and its losses equal
  the uninterrupted run's;
* with ``parallelism.context=2``: rows split TE-THD style over the ranks, losses equal the reference;
* with ``parallelism.fsdp=2`` (2 data-parallel ranks): the ranks read disjoint rows, the run trains and its
  ``.nemo`` restores;
* from ``model.init_from``: rank 1 builds its backbone on the meta device (``parallelism.meta_init``, on in every
  2-process run here) and its shards receive rank 0's weights, so the first losses equal one process's.

Each 2-process run is ``python tests/parallel/lightning_run.py`` with ``trainer.devices=2``; Lightning starts the
second process itself.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning_run import Recorder
from small_manifests import write_small_manifests
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from audex.models.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("lightning_run.py")
STEPS, MICRO = 4, 8           # optimizer steps; micro-batches (global batch 2 = 2 micro-batches of 1 row)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    # 40 text chats, 6 ASR clips (0.6-0.85 s tones), 10 TTS targets: a few packed rows of 512 tokens
    return write_small_manifests(tmp_path_factory.mktemp("lp_data"), n_asr=6, varied_answers=True)


def overrides(manifests, exp_dir, *extra, trainable="[adapter,llm]"):
    """stage2 shortened: 4 steps, no validation or gate, a checkpoint every 2 steps, the adapter trains too."""
    return ["model=tiny", "data=demo", "trainer=cpu", f"data.manifest_dir={manifests}", "~data.validation_ds",
            "data.max_length=512", "data.global_batch_size=2", "data.blend_epochs.understanding=0",
            "data.blend_epochs.tta=0", "data.blend_epochs.asr_ast=1", "data.blend_epochs.text=1",
            "data.blend_epochs.tts=1", f"trainer.max_steps={STEPS}", "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false", f"model.stage.trainable={trainable}", "model.optim.lr=1e-3",
            "model.optim.sched.min_lr=1e-4", "model.text_gate.enabled=false", f"exp_manager.exp_dir={exp_dir}",
            "exp_manager.create_tensorboard_logger=false", "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
            *extra]


def run2(out: Path, args: list[str], crash_at: int | None = None, stage: str = "stage2",
         devices: int = 2) -> subprocess.CompletedProcess:
    """The runner on ``devices`` gloo processes (Lightning starts all but the first); asserts success unless
    ``crash_at`` is given."""
    cmd = [sys.executable, str(RUNNER), str(out)] + (["--crash-at", str(crash_at)] if crash_at is not None else [])
    cmd += ["--stage", stage]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd + args + [f"trainer.devices={devices}"], cwd=out.parent, env=env, capture_output=True,
                          text=True, timeout=900)
    if crash_at is None:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def losses(out: Path, rank: int = 0) -> dict[int, dict]:
    return {int(k): v for k, v in json.loads((out / f"losses_rank{rank}.json").read_text()).items()}


def sharding(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"sharding_rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def reference(manifests, tmp_path_factory):
    from audex.training.run import train_stage

    tmp = tmp_path_factory.mktemp("lp_ref")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="stage2", overrides=overrides(manifests, tmp / "runs"))
    recorder = Recorder(tmp, None)
    nemo = train_stage(cfg, callbacks=[recorder])
    return {"losses": losses(tmp), "nemo": nemo}


@pytest.fixture(scope="module")
def tp2(manifests, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lp_tp2")
    run2(tmp / "out", overrides(manifests, tmp / "runs", "parallelism.tensor=2"))
    return tmp


def test_tp2_stage_losses_equal_one_process(reference, tp2):
    ref, got = reference["losses"], losses(tp2 / "out")
    assert sorted(ref) == sorted(got) == list(range(MICRO))
    peer = losses(tp2 / "out", rank=1)
    vocab = load_model(str(reference["nemo"])).vocab.size
    assert sharding(tp2 / "out")["head_rows"] == sharding(tp2 / "out", 1)["head_rows"] == vocab // 2   # vocab-split head
    # parallelism.meta_init: rank 1 built its backbone on the meta device, rank 0's weights filled its shards
    assert not sharding(tp2 / "out")["built_on_meta"] and sharding(tp2 / "out", 1)["built_on_meta"]
    for i in range(MICRO):
        assert got[i]["batch"] == peer[i]["batch"] == ref[i]["batch"]      # TP peers read the rows one process reads
        assert got[i]["loss"] == peer[i]["loss"]
        assert abs(got[i]["loss"] - ref[i]["loss"]) <= 1e-4, (i, got[i]["loss"], ref[i]["loss"])
    assert abs(got[0]["loss"] - ref[0]["loss"]) <= 1e-5                  # before any update: TP arithmetic only
    assert got[MICRO - 1]["loss"] < got[0]["loss"] - 0.05                  # and it learns


def test_tp2_nemo_restores_bit_exact_in_one_process(reference, tp2):
    nemo = tp2 / "runs" / "stage2" / "stage2.nemo"
    ckpt = next((tp2 / "runs" / "stage2" / "checkpoints").glob(f"*step={STEPS}*"))
    assert ckpt.is_dir() and sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    dcp_to_torch_save(ckpt, tp2 / "full.pt")                       # the sharded checkpoint, merged by torch
    sharded = torch.load(tp2 / "full.pt", weights_only=False)["state_dict"]
    model = load_model(str(nemo))
    state = model.state_dict()
    trained = [k for k in state if k.startswith(("llm.", "adapter."))]
    assert len(trained) > 20
    for key in trained:
        assert torch.equal(state[key], sharded[key]), key
    ref = load_model(str(reference["nemo"])).state_dict()
    worst = max(float((state[k] - ref[k]).abs().max()) for k in trained)
    assert worst <= 1e-4                                              # one process trains to the same weights


def test_meta_init_rank1_gets_init_from_weights_from_rank0(manifests, reference, tmp_path):
    """``model.init_from`` (the previous stage's ``.nemo``) is read by rank 0 alone; rank 1 built its backbone on
    the meta device and receives the weights by broadcast: each micro-batch loss before the first update equals
    one process started from the same file."""
    from audex.training.run import train_stage

    start = f"model.init_from={reference['nemo']}"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="stage2", overrides=overrides(manifests, tmp_path / "one", start))
    (tmp_path / "one_out").mkdir()
    train_stage(cfg, callbacks=[Recorder(tmp_path / "one_out", None)])
    run2(tmp_path / "out", overrides(manifests, tmp_path / "runs", start, "parallelism.tensor=2"))
    one, got = losses(tmp_path / "one_out"), losses(tmp_path / "out")
    assert sharding(tmp_path / "out", 1)["built_on_meta"]
    assert abs(one[0]["loss"] - reference["losses"][0]["loss"]) > 1e-3       # a trained start, not the random one
    for i in (0, 1):                                                        # micro-batches of the first step
        assert got[i]["batch"] == one[i]["batch"]
        assert abs(got[i]["loss"] - one[i]["loss"]) <= 1e-5, (i, got[i]["loss"], one[i]["loss"])


def test_killed_tp2_run_resumes_with_identical_losses(manifests, tp2, tmp_path):
    args = overrides(manifests, tmp_path / "runs", "parallelism.tensor=2")
    crashed = run2(tmp_path / "out", args, crash_at=5)
    assert crashed.returncode != 0 and "simulated crash at micro-batch 5" in crashed.stderr + crashed.stdout
    assert next((tmp_path / "runs" / "stage2" / "checkpoints").glob("*step=2*")).is_dir()
    run2(tmp_path / "out", args)
    resumed, uninterrupted = losses(tmp_path / "out"), losses(tp2 / "out")
    assert sorted(resumed) == list(range(4, MICRO))                 # the restart trains batches 4..7 (steps 3, 4)
    for i in range(4, MICRO):
        assert resumed[i]["batch"] == uninterrupted[i]["batch"]
        assert abs(resumed[i]["loss"] - uninterrupted[i]["loss"]) <= 1e-6, (i, resumed[i], uninterrupted[i])


def test_cp2_stage_losses_equal_one_process(manifests, reference, tmp_path):
    run2(tmp_path / "out", overrides(manifests, tmp_path / "runs", "parallelism.context=2"))
    ref, got, peer = reference["losses"], losses(tmp_path / "out"), losses(tmp_path / "out", rank=1)
    for i in range(MICRO):
        assert got[i]["loss"] == peer[i]["loss"]                       # the whole row's eq. (2), equal on both
        assert abs(got[i]["loss"] - ref[i]["loss"]) <= 1e-4, (i, got[i]["loss"], ref[i]["loss"])
    assert abs(got[0]["loss"] - ref[0]["loss"]) <= 1e-5


def test_fsdp2_data_parallel_ranks_read_disjoint_rows_and_restore(manifests, tmp_path):
    run2(tmp_path / "out", overrides(manifests, tmp_path / "runs", "parallelism.fsdp=2"))
    r0, r1 = losses(tmp_path / "out"), losses(tmp_path / "out", rank=1)
    assert sharding(tmp_path / "out")["dtensors"] > 20                     # the backbone's weights are FSDP shards
    assert sorted(r0) == sorted(r1) == list(range(STEPS))           # 2 ranks x 1 row: no accumulation
    assert all(r0[i]["batch"] != r1[i]["batch"] for i in range(STEPS))
    assert all(math.isfinite(r["loss"]) for r in (*r0.values(), *r1.values()))
    model = load_model(str(tmp_path / "runs" / "stage2" / "stage2.nemo"))
    assert sum(p.numel() for p in model.llm.parameters()) > 0 and not any(
        type(p).__name__ == "DTensor" for p in model.parameters())


def test_stage1_text_rows_stay_bit_identical_on_fsdp_shards(manifests, tmp_path):
    """Stage 1 trains the adapter and the audio rows only: the row mask, cut to each rank's FSDP row shard, keeps
    every text row of the embedding and the head bit-identical, while the audio rows move."""
    from lightning.pytorch import seed_everything

    from audex.training.run import build_model

    rows = "[adapter,audio_token_rows]"
    run2(tmp_path / "out", overrides(manifests, tmp_path / "runs", "parallelism.fsdp=2", "model.optim.weight_decay=0.05",
                                     trainable=rows), stage="stage1")     # decay on the trainable rows only
    trained = load_model(str(tmp_path / "runs" / "stage1" / "stage1.nemo")).state_dict()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="stage1", overrides=overrides(manifests, tmp_path / "x", trainable=rows))
    seed_everything(int(cfg.seed))
    initial, _ = build_model(cfg)                                        # the weights the run started from
    text = initial.vocab.text_vocab_size
    for key in ("llm.lm.model.embed_tokens.weight", "llm.lm.lm_head.weight"):
        before, after = initial.state_dict()[key], trained[key]
        assert torch.equal(after[:text], before[:text]), key
        assert not torch.equal(after[text:], before[text:]), key
    assert torch.equal(trained["llm.lm.model.layers.0.mlp.up_proj.weight"],
                       initial.state_dict()["llm.lm.model.layers.0.mlp.up_proj.weight"])


def test_tp2_with_tied_embeddings_equals_one_process(manifests, tmp_path):
    """The 2B backbone ties its head to its embedding. transformers' plan names both (``lm_head.weight`` beside
    ``model.embed_tokens.weight``) for one tensor, which ``apply_tensor_parallelism`` could not shard (``KeyError:
    'lm_head.weight'``; :func:`audex.parallel.hf_engine.apply_tensor_plan`). With TP=2 the shared table is split
    once, stays shared while training, and 2 steps give one process's losses; the ``.nemo`` keeps the tie."""
    from audex.training.run import train_stage

    tied = ["model.backbone.config.tie_word_embeddings=true", "trainer.max_steps=2"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="stage2", overrides=overrides(manifests, tmp_path / "one", *tied))
    train_stage(cfg, callbacks=[Recorder(tmp_path, None)])
    run2(tmp_path / "out", overrides(manifests, tmp_path / "runs", *tied, "parallelism.tensor=2"))
    ref, got = losses(tmp_path), losses(tmp_path / "out")
    assert sorted(ref) == sorted(got) == [0, 1, 2, 3]
    assert all(got[i]["batch"] == ref[i]["batch"] and abs(got[i]["loss"] - ref[i]["loss"]) <= 1e-4 for i in ref), \
        (got, ref)
    lm = load_model(str(tmp_path / "runs" / "stage2" / "stage2.nemo")).llm.lm
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
