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
model parallel state, which wraps the backbone in megatron's DDP instead of the module in torch's, finishes the
grads once per optimizer step (:func:`finish_grads`, after the last micro-batch's backward, so gradient
accumulation sums into megatron's ``main_grad`` buffers) for the module's own torch optimizer, and clips by the
global norm over the model-parallel ranks (:func:`clip_grads_global`). ``audex.training.run.train_stage`` selects
it for engine ``megatron`` (:mod:`audex.training.megatron_run`), launched by torchrun.

What ran: tests/parallel/test_megatron_lightning.py, on CPU over gloo: a tiny Llama stage with
``parallelism.tensor=2`` under torchrun (2 processes), 4 optimizer steps of 2 accumulated micro-batches with
global-norm clipping at 1.0 and AdamW: every micro-batch's loss within 1e-6 of one process (measured 9.5e-7),
the global norms equal to one process's; its ``.nemo`` restores in one process (engine hf), bit-equal to the
last sharded checkpoint; killed at micro-batch 5 and rerun, it resumes from the step-2 checkpoint with the
uninterrupted run's losses (measured bit-equal). What has not run: any GPU (nccl, bf16), Transformer Engine specs,
megatron's distributed optimizer or its ``get_megatron_optimizer`` under Lightning (this strategy steps the
LightningModule's torch optimizer), EP or Mamba layers through Lightning (their sharded checkpoints included),
sequence or context parallelism on this engine, and resuming with a different layout than the one saved.

Checkpoints are sharded (:mod:`audex.parallel.megatron_checkpoint`): a folder written by megatron-core's
dist-checkpointing (torch_dist backend), each rank writing its own TP/EP slices of the weights and of its AdamW
moments, rank 0 Lightning's loop, scheduler and data-loader state; a rerun of the same command resumes from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from audex.parallel.config import ParallelismConfig
from audex.parallel.megatron_checkpoint import load_sharded, save_sharded
from audex.parallel.megatron_moe import set_aux_loss_scale


def init_model_parallel(p: ParallelismConfig, seed: int = 1234, backend: str | None = None) -> None:
    """Initialise torch.distributed (from the usual env variables; ``backend`` default nccl on GPU, gloo on CPU)
    if needed, then megatron-core's model parallel groups with the sizes of ``p``. Idempotent: engine ``megatron``
    builds its model inside the parallel state, so ``train_stage`` (launched by torchrun) calls this before
    building ``AudexModel``, and :class:`MegatronStrategy` calls it again (a check that the sizes agree)."""
    from megatron.core import parallel_state as ps

    if dist.is_initialized() and ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size(),
                ps.get_expert_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if have != (p.tensor, p.context, p.expert, p.pipeline):
            raise ValueError(f"megatron-core's parallel state has (TP, CP, EP, PP) = {have}, the config asks for "
                             f"{(p.tensor, p.context, p.expert, p.pipeline)}")
        return
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
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
    (x context-parallel) group. Data-parallel ranks read other rows, so the audio adapter may have run on some of
    them only: the ranks first agree which parameters have a grad anywhere (a rank without one adds zeros, as one
    process accumulating those rows would); a parameter no rank used keeps ``grad=None`` (AdamW skips it)."""
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group(with_context_parallel=True)
    size = dist.get_world_size(group)
    params = list(params)
    if size == 1 or not params:
        return
    used = torch.tensor([float(p.grad is not None) for p in params])
    dist.all_reduce(used, op=dist.ReduceOp.MAX, group=group)
    for p, anywhere in zip(params, used.tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=group)
        if average:
            p.grad.div_(size)


def clip_grads_global(params, max_norm: float) -> torch.Tensor:
    """Scale the grads so that their L2 norm over the whole model (every model-parallel rank) is at most
    ``max_norm``; returns the norm before. Megatron's own ``clip_grad_norm_fp32`` allocates CUDA tensors, so this is
    its arithmetic in plain torch: a tensor-parallel shard counts on every TP rank, a replicated tensor (norms, the
    audio adapter) on TP rank 0 only, summed over the model-parallel group; routed-expert weights (megatron's
    ``allreduce=False``) over the expert x expert-TP x pipeline group. Grads are already data-parallel reduced."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    grads, dense, expert = [], None, None
    for p in params:
        if p.grad is None:
            continue
        grads.append(p.grad)
        square = torch.linalg.vector_norm(p.grad, dtype=torch.float32).double() ** 2
        if dense is None:
            dense, expert = torch.zeros_like(square), torch.zeros_like(square)
        if not getattr(p, "allreduce", True):
            if getattr(p, "tensor_model_parallel", False) or ps.get_expert_tensor_parallel_rank() == 0:
                expert += square
        elif param_is_not_tensor_parallel_duplicate(p):
            dense += square
    if not grads:
        return torch.zeros(())
    dist.all_reduce(dense, group=ps.get_model_parallel_group())
    dist.all_reduce(expert, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    total = (dense + expert).sqrt()
    coef = min(float(max_norm) / (float(total) + 1e-6), 1.0)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


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
        set_aux_loss_scale(1)
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
    """Lightning strategy for engine ``megatron``: DDP's environment (the processes come from torchrun, see
    :mod:`audex.training.megatron_run`), plus megatron-core's model parallel state. The LightningModule is not
    wrapped in torch DDP: each megatron-core model inside it (``lm.mcore`` of a ``MegatronCausalLM``) is wrapped in
    megatron's DDP, whose hooks accumulate every micro-batch's grads in its ``main_grad`` buffers; after the last
    micro-batch of an optimizer step :func:`finish_grads` reduces them (and the other trainable parameters' grads
    over data parallel) for the module's own torch optimizer. ``gradient_clip_algorithm: norm`` clips by the global
    norm (:func:`clip_grads_global`, also kept as ``last_grad_norm``); ``value`` clips element-wise, the same on
    every rank. Checkpoints are megatron-core distributed checkpoints (:meth:`save_checkpoint`,
    :meth:`load_checkpoint`), so a killed TP/EP run resumes. Tested on CPU only (module docstring)."""

    strategy_name = "audex_megatron"

    def __init__(self, parallelism: ParallelismConfig | dict, **kwargs):
        super().__init__(**kwargs)
        self.parallelism = parallelism if isinstance(parallelism, ParallelismConfig) else \
            ParallelismConfig.from_dict(parallelism)
        self._ddps, self._outside = [], []
        self._owns_state = False
        self.last_grad_norm: float | None = None

    def _configure_launcher(self) -> None:
        """One process that torchrun did not start (``train_stage`` made its one-rank group): no launcher.
        Lightning's subprocess launcher would write ``LOCAL_RANK``, ``NODE_RANK`` and ``MASTER_PORT`` into this
        process's environment and leave them there, and a multi-process Lightning run started from this process
        afterwards would take its processes for externally started and wait for ranks that never come."""
        if self.num_processes * self.num_nodes == 1 and not self.cluster_environment.creates_processes_externally:
            self._launcher = None
            return
        super()._configure_launcher()

    def setup_environment(self) -> None:
        from megatron.core import parallel_state as ps

        super().setup_environment()
        self._owns_state = not ps.model_parallel_is_initialized()   # else train_stage made it and tears it down
        init_model_parallel(self.parallelism)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        # Lightning's norm clipping sees this rank's shards only: the precision plugin clips globally instead
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm

    def _clip_grad_by_norm(self, optimizer, clip_val) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.last_grad_norm = float(clip_grads_global(params, float(clip_val)))

    def configure_ddp(self) -> None:
        """megatron's DDP around every megatron-core model; no torch DDP around the LightningModule."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

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

    def training_step(self, *args, **kwargs):
        """The micro-batch's forward and loss; megatron's MoE load-balancing loss first gets its gradient scale,
        ``1 / micro-batches per step``, the factor Lightning applies to the main loss."""
        set_aux_loss_scale(self.lightning_module.trainer.accumulate_grad_batches)
        return super().training_step(*args, **kwargs)

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        """The closure (the last micro-batch's forward and backward) is followed by :func:`finish_grads`, before
        Lightning's ``on_before_optimizer_step`` hooks and clipping see the grads; after the step the grad
        buffers are zeroed for the next accumulation."""
        def closure_then_finish():
            out = closure()
            finish_grads(self._ddps, self._outside)
            return out

        out = super().optimizer_step(optimizer, closure_then_finish, model, **kwargs)
        for ddp in self._ddps:
            ddp.zero_grad_buffer()
            for p in ddp.module.parameters():
                p.grad = None        # it aliased main_grad: the next backward must start from the hooks
        return out

    # ---- sharded checkpoints (audex.parallel.megatron_checkpoint) ----------------------------------
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """Resume after ``setup``: the optimizers must exist to receive their sharded states."""
        return True

    def lightning_module_state_dict(self) -> dict:
        """Nothing gathered: :meth:`save_checkpoint` writes the sharded weights from the live module (the
        whole-tensor state dict would be a TP/EP gather at every checkpoint; the ``.nemo`` holds it)."""
        return {}

    def optimizer_state(self, optimizer) -> dict:
        """Nothing here: :meth:`save_checkpoint` writes each rank's optimizer shards."""
        return {}

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """A megatron-core distributed checkpoint folder at ``filepath``: every rank writes its shards of the
        weights and of its optimizer state; rank 0 adds Lightning's loop, scheduler and callback state."""
        if storage_options is not None:
            raise TypeError("MegatronStrategy.save_checkpoint(..., storage_options=...) is not supported: its "
                            "checkpoints are written by megatron-core's dist-checkpointing, not a CheckpointIO")
        path = Path(self.broadcast(str(filepath)))
        save_sharded(self.lightning_module, self.optimizers, checkpoint, path, self.is_global_zero)

    def load_checkpoint(self, checkpoint_path) -> dict:
        """Every rank reads its slices of the weights (into the module, in place) and of its optimizer state
        (returned as ``optimizer_states`` for Lightning's ``load_optimizer_state_dict``)."""
        path = Path(self.broadcast(str(checkpoint_path)))
        return load_sharded(self.lightning_module, self.optimizers, path)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        """Nothing: :meth:`load_checkpoint` already loaded the weights."""

    def teardown(self) -> None:
        from megatron.core import parallel_state as ps

        if self._owns_state:
            ps.destroy_model_parallel()
        super().teardown()
