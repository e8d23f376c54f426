"""MoE balancing of section 4.3 on engine ``megatron``: what megatron-core's router needs from Audex.

megatron-core does the balancing itself: the sigmoid router's aux-loss-free ``expert_bias`` counts the tokens
each expert received (``local_tokens_per_expert``) and ``finalize_model_grads`` moves the bias once per optimizer
step from the counts all-reduced over TP x CP x DP; the sequence-level load-balancing loss enters the backward
through ``MoEAuxLossAutoScaler``. Audex supplies four things megatron-core's own training loop would:

* :func:`configure_balancing`: ``model.moe`` (bias update rate, loss coefficient, routing scale) into the
  model's ``TransformerConfig``, which the router and ``finalize_model_grads`` read at every step. A stage that
  keeps the LLM frozen (stage 1) sets both to 0, so the routing bias stays bit-identical;
* :func:`set_aux_loss_scale`: the load-balancing loss's gradient scale, ``1 / micro-batches per step``, as
  megatron's pipeline schedule sets it (Lightning divides the main loss by the same count);
* padding: every row's padding runs are passed to megatron-core as ``padding_mask`` (True = padding), so they
  are neither counted for the bias nor in the load-balancing loss. megatron-core 0.16.1's
  ``TopKRouter._apply_expert_bias`` masks the ``[tokens, experts]`` routing map with the flat ``[tokens]`` mask
  (a shape error, or a wrong broadcast when tokens == experts); :func:`fix_router_padding_mask` replaces exactly
  that method (detected by its source) with the same code and the mask as a column;
* :func:`dispatch_tokens`: megatron-core's all-gather token dispatcher (the one that runs without CUDA streams,
  :func:`audex.parallel.megatron_specs.transformer_config` picks it on CPU) gathers equal-sized token blocks over
  the tensor x expert group, whose ranks hold different data-parallel rows; each rank pads its micro-batch to
  the group's longest with a masked padding run.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist


def _apply_expert_bias(self, routing_map: torch.Tensor, padding_mask: torch.Tensor | None = None):
    """megatron-core 0.16.1's ``TopKRouter._apply_expert_bias`` with the padding mask as a column."""
    if self.enable_expert_bias and torch.is_grad_enabled():
        with torch.no_grad():
            if padding_mask is not None:
                routing_map = routing_map & ~padding_mask.reshape(-1, 1)
            self.local_tokens_per_expert += routing_map.sum(dim=0)


def fix_router_padding_mask() -> bool:
    """Replace megatron-core's ``TopKRouter._apply_expert_bias`` when it has 0.16.1's flat-mask line; returns whether
    it did (now or before). Idempotent; a release without that line is left alone (untested releases warn in
    :func:`audex.parallel.megatron_specs.require_megatron`)."""
    from megatron.core.transformer.moe.router import TopKRouter

    method = TopKRouter._apply_expert_bias
    if method is _apply_expert_bias:
        return True
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError):
        return False
    if "routing_map & (~padding_mask)" not in source:
        return False
    TopKRouter._apply_expert_bias = _apply_expert_bias
    return True


def routers(module) -> list:
    """megatron-core routers with the aux-loss-free bias inside ``module``."""
    return [m for m in module.modules() if getattr(m, "expert_bias", None) is not None]


def configure_balancing(mcore, bias_update_rate: float, aux_loss_coeff: float, routing_scale: float,
                        train_routers: bool) -> int:
    """``model.moe`` into the megatron-core model's ``TransformerConfig`` (shared by its layers and read by the
    router and ``finalize_model_grads`` at every step). Returns the number of biased routers (0: dense)."""
    found = routers(mcore)
    if not found:
        return 0
    config = mcore.config
    scale = float(config.moe_router_topk_scaling_factor or 1.0)
    if abs(scale - float(routing_scale)) > 1e-6:
        raise ValueError(f"model.moe.routing_scale={routing_scale} but the backbone routes with "
                         f"routed_scaling_factor={scale}: set model.backbone.config.routed_scaling_factor to match")
    config.moe_router_bias_update_rate = float(bias_update_rate) if train_routers else 0.0
    config.moe_aux_loss_coeff = float(aux_loss_coeff) if train_routers else 0.0
    return len(found)


def set_aux_loss_scale(micro_batches: int) -> None:
    """The load-balancing loss's gradient scale for a step of ``micro_batches`` accumulated micro-batches."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / max(int(micro_batches), 1)))


def dispatch_tokens(config, tokens: int) -> int:
    """How many tokens this rank's micro-batch must have for megatron-core's all-gather dispatcher: the longest
    over the tensor x expert group (``tokens`` itself with another dispatcher or one rank). Collective."""
    if not getattr(config, "num_moe_experts", None) or config.moe_token_dispatcher_type != "allgather":
        return tokens
    from megatron.core import parallel_state as ps

    group = ps.get_expert_tensor_and_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return tokens
    most = torch.tensor([tokens], dtype=torch.int64)
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
    return int(most)
