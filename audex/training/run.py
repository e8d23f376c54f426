"""One training stage from its Hydra config: model -> init_from -> freezing -> data -> trainer -> fit -> .nemo.

``examples/audex_train.py`` is a thin Hydra entry point over :func:`train_stage`; the chain
(``examples/audex_train_chain.py``) runs one stage after another, each initialised from the previous ``.nemo``.

What is derived rather than configured:

* ``trainer.max_steps = -1`` becomes the stage's length from the data blend: sum over sources of
  epochs x examples, as packed rows of ``data.max_length`` tokens (or samples, unpacked), divided by
  ``data.global_batch_size`` (:meth:`audex.data.blend.BlendPlan.optimizer_steps`);
* ``trainer.accumulate_grad_batches`` = global batch / (rows per micro-batch x devices x nodes), so that Table 3's
  batch sizes hold on any number of GPUs;
* the training loader is wrapped in a :class:`~audex.training.resumable.ResumableLoader`, so that a run killed
  anywhere resumes at the exact batch (``exp_manager.resume_if_exists``).

Example::

    cfg = compose("stage1", overrides=["model.init_from=runs/stage0_text/stage0_text.nemo"])
    nemo_path = train_stage(cfg)
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from lightning.fabric.utilities.rank_zero import _get_rank
from lightning.pytorch import Trainer, seed_everything
from nemo.utils.exp_manager import exp_manager
from omegaconf import DictConfig, OmegaConf, open_dict

from audex.data.loader import build_dataloader, plan_blend
from audex.models.audex_model import AudexModel
from audex.modules.backbone import backbone_on_meta
from audex.parallel.config import ParallelismConfig, ParallelismError
from audex.parallel.megatron_strategy import MegatronStrategy
from audex.parallel.planner import model_dims
from audex.parallel.sharding import gather_full_state
from audex.parallel.strategy import AudexParallelStrategy, data_parallel_rank, needs_model_parallel
from audex.training.megatron_run import (
    check_megatron_layout,
    engine_hf_copy,
    engine_of,
    start_parallel_state,
    stop_parallel_state,
    uses_megatron_strategy,
)
from audex.training.progress import StageProgressBar
from audex.training.resumable import ExactResume, ResumableLoader
from audex.training.stages import apply_stage, load_init_weights
from audex.training.text_gate import TextRegressionGate

log = logging.getLogger(__name__)


def rows_per_micro_batch(data_cfg: DictConfig) -> int:
    """Rows (packed sequences, or samples when unpacked) in one micro-batch of the training loader."""
    packing = data_cfg.get("packing") or {}
    train = data_cfg.get("train_ds") or {}
    if packing.get("enabled", True):
        return int(packing.get("rows_per_batch", 1))
    if train.get("batch_size") is None:
        raise ValueError("without packing, data.train_ds.batch_size must be set so that data.global_batch_size "
                         "(samples per optimizer step) can be met by gradient accumulation")
    return int(train.batch_size)


def gradient_accumulation(global_batch_size: int, micro_rows: int, devices: int, nodes: int,
                          model_parallel: int = 1) -> int:
    """Micro-batches per optimizer step; the global batch must be a whole multiple of one micro-step. Only
    data-parallel ranks add rows: ``model_parallel`` (tensor x context ranks) see the same rows."""
    per_step = micro_rows * devices * nodes // model_parallel
    if global_batch_size % per_step:
        mp = f" / (tensor x context = {model_parallel})" if model_parallel > 1 else ""
        raise ValueError(f"data.global_batch_size={global_batch_size} is not a multiple of rows per micro-batch "
                         f"({micro_rows}) x devices ({devices}) x nodes ({nodes}){mp} = {per_step}")
    return global_batch_size // per_step


def _num_devices(trainer_cfg: DictConfig) -> int:
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if trainer_cfg.get("accelerator") in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def stage_max_steps(cfg: DictConfig, model) -> int:
    """``trainer.max_steps``, or (when -1) the optimizer steps of the stage's blend."""
    if int(cfg.trainer.get("max_steps", -1)) > 0:
        return int(cfg.trainer.max_steps)
    plan = plan_blend(cfg.data, model.tokenizer, model.frames_for_samples)
    packing = cfg.data.get("packing") or {}
    max_length = int(cfg.data.max_length) if packing.get("enabled", True) else None
    steps = plan.optimizer_steps(int(cfg.data.global_batch_size), max_length=max_length)
    log.info("stage %s: %s\n-> %d optimizer steps of %d rows", cfg.name, plan.describe(), steps,
             cfg.data.global_batch_size)
    return steps


