"""Engine hf, split run with ``model.backbone.pretrained_path``: every rank, rank 0 included, builds the backbone on
the meta device and reads only its own shards from the folder's safetensors files (torch's
``HuggingFaceStorageReader`` + ``dcp.load``, :mod:`audex.parallel.sharded_read`; issue 11, point 2).

The folder is a tiny Llama (conf/model/tiny.yaml's backbone) written by ``save_pretrained`` in bfloat16 and
trained in float32 (``model.backbone.dtype``): the read casts as ``from_pretrained`` does, and the vocabulary
grows from the checkpoint's 512 rows to Audex's (new rows drawn as one process draws them). Two processes
(Lightning, gloo) with FSDP2=2 and with TP=2 against one process, first optimizer step only:

* every rank built its backbone on meta and read it from the files (``read_report``), rank 0 included;
* the whole model gathered from the shards at the start of training equals the one-process model bit for bit
  (dtype included), and so do the rotary ``inv_freq`` buffers (recomputed, not broadcast);
* the first micro-batch losses equal one process's within 1e-5.

And in one process (no ranks): which folders are refused (``.bin`` only, keys transformers would rename) and
that a refused folder makes rank 0 load the whole model (the broadcast path) and the others stay on meta.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning_run import Recorder
from omegaconf import OmegaConf
from safetensors.torch import load_file
from sharded_read_run import LoadedState
from small_manifests import write_small_manifests
from transformers import AutoConfig, AutoModelForCausalLM, LlamaModel

from audex.modules.backbone import AudexBackbone, backbone_on_meta, extend_vocabulary
from audex.parallel.sharded_read import new_vocabulary_rows, sharded_read_refusal

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("sharded_read_run.py")


def save_bin(folder: Path) -> None:
    """A checkpoint of ``.bin`` files only (transformers 5 writes safetensors whatever it is asked)."""
    tiny_llama().save_pretrained(folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def tiny_llama(dtype=torch.bfloat16, **changes):
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml").backbone.config)
    torch.manual_seed(7)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **{**cfg, **changes}), dtype=dtype)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sr_backbone") / "llama"
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    return write_small_manifests(tmp_path_factory.mktemp("sr_data"), n_asr=6, varied_answers=True)


def overrides(manifests, folder, exp_dir, *extra):
    """stage2, one optimizer step of 2 rows, the backbone from ``folder`` (bfloat16 on disk, float32 in training)."""
    return ["model=tiny", "data=demo", "trainer=cpu", f"data.manifest_dir={manifests}", "~data.validation_ds",
            "data.max_length=512", "data.global_batch_size=2", "data.blend_epochs.understanding=0",
            "data.blend_epochs.tta=0", "data.blend_epochs.asr_ast=1", "data.blend_epochs.text=1",
            "data.blend_epochs.tts=1", "trainer.max_steps=1", "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false", "model.stage.trainable=[adapter,llm]", "model.text_gate.enabled=false",
            f"model.backbone.pretrained_path={folder}", "+model.backbone.dtype=float32",
            f"exp_manager.exp_dir={exp_dir}", "exp_manager.create_tensorboard_logger=false", *extra]


def read(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


@pytest.fixture(scope="module")
def one_process(manifests, folder, tmp_path_factory):
    from audex.training.run import train_stage

    out = tmp_path_factory.mktemp("sr_one")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="stage2", overrides=overrides(manifests, folder, out / "runs"))
    train_stage(cfg, callbacks=[Recorder(out, None), LoadedState(out, stop=False)])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallelism.fsdp=2", "parallelism.tensor=2"])
def test_every_rank_reads_its_shards_and_equals_one_process(layout, manifests, folder, one_process, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(RUNNER), str(out), *overrides(manifests, folder, tmp_path / "runs"),
                           layout, "trainer.devices=2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for rank in (0, 1):                 # (a) no rank held the whole backbone: rank 0 built it on meta too
        loaded = read(out, f"loaded_rank{rank}.json")
        assert loaded["built_on_meta"], rank
        assert loaded["read_report"]["source"] == "safetensors" and loaded["read_report"]["on_meta_before_read"]
        assert loaded["read_report"]["new_rows_drawn"]           # 512 checkpoint rows -> the Audex vocabulary
    assert not read(one_process, "loaded_rank0.json")["built_on_meta"]
    ref, got = torch.load(one_process / "full.pt"), torch.load(out / "full.pt")
    assert sorted(got["state"]) == sorted(ref["state"])
    assert any(k.startswith("llm.") for k in ref["state"]) and any(k.startswith("adapter.") for k in ref["state"])
    for key, value in ref["state"].items():                     # (b) bit for bit, dtype included
        assert got["state"][key].dtype == value.dtype == torch.float32 or not value.is_floating_point(), key
        assert torch.equal(got["state"][key], value), key
    assert sorted(got["buffers"]) == sorted(ref["buffers"]) and len(ref["buffers"]) >= 2
    for key, value in ref["buffers"].items():
        assert got["buffers"][key].dtype == value.dtype and torch.equal(got["buffers"][key], value), key
    one = {int(k): v for k, v in read(one_process, "losses_rank0.json").items()}
    model = initial_model(manifests, folder, ref["state"])
    for rank in (0, 1):                 # (c) the first micro-batch's loss: FSDP ranks read rows of their own
        got_loss = read(out, "losses_rank%d.json" % rank)["0"]
        with torch.no_grad():
            loss, stats = model.compute_loss(torch.load(out / f"batch_rank{rank}.pt", weights_only=False))
        assert abs(got_loss["loss"] - float(stats.get("loss", loss))) <= 1e-5, (rank, got_loss, float(loss))
        if layout == "parallelism.tensor=2":                  # TP peers read the rows one process reads
            assert got_loss["batch"] == one[0]["batch"] and abs(got_loss["loss"] - one[0]["loss"]) <= 1e-5


def initial_model(manifests, folder, state):
    """One process's model of the stage with the weights ``state`` (the one-process run's, before training)."""
    from lightning.pytorch import seed_everything

    from audex.training.run import build_model

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="stage2", overrides=overrides(manifests, folder, "unused"))
    seed_everything(int(cfg.seed))
    model, _ = build_model(cfg)
    model.load_state_dict(state)
    return model.train()


def test_refusals(tmp_path):
    """Folders whose weights the sharded read cannot reproduce are refused (and say why); a good one is not."""
    good, bins, base = tmp_path / "good", tmp_path / "bin", tmp_path / "base"
    tiny_llama().save_pretrained(good)
    save_bin(bins)
    LlamaModel(tiny_llama().config).save_pretrained(base)        # keys without "model.": transformers renames
    with backbone_on_meta():
        meta = AudexBackbone(pretrained_path=str(good)).lm
    assert sharded_read_refusal(meta, good) is None
    assert ".bin" in sharded_read_refusal(meta, bins)
    assert "not a key of the checkpoint" in sharded_read_refusal(meta, base)


def test_refused_folder_rank0_loads_whole_others_stay_on_meta(tmp_path):
    bins = tmp_path / "bin"
    save_bin(bins)
    one = AudexBackbone(pretrained_path=str(bins), vocab_size=1024)
    with backbone_on_meta(read_shards=True, rank0=True):
        rank0 = AudexBackbone(pretrained_path=str(bins), vocab_size=1024)
    with backbone_on_meta(read_shards=True, rank0=False):
        other = AudexBackbone(pretrained_path=str(bins), vocab_size=1024)
    assert rank0.sharded_source is None and not rank0.on_meta
    assert all(torch.equal(a, b) for a, b in zip(rank0.state_dict().values(), one.state_dict().values()))
    assert other.sharded_source is None and other.on_meta
    good = tmp_path / "good"
    tiny_llama().save_pretrained(good)
    with backbone_on_meta(read_shards=True, rank0=True):
        reads = AudexBackbone(pretrained_path=str(good), vocab_size=1024, init_seed=3)
    assert reads.on_meta and reads.sharded_source == {"folder": str(good), "init_std": 0.02, "init_seed": 3}


def test_new_vocabulary_rows_are_extend_vocabulary_rows():
    lm = tiny_llama(torch.float32)
    old = lm.get_input_embeddings().weight.shape[0]
    extend_vocabulary(lm, old + 40, init_std=0.05, seed=11)
    emb, head = new_vocabulary_rows(old, old + 40, [128, 128], 0.05, 11)
    assert torch.equal(lm.get_input_embeddings().weight[old:], emb)
    assert torch.equal(lm.get_output_embeddings().weight[old:], head)
