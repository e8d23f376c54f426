"""Sharded checkpoints of engine ``megatron`` (:class:`~audex.parallel.megatron_strategy.MegatronStrategy`):
megatron-core's dist-checkpointing with its ``torch_dist`` backend, every rank writing its own shards.

A checkpoint is a folder (Lightning's ``...ckpt`` path)::

    __<rank>_0.distcp      every rank: the main replicas it holds (megatron-core's ``replica_id``), through torch DCP
    .metadata              which global tensor slice lies in which file (written by rank 0 after gathering the plans)
    common.pt              rank 0: what is not sharded (optimizer hyper-parameters, the common Adam step)
    metadata.json          megatron-core's backend marker (torch_dist)
    meta.pt                rank 0: Lightning's remaining state (loops, data-loader position, LR schedulers, callbacks)

What is sharded (:func:`sharded_model_state`, :func:`sharded_optimizer_state`):

* ``state_dict``: every megatron-core model's own ``sharded_state_dict()`` (TP/EP slices with their global
  offsets; TP-duplicated tensors such as norms written once), under its LightningModule prefix
  (``llm.lm.mcore.``); every other parameter and persistent buffer of the LightningModule (the audio adapter, ...)
  as a whole tensor replicated on every rank (``replica_id`` = the global rank: rank 0's copy is written);
* ``optimizer_<i>``: each rank's torch AdamW moments, each a ShardedTensor with the sharding of its parameter
  (megatron-core's ``optim_state_to_sharding_state``): a TP-split weight's moments are split and written by the
  ranks that hold them; Adam's per-parameter steps (the same on every rank) are stored once, in the common state.

Loading builds the same sharded state dict from the live model and optimizer and reads each rank's slices back
(``dist_checkpointing.load``); global keys and offsets, not rank numbers, locate the data.

CPU: megatron-core 0.16.1's torch_dist save calls ``torch.cuda.synchronize()`` after staging the tensors to CPU
memory (``FileSystemWriterAsync.preload_tensors``) and puts its one-integer write-failure flag on
``torch.cuda.current_device()`` before a broadcast (``save_state_dict_async_finalize``); neither computes
anything. Without CUDA, :func:`_cpu_dist_checkpointing` points the first at a no-op and the second at the CPU for
the duration of the save or load; every other step runs unchanged over gloo.

What ran (tests/parallel/test_megatron_lightning.py, CPU, gloo, TP=2 under torchrun): killed at micro-batch 5 and
rerun with the same command, the tiny Llama stage resumed from its step-2 checkpoint with every later loss
bit-equal to the uninterrupted run's (with the restored Adam moments zeroed instead, they moved by 1.0e-2); each
rank's file held its half of the vocab-split output layer and of its moments; the ``.nemo``'s LLM and adapter
weights equal the last checkpoint merged by torch DCP, bit for bit. Not run: EP, Mamba or Transformer Engine
models, GPUs, and loading into a different layout than the one saved (megatron-core's global offsets would allow
it; untested here).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

META = "meta.pt"
SKIP = ("step",)


def megatron_models(module) -> list[tuple[str, torch.nn.Module]]:
    """``(state-dict prefix, megatron-core model)`` for every ``MegatronCausalLM`` inside ``module``."""
    return [(f"{name}.mcore." if name else "mcore.", m.mcore) for name, m in module.named_modules()
            if getattr(m, "mcore", None) is not None and hasattr(m, "hf_state_dict")]


def outside_tensors(module, prefixes) -> dict[str, torch.Tensor]:
    """The parameters and persistent buffers of ``module`` under state-dict names, except those inside the
    megatron-core models (``prefixes``); read from the modules directly, since ``state_dict()`` of a
    ``MegatronCausalLM`` gathers whole tensors over TP/EP."""
    out = {}
    for name, sub in module.named_modules():
        at = f"{name}." if name else ""
        if any(at.startswith(p) for p in prefixes):
            continue
        for key, p in sub._parameters.items():
            if p is not None:
                out[at + key] = p
        for key, b in sub._buffers.items():
            if b is not None and key not in sub._non_persistent_buffers_set:
                out[at + key] = b
    return out


def sharded_model_state(module) -> dict:
    """The LightningModule's sharded state dict: megatron-core's own sharding for its models, whole replicated
    tensors (main replica on rank 0) for the rest."""
    from megatron.core.dist_checkpointing import ShardedTensor

    models = megatron_models(module)
    state = {}
    for prefix, mcore in models:
        state.update(mcore.sharded_state_dict(prefix=prefix))
    rank = dist.get_rank()
    for key, t in outside_tensors(module, [p for p, _ in models]).items():
        state[key] = ShardedTensor.from_rank_offsets(key, t, replica_id=rank)
    return state


def _optimizer_params(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def sharded_optimizer_state(optimizer, model_state: dict, loading: bool = False, common: dict | None = None,
                            index: int = 0) -> dict:
    """A torch optimizer's state with every per-parameter tensor as a ShardedTensor shaped like its parameter's
    (``model_state``: :func:`sharded_model_state` of the module the optimizer trains), under megatron-core's keys
    ``optimizer.state.<exp_avg|...>.<parameter key>`` (``optimizer_<index>.`` for a second optimizer).
    ``loading``: a template of empty tensors for the state keys recorded in ``common`` (the checkpoint's common
    state of this optimizer)."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    params = _optimizer_params(optimizer)
    id_map = get_param_id_to_sharded_param_map(model_state, params)
    if loading:
        book = common["state"]["audex_stepped"]
        state = {"state": {i: {k: torch.empty_like(params[i]) for k in b["keys"]} for i, b in book.items()},
                 "param_groups": optimizer.state_dict()["param_groups"]}
    else:
        state = optimizer.state_dict()
        book = _stepped(state)
    unmapped = sorted(set(state["state"]) - set(id_map))
    if unmapped:
        raise ValueError(f"optimizer parameters {unmapped} belong to no tensor of the module's sharded state dict")
    optim_state_to_sharding_state(state, id_map, exclude_keys=SKIP)
    if index:
        for per_param in state["state"].values():
            for sh in per_param.values():
                sh.key = f"optimizer_{index}" + sh.key[len("optimizer"):]
    if not loading:
        state["state"]["audex_stepped"] = book
    return state