def builds_on_meta(cfg: DictConfig) -> bool:
    """True on the ranks that build the backbone on the meta device: every rank but 0 (as the launcher's
    environment names it: torchrun's ``RANK``, Lightning's ``LOCAL_RANK``, SLURM's ``SLURM_PROCID``) of a run
    whose engine-hf model is split (TP/CP/EP/FSDP) with ``parallelism.meta_init`` on. Rank 0 builds and loads
    the whole model as one process does; ``configure_model`` broadcasts it into every rank's shards."""
    node = cfg.get("parallelism")
    p = ParallelismConfig.from_dict(OmegaConf.to_container(node, resolve=True) if node is not None else {})
    engine = (cfg.model.get("backbone") or {}).get("engine", "hf")
    rank = _get_rank()
    return bool(p.meta_init and needs_model_parallel(p) and engine == "hf" and rank is not None and rank > 0)


def reads_backbone_shards(cfg: DictConfig) -> bool:
    """True on every rank, rank 0 included, of a split engine-hf run (more than one process, ``meta_init``) whose
    backbone comes from ``model.backbone.pretrained_path`` and is not overwritten by ``model.init_from``: every
    rank builds it on the meta device and reads its own shards from the folder's safetensors files
    (:mod:`audex.parallel.sharded_read`; where the folder cannot be read so, rank 0 loads it and broadcasts)."""
    node = cfg.get("parallelism")
    p = ParallelismConfig.from_dict(OmegaConf.to_container(node, resolve=True) if node is not None else {})
    backbone = cfg.model.get("backbone") or {}
    if not (p.meta_init and needs_model_parallel(p) and backbone.get("engine", "hf") == "hf"
            and backbone.get("pretrained_path") and not cfg.model.get("init_from") and cfg.get("trainer") is not None):
        return False
    return _num_devices(cfg.trainer) * int(cfg.trainer.get("num_nodes", 1)) > 1


def build_model(cfg: DictConfig, trainer=None):
    """The model of the stage, initialised from ``model.init_from``, frozen per ``model.stage``, with the stage's
    packed attention (``model.packed_attention``) and MoE balancing (``model.moe``). On the ranks of
    :func:`builds_on_meta` the backbone has no weights yet and ``init_from`` is read by rank 0 alone; with
    :func:`reads_backbone_shards` no rank has them yet (``configure_model`` reads them)."""
    on_meta, shards = builds_on_meta(cfg), reads_backbone_shards(cfg)
    with backbone_on_meta(shards, rank0=not on_meta) if on_meta or shards else contextlib.nullcontext():
        model = AudexModel(cfg.model, trainer=trainer)
    model.built_on_meta = on_meta or getattr(model.llm, "sharded_source", None) is not None
    if cfg.model.get("init_from") and not on_meta:
        load_init_weights(model, cfg.model.init_from, strict=bool(cfg.model.get("init_from_strict", True)))
    report = apply_stage(model, cfg.model.stage)
    model.use_packed_attention(cfg.model.get("packed_attention", "varlen"))
    moe = cfg.model.get("moe")
    if moe is not None:
        # the routers learn, and their bias moves, only when the LLM trains (stage1 keeps the LLM bit-identical)
        model.enable_moe_balancing(moe.bias_update_rate, moe.aux_loss_coeff, float(moe.routing_scale),
                                   train_routers="llm" in report.trainable_parts)
    return model, report


