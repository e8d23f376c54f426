"""Training with engine ``megatron``: megatron-core's parallel state, DDP, distributed optimizer and grad finalisation.

The training hook, in the order a step needs it (written against megatron-core 0.16.1)::

    init_model_parallel(p)                       # torch.distributed + parallel_state (TP, CP, EP, ETP, PP sizes)
    model = AudexModel(cfg)                      # engine megatron: the backbone reads the sizes from parallel_state
    trainer = MegatronTrainer(model.llm.lm, lr=1e-4, weight_decay=0.1, clip_grad=1.0)
    loss = trainer.step(lambda: model.compute_loss(batch)[0])

:class:`MegatronTrainer` wraps the megatron-core model in megatron's ``DistributedDataParallel`` (contiguous grad
buffers; ``use_distributed_optimizer`` shards the optimizer state over the data-parallel ranks, ZeRO-1), builds
``get_megatron_optimizer`` (Adam, global-norm clipping over all model-parallel ranks), and after the backward calls
``finalize_model_grads``: the data-parallel grad all-reduce (or reduce-scatter), the sequence-parallel norm grads,
and the router's aux-loss-free expert-bias update from the token counts all-reduced over TP x CP x DP. Parameters
outside the megatron-core model (the audio adapter) keep their own torch optimizer and are all-reduced over the
data-parallel group by :func:`all_reduce_outside_grads`. megatron-core's optimizers and clipping allocate CUDA
tensors; on CPU (``optimizer='torch'``) torch's AdamW steps on megatron DDP's reduced ``main_grad`` buffers,
without clipping, so that DDP and ``finalize_model_grads`` still run (tests/parallel/test_megatron_engine.py).

:class:`MegatronStrategy` is the Lightning side: a ``DDPStrategy`` whose environment set-up also initialises the
model parallel state, which wraps the backbone in megatron's DDP instead of the module in torch's, and which
finishes the grads after each backward (:func:`finish_grads`) for the module's own optimizer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from audex.parallel.config import ParallelismConfig


def init_model_parallel(p: ParallelismConfig, seed: int = 1234) -> None:
    """Initialise torch.distributed (from the usual env variables, nccl on GPU, gloo on CPU) if needed, then
    megatron-core's model parallel groups with the sizes of ``p``. Idempotent: engine ``megatron`` builds its
    model inside the parallel state, so a script launched by torchrun calls this before building ``AudexModel``,
    and :class:`MegatronStrategy` calls it again (a check that the sizes agree)."""
    from megatron.core import parallel_state as ps

    if dist.is_initialized() and ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size(),
                ps.get_expert_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if have != (p.tensor, p.context, p.expert, p.pipeline):
            raise ValueError(f"megatron-core's parallel state has (TP, CP, EP, PP) = {have}, the config asks for "
                             f"{(p.tensor, p.context, p.expert, p.pipeline)}")
        return
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size()
    if p.world_size is not None and p.world_size != world:
        raise ValueError(f"parallelism.world_size={p.world_size} but {world} processes were launched")
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline, context_parallel_size=p.context,
        expert_model_parallel_size=p.expert, expert_tensor_parallel_size=p.expert_tensor_size)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def finish_grads(ddps, outside=()) -> None:
    """After the backward of a step: megatron's ``finalize_model_grads`` on the DDP-wrapped models (DP grad
    reduce, SP norm grads, router expert-bias update), the reduced ``main_grad`` buffers handed to ``.grad`` for a
    torch optimizer, and the data-parallel average of the ``outside`` parameters' grads."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(list(ddps))
    for ddp in ddps:
        for p in ddp.module.parameters():
            if p.requires_grad and getattr(p, "main_grad", None) is not None:
                p.grad = p.main_grad.to(p.dtype)
    all_reduce_outside_grads(outside)


def all_reduce_outside_grads(params, average: bool = True) -> None:
    """Average the grads of trainable parameters that megatron-core's DDP does not own over the data-parallel
    (x context-parallel) group."""
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group(with_context_parallel=True)
    size = dist.get_world_size(group)
    for p in params:
        if p.grad is not None and size > 1:
            dist.all_reduce(p.grad, group=group)
            if average:
                p.grad.div_(size)