def _stepped(state: dict) -> dict:
    """Per parameter with optimizer state: its state keys and its step (a parameter that had no grad in some step,
    e.g. the audio adapter after text-only batches, has a smaller step). Saved once, in the common state, so it
    must be the same on every rank (checked): the per-parameter tensors are the sharded part."""
    book = {i: {"keys": sorted(k for k in s if k not in SKIP),
                "step": s["step"].clone() if torch.is_tensor(s.get("step")) else s.get("step")}
            for i, s in state["state"].items()}
    mine = sorted((i, b["keys"], None if b["step"] is None else float(b["step"])) for i, b in book.items())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if any(e != everyone[0] for e in everyone):
        raise ValueError("ranks differ in which parameters have optimizer state, its keys or steps: the "
                         "sharded checkpoint stores them once")
    return book


def unshard_optimizer_state(loaded: dict) -> dict:
    """The loaded optimizer part back as a torch ``state_dict`` (each parameter's step put back)."""
    book = loaded["state"].pop("audex_stepped")
    for i, b in book.items():
        if b["step"] is not None:
            loaded["state"].setdefault(i, {})["step"] = b["step"].clone() if torch.is_tensor(b["step"]) else b["step"]
    return loaded


@contextlib.contextmanager
def _cpu_dist_checkpointing():
    """Without CUDA: megatron-core's torch_dist writer's ``torch.cuda.synchronize()`` as a no-op and its failure
    flag's ``torch.cuda.current_device()`` as the CPU (module docstring); with CUDA: nothing changes."""
    if torch.cuda.is_available():
        yield
        return
    sync, current = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize, torch.cuda.current_device = (lambda *a, **k: None), (lambda: "cpu")
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = sync, current


def save_sharded(module, optimizers, checkpoint: dict, path: Path, is_global_zero: bool) -> None:
    """Every rank: its shards of the model and optimizer states into the folder ``path``; rank 0: the rest of
    Lightning's ``checkpoint`` (loops, schedulers, callbacks, hyper-parameters as plain containers) as ``meta.pt``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    model_state = sharded_model_state(module)
    sharded = {"state_dict": model_state}
    if "optimizer_states" in checkpoint:          # not for Lightning's weights-only checkpoints
        for i, opt in enumerate(optimizers):
            sharded[f"optimizer_{i}"] = sharded_optimizer_state(opt, model_state, index=i)
    if is_global_zero:
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)   # one file per rank
    with _cpu_dist_checkpointing():
        dist_checkpointing.save(sharded, str(path), sharded_strategy=strategy)
    if is_global_zero:
        rest = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states", "hparams_type")}
        torch.save(rest, path / META)
    dist.barrier()


def load_sharded(module, optimizers, path: Path) -> dict:
    """Every rank reads its slices into ``module`` (in place) and returns Lightning's checkpoint dict with this
    rank's ``optimizer_states`` (torch state dicts for ``optimizer.load_state_dict``) and the ``meta.pt`` entries."""
    from megatron.core import dist_checkpointing

    if not (path / META).is_file() or not dist_checkpointing.check_is_distributed_checkpoint(str(path)):
        raise FileNotFoundError(f"{path} is not a sharded engine-megatron checkpoint (no {META} / metadata.json): "
                                "checkpoints of other strategies do not resume under MegatronStrategy")
    with _cpu_dist_checkpointing():
        common = dist_checkpointing.load_common_state_dict(str(path))
        model_state = sharded_model_state(module)
        sharded = {"state_dict": model_state}
        saved = [i for i in range(len(optimizers)) if f"optimizer_{i}" in common]
        for i in saved:
            sharded[f"optimizer_{i}"] = sharded_optimizer_state(optimizers[i], model_state, loading=True,
                                                                common=common[f"optimizer_{i}"], index=i)
        loaded = dist_checkpointing.load(sharded, str(path))
    models = megatron_models(module)
    weights = loaded["state_dict"]
    for prefix, mcore in models:
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        missing, unexpected = mcore.load_state_dict(own, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]   # megatron-core drops empty extra state
        if missing or unexpected:
            raise RuntimeError(f"{path}: megatron-core model {prefix!r}: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for key, t in outside_tensors(module, [p for p, _ in models]).items():
            t.copy_(weights[key])
    checkpoint = torch.load(path / META, map_location="cpu", weights_only=True)
    if saved:
        checkpoint["optimizer_states"] = [unshard_optimizer_state(loaded[f"optimizer_{i}"]) for i in saved]
    return checkpoint