def launch_layout(cfg: DictConfig) -> ParallelismConfig:
    """``cfg.parallelism`` checked against the launch (devices x nodes) and the engine, before any model exists."""
    node = cfg.get("parallelism")
    given = ParallelismConfig.from_dict(OmegaConf.to_container(node, resolve=True) if node is not None else {})
    world = _num_devices(cfg.trainer) * int(cfg.trainer.get("num_nodes", 1))
    if given.world_size is not None and given.world_size != world:
        raise ParallelismError(f"parallelism.world_size={given.world_size} but trainer.devices x trainer.num_nodes = "
                               f"{world}: set parallelism.world_size=null (or launch {given.world_size} processes)")
    try:
        p = ParallelismConfig(**{**given.to_dict(), "world_size": world})
    except ParallelismError as err:
        raise ParallelismError(f"{err} (trainer.devices x trainer.num_nodes = {world} processes)") from None
    if engine_of(cfg) == "megatron":
        check_megatron_layout(p)
    elif p.pipeline > 1:
        raise ParallelismError("parallelism.pipeline > 1: engine hf has no pipeline parallelism; set pipeline=1")
    return p


def run_parallelism(cfg: DictConfig, model) -> ParallelismConfig:
    """:func:`launch_layout`, then checked against the model and the data; clear errors."""
    p = launch_layout(cfg)
    p.check_model(model_dims(model.llm))
    packing = cfg.data.get("packing") or {}
    p.check_data(bool(packing.get("enabled", True)), int(cfg.data.max_length) if cfg.data.get("max_length") else None)
    return p


def attach_data(model, cfg: DictConfig, trainer, parallelism: ParallelismConfig | None = None) -> None:
    """Resumable training loader and the validation loader of ``cfg.data``, attached to the model. Samplers key
    on the data-parallel rank and size: tensor and context peers read the same rows, data-parallel ranks
    disjoint ones."""
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    if parallelism is not None and parallelism.data is not None:
        rank, world = data_parallel_rank(rank, parallelism), parallelism.data
    data_cfg, tokenizer, frames = cfg.data, model.tokenizer, model.frames_for_samples
    train = ResumableLoader(lambda epoch: build_dataloader(data_cfg, tokenizer, frames, "train", epoch, rank, world))
    validation = None
    if data_cfg.get("validation_ds") is not None:
        validation = build_dataloader(data_cfg, tokenizer, frames, "val", 0, rank, world)
    model.attach_dataloaders(train, validation)


def gate_loaders(model, data_cfg: DictConfig) -> dict:
    """One validation loader per data type (the ``blend`` of the validation ``input_cfg`` items: text, asr_ast,
    understanding, tts, tta); items of the same type share a loader."""
    val = data_cfg.get("validation_ds")
    if val is None:
        return {}
    items_by_task: dict[str, list] = {}
    for item in OmegaConf.to_container(val.input_cfg, resolve=True):
        task = item.get("blend") or item.get("name")
        if task is None:
            raise ValueError("data.validation_ds.input_cfg items need `blend: <data type>` for the text gate's "
                             "per-task report")
        items_by_task.setdefault(task, []).append(item)
    loaders = {}
    for task, items in items_by_task.items():
        one = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True))
        one.validation_ds.input_cfg = items
        loaders[task] = build_dataloader(one, model.tokenizer, model.frames_for_samples, "val")
    return loaders