class MegatronTrainer:
    """megatron-core DDP + distributed optimizer around a :class:`~audex.modules.megatron_backbone.MegatronCausalLM`.
    The LM keeps calling ``lm.mcore`` directly: megatron's DDP works through hooks on the parameters (grads go to
    its contiguous ``main_grad`` buffers), and without overlapped parameter gathering its forward adds nothing."""

    def __init__(self, lm, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8,
                 clip_grad: float = 1.0, distributed_optimizer: bool = True, overlap: bool = False,
                 optimizer: str | None = None):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.lm = lm
        module = lm.mcore
        self.kind = optimizer or ("megatron" if torch.cuda.is_available() else "torch")
        if self.kind not in ("megatron", "torch"):
            raise ValueError(f"optimizer={optimizer!r}: use 'megatron' (CUDA) or 'torch' (CPU)")
        if self.kind == "torch" and (clip_grad or distributed_optimizer):
            raise ValueError("megatron-core's optimizers and grad clipping allocate CUDA tensors; the CPU path "
                             "(optimizer='torch') needs clip_grad=0 and distributed_optimizer=False")
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer, overlap_grad_reduce=overlap,
            overlap_param_gather=overlap, check_for_nan_in_grad=False, bucket_size=None)
        self.ddp = DistributedDataParallel(config=module.config, ddp_config=ddp_config, module=module)
        if self.kind == "torch":
            self.params = [p for p in module.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
            return
        opt_config = OptimizerConfig(
            optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0], adam_beta2=betas[1], adam_eps=eps,
            clip_grad=clip_grad, use_distributed_optimizer=distributed_optimizer, bf16=module.config.bf16,
            params_dtype=module.config.params_dtype)
        self.optimizer = get_megatron_optimizer(opt_config, [self.ddp])

    def step(self, loss_fn) -> tuple[torch.Tensor, float | None]:
        """One optimizer step: zero the grad buffers, ``loss_fn().backward()``, finalise grads (DP reduce, SP
        norms, router expert bias), clip by the global norm and update. Returns ``(loss, grad_norm)``."""
        from megatron.core.distributed import finalize_model_grads

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        if self.kind == "torch":  # the reduced grads live in megatron DDP's main_grad buffers
            finish_grads([self.ddp])
            self.optimizer.step()
            return loss.detach(), None
        finalize_model_grads([self.ddp])
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError("megatron optimizer skipped the step (inf/nan gradients)")
        return loss.detach(), grad_norm


class MegatronStrategy(DDPStrategy):
    """Lightning strategy for engine ``megatron``: DDP's process launch and environment, plus megatron-core's
    model parallel state. The LightningModule is not wrapped in torch DDP: each megatron-core model inside it
    (``lm.mcore`` of a ``MegatronCausalLM``) is wrapped in megatron's DDP, and after every backward
    :func:`finish_grads` reduces its grads (and the other trainable parameters' over data parallel) for the
    module's own torch optimizer. Gradient accumulation and Lightning's grad clipping (a local norm under TP) are
    refused. Written against megatron-core 0.16.1 and Lightning 2.x; its grad path is the one
    :class:`MegatronTrainer` runs in the CPU tests, the Lightning launch itself has not been run."""

    strategy_name = "audex_megatron"

    def __init__(self, parallelism: ParallelismConfig | dict, **kwargs):
        super().__init__(**kwargs)
        self.parallelism = parallelism if isinstance(parallelism, ParallelismConfig) else \
            ParallelismConfig.from_dict(parallelism)
        self._ddps, self._outside = [], []

    def setup_environment(self) -> None:
        super().setup_environment()
        init_model_parallel(self.parallelism)

    def configure_ddp(self) -> None:
        """megatron's DDP around every megatron-core model; no torch DDP around the LightningModule."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        trainer = self.lightning_module.trainer
        if trainer.accumulate_grad_batches != 1 or trainer.gradient_clip_val:
            raise ValueError("MegatronStrategy reduces grads after every backward and has no global-norm clipping "
                             "for a torch optimizer: set accumulate_grad_batches=1 and gradient_clip_val=null")
        owned = set()
        for module in self.lightning_module.modules():
            mcore = getattr(module, "mcore", None)
            if mcore is not None and hasattr(module, "hf_state_dict"):
                config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False,
                                                       check_for_nan_in_grad=False, bucket_size=None)
                self._ddps.append(DistributedDataParallel(config=mcore.config, ddp_config=config, module=mcore))
                owned.update(id(p) for p in mcore.parameters())
        if not self._ddps:
            raise ValueError("MegatronStrategy found no megatron-core model: set model.backbone.engine=megatron")
        self._outside = [p for p in self.lightning_module.parameters() if p.requires_grad and id(p) not in owned]

    def post_backward(self, closure_loss):
        finish_grads(self._ddps, self._outside)
        return super().post_backward(closure_loss)

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        for ddp in self._ddps:
            ddp.zero_grad_buffer()
        return out

    def teardown(self) -> None:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        super().teardown()
