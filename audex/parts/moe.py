"""MoE load balancing of section 4.3 for routed-expert backbones (the 30B-A3B Nemotron-H).

:class:`MoeBalancer`: auxiliary-loss-free load balancing (a per-expert routing bias moved by
``bias_update_rate`` toward equal load after each optimizer step; DeepSeek-V3 / Megatron-core
``get_updated_expert_bias``) plus the Switch-style load-balancing loss with a small coefficient (1e-6 in the
paper). The routing scale (2.5) is an architecture value of the backbone config (``routed_scaling_factor`` of
Nemotron-H); :meth:`MoeBalancer.check_routing_scale` verifies it.

Hand-written because transformers' ``load_balancing_loss_func`` assumes softmax routers without the correction
bias that Nemotron-H's sigmoid router carries.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class MoeBalancer:
    """Load balancing for routed-expert backbones (the 30B-A3B Nemotron-H), section 4.3.

    Two mechanisms, as the paper uses both:

    * **auxiliary-loss-free balancing**: every router keeps a per-expert bias that is added to its scores
      only when *choosing* experts. After each optimizer step the bias of each expert moves by
      ``bias_update_rate`` (1e-3) toward equal load: ``bias += rate * sign(mean_load - load)``, the loads being
      the tokens each expert received since the previous step (Megatron-core ``get_updated_expert_bias``).
      The bias is the router's ``e_score_correction_bias`` buffer in transformers' Nemotron-H / DeepSeek-V3.
    * **load-balancing loss** (Switch Transformer / GShard): per MoE layer
      ``E * sum_i f_i * P_i`` with ``f_i`` the share of routed (token, slot) pairs sent to expert i and ``P_i``
      the mean normalised router score of expert i, averaged over layers and scaled by ``aux_loss_coeff`` (1e-6).

    Only tokens of real samples count (``valid_mask``), not padding.

    Example::

        balancer = MoeBalancer(model.backbone, bias_update_rate=1e-3, aux_loss_coeff=1e-6)
        with balancer.recording(valid_mask=batch.sample_ids >= 0):
            out = model(...)
        loss = lm_loss + balancer.load_balancing_loss()
        loss.backward(); optimizer.step(); balancer.update_bias()
    """

    def __init__(self, module: nn.Module, bias_update_rate: float = 1e-3, aux_loss_coeff: float = 1e-6):
        self.routers = [(name, m) for name, m in module.named_modules() if hasattr(m, "e_score_correction_bias")]
        self.bias_update_rate = float(bias_update_rate)
        self.aux_loss_coeff = float(aux_loss_coeff)
        self._records: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self.last_update_stats: dict[str, float] = {}
        self._valid: torch.Tensor | None = None
        self._recording = False
        self._loads: dict[str, torch.Tensor] = {}
        self.group = None   # data x context-parallel process group: loads are summed over it before the bias moves
        self._handles = [m.register_forward_hook(self._make_hook(name)) for name, m in self.routers]

    @property
    def active(self) -> bool:
        return bool(self.routers)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def check_routing_scale(self, expected: float = 2.5) -> None:
        """Raise if a router's top-k routing scale differs from ``expected`` (2.5 in the paper)."""
        for name, router in self.routers:
            scale = getattr(router, "routed_scaling_factor", None)
            if scale is not None and abs(float(scale) - expected) > 1e-9:
                raise ValueError(f"router {name} has routed_scaling_factor={scale}, expected {expected}: set "
                                 "routed_scaling_factor in the backbone config (model.backbone.config)")

    def _make_hook(self, name: str):
        def hook(module, args, output):
            if not self._recording:
                return
            if not (isinstance(output, tuple) and len(output) == 3):
                raise TypeError(f"router {name} ({type(module).__name__}) must return (router_logits, topk_weights, "
                                "topk_indices) for MoE balancing")
            logits, _, indices = output
            self._records.append((name, logits, indices))

        return hook

    class _Recording:
        def __init__(self, balancer, valid_mask):
            self.balancer, self.valid_mask = balancer, valid_mask

        def __enter__(self):
            b = self.balancer
            b._records, b._recording = [], True
            b._valid = None if self.valid_mask is None else self.valid_mask.reshape(-1)
            return b

        def __exit__(self, *exc):
            self.balancer._recording = False
            return False

    def recording(self, valid_mask: torch.Tensor | None = None) -> "_Recording":
        """Context manager: capture the routing decisions of the forward passes inside it."""
        return MoeBalancer._Recording(self, valid_mask)

    def _layer_terms(self):
        for name, logits, indices in self._records:
            E = logits.shape[-1]
            valid = self._valid
            if valid is not None and valid.numel() != logits.shape[0]:
                raise ValueError(f"valid_mask has {valid.numel()} positions but router {name} saw {logits.shape[0]} tokens")
            if valid is not None:
                logits, indices = logits[valid], indices[valid]
            yield name, E, logits, indices

    def load_balancing_loss(self) -> torch.Tensor | None:
        """``aux_loss_coeff * mean over layers of E * sum_i f_i P_i`` for the recorded forward, and the
        expert loads are accumulated for the next :meth:`update_bias`. None when no router ran.

        With :attr:`group` set (the data x context-parallel ranks, whose gradients are averaged), ``f_i`` and
        ``P_i`` are over the tokens of all ranks (Megatron-core reduces ``tokens_per_expert`` the same way): the
        counts are summed over the group, each rank contributes its tokens' share of ``P_i``, scaled by the group
        size so that the averaged gradient is the one of the loss on the whole global batch."""
        layers = list(self._layer_terms())
        self._records = []
        if not layers:
            return None
        stats = []                                   # per layer: expert loads, then the token count
        for name, E, logits, indices in layers:
            load = torch.bincount(indices.reshape(-1), minlength=E).to(torch.float32)
            self._loads[name] = self._loads.get(name, torch.zeros_like(load)) + load.detach()
            stats.append(torch.cat([load, torch.tensor([float(indices.shape[0])])]))
        world = 1
        if self.group is not None:                   # one collective for every layer, on every rank, always
            flat = torch.cat(stats).to(layers[0][2].device)
            dist.all_reduce(flat, group=self.group)
            stats = list(flat.split([E + 1 for _, E, _, _ in layers]))
            world = dist.get_world_size(self.group)
        terms = []
        for (name, E, logits, indices), total in zip(layers, stats):
            load, n_tokens = total[:E], float(total[E])
            if n_tokens == 0:
                continue
            top_k = indices.shape[1]
            scores = logits.float().sigmoid()
            probs = scores / (scores.sum(-1, keepdim=True) + 1e-20)  # Megatron-core: normalised sigmoid scores
            f = load.to(probs.device) / (n_tokens * top_k)
            P = probs.sum(0) / n_tokens                  # this rank's tokens' share of the global mean
            terms.append(E * (f * P).sum() * world)
        if not terms:
            return None
        return self.aux_loss_coeff * torch.stack(terms).mean()

    @torch.no_grad()
    def update_bias(self) -> dict[str, float]:
        """Move each router's correction bias toward balanced load (call after the optimizer step).
        Returns the max/mean load imbalance (max load / mean load) seen since the last update."""
        imbalance = []
        for name, router in self.routers:
            load = self._loads.get(name)
            if self.group is not None:    # every rank moves the bias by the same, global load (DP x CP)
                n_experts = router.e_score_correction_bias.numel()
                load = torch.zeros(n_experts, dtype=torch.float32) if load is None else load.clone()
                dist.all_reduce(load, group=self.group)
            if load is None or float(load.sum()) == 0:
                continue
            bias = router.e_score_correction_bias
            offset = load.mean() - load.to(bias.device)
            bias.add_(torch.sign(offset).to(bias.dtype) * self.bias_update_rate)
            imbalance.append(float(load.max() / load.mean()))
        self._loads = {}
        self.last_update_stats = {} if not imbalance else {
            "moe_max_load_over_mean": max(imbalance), "moe_mean_load_over_mean": sum(imbalance) / len(imbalance)}
        return self.last_update_stats