def build_trainer(cfg: DictConfig, max_steps: int, parallelism: ParallelismConfig | None = None):
    """The stage's Trainer; with a split model (``parallelism`` TP/CP/EP/FSDP) on :class:`AudexParallelStrategy`
    (engine hf) or, for engine megatron with more than one process, on :class:`MegatronStrategy`."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["max_steps"] = int(max_steps)
    devices = _num_devices(cfg.trainer)
    model_parallel = parallelism.tensor * parallelism.context if parallelism is not None else 1
    trainer_cfg["accumulate_grad_batches"] = gradient_accumulation(
        int(cfg.data.global_batch_size), rows_per_micro_batch(cfg.data), devices, int(cfg.trainer.get("num_nodes", 1)),
        model_parallel)
    if uses_megatron_strategy(cfg, parallelism):
        trainer_cfg["strategy"] = MegatronStrategy(parallelism or launch_layout(cfg))
    elif parallelism is not None and needs_model_parallel(parallelism) and engine_of(cfg) == "hf":
        trainer_cfg["strategy"] = AudexParallelStrategy(parallelism)
    if trainer_cfg.get("enable_progress_bar", True):  # the stage's step count as the bar's total, not "?"
        trainer_cfg["callbacks"] = [*trainer_cfg.get("callbacks", []), StageProgressBar()]
    if trainer_cfg.get("precision") in ("bf16", "bf16-mixed") and trainer_cfg.get("accelerator") in ("gpu", "cuda") \
            and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bf16: training in fp16-mixed")
        trainer_cfg["precision"] = "16-mixed"
    return Trainer(**trainer_cfg)


def train_stage(cfg: DictConfig, callbacks: list | None = None) -> Path:
    """Run one stage; returns the path of the ``.nemo`` written at its end (``cfg.output_nemo``).
    ``callbacks``: extra Lightning callbacks (loggers of your own, profilers, ...)."""
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    seed_everything(int(cfg.seed), workers=True)
    own_group = start_parallel_state(cfg, launch_layout(cfg))   # engine megatron: before its backbone is built
    try:
        return _train(cfg, callbacks)
    finally:
        if engine_of(cfg) == "megatron":
            stop_parallel_state(own_group)


def _train(cfg: DictConfig, callbacks: list | None) -> Path:
    model, report = build_model(cfg)
    parallelism = run_parallelism(cfg, model)
    max_steps = stage_max_steps(cfg, model)
    if model._cfg.optim.get("sched") is not None:
        with open_dict(model._cfg):
            model._cfg.optim.sched.max_steps = max_steps
    trainer = build_trainer(cfg, max_steps, parallelism)
    log_dir = exp_manager(trainer, cfg.get("exp_manager"))
    model.set_trainer(trainer)
    attach_data(model, cfg, trainer, parallelism)
    gate_cfg = cfg.model.get("text_gate")
    if gate_cfg is not None and gate_cfg.get("enabled", True):
        gate = TextRegressionGate(lambda: gate_loaders(model, cfg.data), stage=str(cfg.name),
                                  text_task=gate_cfg.text_task, max_relative_increase=gate_cfg.max_relative_increase,
                                  on_regression=gate_cfg.on_regression,
                                  report_path=str(Path(log_dir or ".") / "text_gate.json"),
                                  max_batches_per_task=gate_cfg.get("max_batches_per_task"))
        trainer.callbacks.append(gate)
    trainer.callbacks.append(ExactResume())
    trainer.callbacks.extend(callbacks or [])
    log.info("%s; %d optimizer steps x %d micro-batches", report, max_steps, trainer.accumulate_grad_batches)
    trainer.fit(model)
    out = Path(cfg.output_nemo)
    if model.llm.engine == "megatron":   # TP/EP shards gathered by every rank; rank 0 writes an engine-hf copy
        model = engine_hf_copy(model, trainer.is_global_zero)
    elif model._audex_sharded:     # the shards gathered (every rank takes part), one whole model written by rank 0
        state = gather_full_state(model)
        if trainer.is_global_zero:
            model = AudexModel(model.cfg)
            model.load_state_dict(state)
    if trainer.is_global_zero:
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save_to(str(out))
        log.info("stage %s done: %s", cfg.name, out)
    return out

