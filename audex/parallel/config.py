"""The ``parallelism:`` block: one layout for both engines, checked before anything is built.

Sizes follow Megatron-core's naming and arithmetic, so the paper's recipe reads as it does there
(section 4.5: 512 H100s, TP4 · EP32 · CP8 · SP)::

    world = tensor · context · pipeline · data           (dense layers; data = DP)
    world = expert_tensor · expert · pipeline · expert_data   (routed-expert layers, "MoE parallel folding")

``data: null`` derives the data-parallel size from ``world_size``; ``fsdp`` is the size of the sharding group
inside the data-parallel group (FSDP2 / HSDP for engine ``hf``; 1 = replicate, as plain DDP). Sequence
parallelism shards the TP ranks' norm/dropout activations along the sequence, so it needs ``tensor > 1``.

Example::

    p = ParallelismConfig(world_size=512, tensor=4, sequence=True, expert=32, context=8)
    p.data                      # 16
    p.sample_pad_multiple       # 64 = 2 · CP · TP: each packed sample is padded to it (THD load balancing)
    p.check_model(dims)         # heads, KV heads, Mamba heads, experts, vocabulary against the sizes
    p.check_data(packing=True, max_length=262144)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

ENGINES = ("hf", "megatron")


class ParallelismError(ValueError):
    """An impossible layout: the message names the ``parallelism.*`` (or model/data) key and the fix."""


def check_engine(engine: str) -> str:
    """Validate ``model.backbone.engine`` (``megatron`` needs ``pip install 'audex[megatron]'``)."""
    if engine not in ENGINES:
        raise ParallelismError(f"model.backbone.engine={engine!r} is not an engine; use one of {list(ENGINES)}")
    return engine


@dataclass(frozen=True)
class ModelDims:
    """What a layout has to divide: read from a backbone config by :func:`audex.parallel.planner.model_dims`."""

    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    mamba_num_heads: int = 0            # 0: no Mamba layers
    mamba_groups: int = 0
    num_experts: int = 0                # routed experts; 0: dense
    experts_per_token: int = 0


@dataclass(frozen=True)
class ParallelismConfig:
    """Parallel layout sizes (the ``parallelism:`` config group). All sizes are group sizes, >= 1."""

    world_size: int | None = None       # null: trainer.devices x trainer.num_nodes at launch
    tensor: int = 1
    sequence: bool = False
    context: int = 1
    expert: int = 1
    expert_tensor: int | None = None    # null: = tensor (Megatron's default)
    pipeline: int = 1
    data: int | None = None             # null: world_size / (tensor x context x pipeline)
    fsdp: int = 1                       # shard group inside data parallel (engine hf); 1 = replicate
    distributed_optimizer: bool = True  # optimizer state sharded over the data-parallel ranks (ZeRO-1)
    recompute: bool = False             # full activation recomputation (the planner shows both)
    meta_init: bool = True              # engine hf, split model: ranks > 0 build the backbone on the meta device

    def __post_init__(self):
        for name in ("tensor", "context", "expert", "pipeline", "fsdp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParallelismError(f"parallelism.{name}={value!r} must be an integer >= 1")
        for name in ("world_size", "expert_tensor", "data"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ParallelismError(f"parallelism.{name}={value!r} must be an integer >= 1 or null")
        if self.sequence and self.tensor == 1:
            raise ParallelismError("parallelism.sequence=true needs parallelism.tensor > 1 (sequence parallelism "
                                   "splits the tensor-parallel ranks' activations); set sequence=false or tensor >= 2")
        model_parallel = self.tensor * self.context * self.pipeline
        if self.world_size is not None:
            if self.world_size % model_parallel:
                raise ParallelismError(
                    f"world_size {self.world_size} is not divisible by tensor x context x pipeline = {self.tensor} x "
                    f"{self.context} x {self.pipeline} = {model_parallel}; change parallelism sizes or the device count")
            derived = self.world_size // model_parallel
            if self.data is not None and self.data != derived:
                raise ParallelismError(
                    f"parallelism.data={self.data} but world_size {self.world_size} / (tensor x context x pipeline "
                    f"= {model_parallel}) = {derived}; set data=null to derive it")
            object.__setattr__(self, "data", derived)
            expert_group = self.expert_tensor_size * self.expert * self.pipeline
            if self.world_size % expert_group:
                raise ParallelismError(
                    f"world_size {self.world_size} is not divisible by expert_tensor x expert x pipeline = "
                    f"{self.expert_tensor_size} x {self.expert} x {self.pipeline} = {expert_group}; lower "
                    "parallelism.expert or set parallelism.expert_tensor=1")
        if self.data is not None and self.data % self.fsdp:
            raise ParallelismError(f"parallelism.fsdp={self.fsdp} must divide the data-parallel size {self.data}")

    @classmethod
    def from_dict(cls, cfg) -> "ParallelismConfig":
        """From the ``parallelism:`` node (a dict or DictConfig); unknown keys are an error, not ignored."""
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ParallelismError(f"unknown parallelism keys {unknown}; known: {sorted(known)}")
        return cls(**cfg)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def expert_tensor_size(self) -> int:
        return self.tensor if self.expert_tensor is None else self.expert_tensor

    @property
    def expert_data(self) -> int | None:
        """Data-parallel size of the routed-expert weights (their gradients/optimizer state reduce over it)."""
        if self.world_size is None:
            return None
        return self.world_size // (self.expert_tensor_size * self.expert * self.pipeline)

    @property
    def sample_pad_multiple(self) -> int:
        """Every packed sample is padded to this many tokens: 2·CP for the mirrored-halves split, times TP when
        sequence parallelism splits each half again (Megatron/TE THD rule); 1 without CP or SP."""
        multiple = 2 * self.context if self.context > 1 else 1
        return multiple * (self.tensor if self.sequence else 1)

    @property
    def is_trivial(self) -> bool:
        return (self.tensor, self.context, self.expert, self.pipeline, self.fsdp) == (1, 1, 1, 1, 1)

    def check_model(self, dims: ModelDims) -> None:
        """Refuse sizes the backbone cannot be split by (each error names the key and the numbers)."""
        tp = self.tensor
        if dims.num_attention_heads % tp:
            raise ParallelismError(f"parallelism.tensor={tp} must divide the {dims.num_attention_heads} attention heads")
        kv = dims.num_key_value_heads
        if kv >= tp and kv % tp:
            raise ParallelismError(f"parallelism.tensor={tp} must divide the {kv} KV heads (or be a multiple of them)")
        if kv < tp and tp % kv:
            raise ParallelismError(f"parallelism.tensor={tp} must be a multiple of the {kv} KV heads to replicate them")
        if dims.vocab_size % tp:
            raise ParallelismError(f"parallelism.tensor={tp} must divide the vocabulary of {dims.vocab_size} rows "
                                   "(vocab.pad_to_multiple_of pads it)")
        if dims.hidden_size % tp:
            raise ParallelismError(f"parallelism.tensor={tp} must divide the hidden size {dims.hidden_size}")
        if dims.mamba_num_heads and dims.mamba_num_heads % tp:
            raise ParallelismError(f"parallelism.tensor={tp} must divide the {dims.mamba_num_heads} Mamba heads")
        if dims.mamba_groups and dims.mamba_groups % tp:
            raise ParallelismError(f"parallelism.tensor={tp} must divide the {dims.mamba_groups} Mamba groups (n_groups)")
        if dims.num_layers % self.pipeline:
            raise ParallelismError(f"parallelism.pipeline={self.pipeline} must divide the {dims.num_layers} layers")
        if self.expert > 1 and not dims.num_experts:
            raise ParallelismError(f"parallelism.expert={self.expert} but the backbone has no routed experts (a dense "
                                   "model): set parallelism.expert=1")
        if dims.num_experts and self.expert > dims.num_experts:
            raise ParallelismError(f"parallelism.expert={self.expert} is larger than the {dims.num_experts} routed "
                                   "experts: every expert-parallel rank needs at least one expert")
        if dims.num_experts and dims.num_experts % self.expert:
            raise ParallelismError(f"parallelism.expert={self.expert} must divide the {dims.num_experts} routed experts")

    def check_data(self, packing: bool, max_length: int | None) -> None:
        """Context parallelism splits packed rows: it needs packing on and a row length the split divides."""
        if self.context == 1:
            return
        if not packing:
            raise ParallelismError(f"parallelism.context={self.context} splits packed rows, but data.packing.enabled is "
                                   "false: enable packing or set parallelism.context=1")
        if max_length is not None and max_length % self.sample_pad_multiple:
            raise ParallelismError(
                f"data.max_length={max_length} must be a multiple of {self.sample_pad_multiple} (2 x context"
                f"{' x tensor, sequence parallel' if self.sequence else ''}) so that every rank holds equal tokens")
