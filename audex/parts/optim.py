"""Optimizer and learning-rate schedule of a stage (Table 3, lower half).

The config keeps NeMo's ``optim`` schema, so that anything NeMo's registries know works::

    model:
      optim:
        name: adamw                 # nemo.core.optim registry -> torch.optim.AdamW
        lr: 2.0e-5                  # maximum LR
        betas: [0.9, 0.999]
        weight_decay: 0.05
        sched:
          name: CosineAnnealing     # nemo.core.optim.lr_scheduler
          warmup_ratio: 0.05        # or warmup_steps: 200 (stage0_text)
          min_lr: 1.0e-6

What Audex adds to NeMo's ``ModelPT.setup_optimization``:

* only trainable parameters are handed to the optimizer, in three groups: weight-decayed matrices; biases and
  norm gains without weight decay (Megatron-LM's convention); and row-masked embedding tables (stage1) whose
  decoupled weight decay touches the trainable rows only, applied in a step pre-hook -- so the frozen text rows
  stay bit-identical whatever ``weight_decay`` is;
* for routed-expert backbones, the auxiliary-loss-free bias update runs in a step post-hook, once per optimizer
  step (after gradient accumulation), with the expert loads of that step.

Example::

    optimizer, scheduler = build_optimizer_and_scheduler(model, cfg.model.optim, max_steps=1000,
                                                         moe_balancer=model.moe_balancer)
"""

from __future__ import annotations

import logging

import torch
from nemo.core.optim import get_optimizer
from nemo.core.optim.lr_scheduler import prepare_lr_scheduler
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)


def optimizer_param_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters of ``model`` grouped for AdamW (see the module docstring)."""
    decay, no_decay, masked = [], [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if getattr(p, "audex_row_mask", None) is not None:
            masked.append(p)
        elif p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    if not (decay or no_decay or masked):
        raise ValueError("the model has no trainable parameter: call audex.training.stages.apply_stage(model, "
                         "cfg.model.stage) before building the optimizer")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "group_name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "group_name": "no_decay"})
    if masked:
        groups.append({"params": masked, "weight_decay": 0.0, "masked_weight_decay": weight_decay,
                       "group_name": "row_masked"})
    return groups


@torch.no_grad()
def _masked_weight_decay(optimizer, args, kwargs) -> None:
    """Decoupled weight decay (AdamW's ``p *= 1 - lr * wd``) on the trainable rows of row-masked tables.
    Frozen rows are multiplied by exactly 1.0, i.e. left bit-identical."""
    for group in optimizer.param_groups:
        wd = group.get("masked_weight_decay", 0.0)
        if not wd:
            continue
        for p in group["params"]:
            if p.grad is None:
                continue
            # sharded tables (DTensor): the mask is laid out like the parameter, each rank scales its own rows
            local = p.to_local() if isinstance(p, DTensor) else p
            mask = p.audex_row_mask
            mask = (mask.to_local() if isinstance(mask, DTensor) else mask).to(local.device).unsqueeze(1)
            factor = torch.where(mask, torch.tensor(1.0 - group["lr"] * wd, dtype=local.dtype, device=local.device),
                                 torch.tensor(1.0, dtype=local.dtype, device=local.device))
            local.mul_(factor)


def build_optimizer_and_scheduler(model, optim_cfg: DictConfig | dict, max_steps: int, moe_balancer=None):
    """AdamW (or any NeMo-registered optimizer) over the trainable parameters + NeMo's LR scheduler.

    ``moe_balancer`` (a :class:`~audex.parts.moe.MoeBalancer`): its routing bias update runs after every
    optimizer step. Returns ``(optimizer, scheduler_dict)`` where the scheduler dict is Lightning's
    ``{"scheduler": ..., "interval": "step", ...}`` (None without ``sched``).
    """
    cfg = OmegaConf.to_container(optim_cfg, resolve=True) if isinstance(optim_cfg, DictConfig) else dict(optim_cfg)
    sched_cfg = cfg.pop("sched", None)
    name = cfg.pop("name", "adamw")
    if "lr" not in cfg:
        raise ValueError("model.optim.lr (the maximum learning rate) is required")
    weight_decay = float(cfg.pop("weight_decay", 0.0))
    if "betas" in cfg:
        cfg["betas"] = tuple(cfg["betas"])
    optimizer = get_optimizer(name)(optimizer_param_groups(model, weight_decay), **cfg)
    if any(g.get("masked_weight_decay") for g in optimizer.param_groups):
        optimizer.register_step_pre_hook(_masked_weight_decay)
    if moe_balancer is not None:
        optimizer.register_step_post_hook(lambda opt, args, kwargs: moe_balancer.update_bias())
    scheduler = None
    if sched_cfg is not None:
        if max_steps is None or max_steps <= 0:
            raise ValueError("a learning-rate schedule needs the stage length: set trainer.max_steps "
                             "(examples/audex_train.py derives it from the data blend when trainer.max_steps=-1)")
        sched_cfg = dict(sched_cfg)
        sched_cfg["max_steps"] = int(max_steps)
        if sched_cfg.get("warmup_steps") is not None and sched_cfg.get("warmup_ratio") is not None:
            raise ValueError("model.optim.sched: give warmup_steps or warmup_ratio, not both")
        for key in ("warmup_steps", "warmup_ratio"):
            if sched_cfg.get(key) is None:
                sched_cfg.pop(key, None)
        scheduler = prepare_lr_scheduler(optimizer, sched_cfg)
    return optimizer, scheduler

