"""Engine ``hf``, split run (``parallelism.meta_init``): every rank reads only its own shards of the backbone,
straight from the safetensors files of ``model.backbone.pretrained_path`` (issue 11, point 2).

Every rank, rank 0 included, builds the backbone on the meta device
(:func:`audex.modules.backbone.backbone_on_meta` with ``read_shards=True``); ``configure_model`` applies the
TP/EP plans and FSDP2 to it (:func:`audex.parallel.sharding.parallelize_model`), allocates each rank's shards and
fills them with torch's ``dcp.load`` through ``HuggingFaceStorageReader``, which reads from each file only the
slices of the rank's DTensor shards (safetensors ``get_slice``). No rank ever holds the whole backbone.

What makes the result equal to one process's ``from_pretrained`` + vocabulary extension, bit for bit:

* key names: the backbone's state-dict keys are the checkpoint's keys (tied tables: the one name the checkpoint
  has); dtype: each slice is ``copy_``-ed into the model's dtype, the cast ``from_pretrained`` does;
* the extended vocabulary (section 3.1): the embedding (and untied head) rows below the checkpoint's vocabulary
  are read, the new rows are drawn as :func:`audex.modules.backbone.extend_vocabulary` draws them (same seeded
  generator, same order: every rank draws all of them and keeps its own), a head bias's new rows are zero;
* non-persistent buffers (rotary ``inv_freq``): recomputed by the model's own ``_init_weights``, the call
  ``from_pretrained`` makes for them.

:func:`sharded_read_refusal` decides, at build time and from the files alone (so every rank decides alike), when
this cannot hold: no safetensors files (``.bin`` only), a key transformers would rename, merge or initialise
(Nemotron-H's per-expert checkpoints, a base-model checkpoint without ``model.``), a shape that differs, mixed
parameter dtypes, a non-persistent buffer ``_init_weights`` does not recompute. Then rank 0 loads the whole model
and broadcasts it (:func:`audex.parallel.sharding.materialize_from_rank0`), and the reason is logged.

Example (what ``materialize_from_rank0`` calls on every rank, after the backbone was sharded)::

    lm.to_empty(device=device)
    read_backbone_shards(model.llm)
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

log = logging.getLogger(__name__)


def new_vocabulary_rows(old_size: int, new_size: int, dims: list[int], init_std: float = 0.02,
                        seed: int = 0) -> list[torch.Tensor]:
    """The new rows of each table (embedding, then the untied head: ``dims`` are their widths), float32
    ~ N(0, init_std), drawn one table after the other from one generator seeded with ``seed``: what
    :func:`audex.modules.backbone.extend_vocabulary` appends, and what :func:`read_backbone_shards` draws."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(new_size - old_size, dim, generator=gen, dtype=torch.float32) * init_std for dim in dims]


def checkpoint_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of every tensor in the folder's ``*.safetensors`` files (headers only)."""
    shapes = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def _tensors(lm) -> list[tuple[list[str], torch.Tensor]]:
    """Each distinct parameter / persistent buffer of ``lm`` with all its names (tied tables have two)."""
    by_id: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, t in lm.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(t), ([], t))[0].append(name)
    persistent = lm.state_dict(keep_vars=True)
    for name, t in lm.named_buffers(remove_duplicate=False):
        if name in persistent:
            by_id.setdefault(id(t), ([], t))[0].append(name)
    return list(by_id.values())


def _buffer_owners(lm) -> list:
    return [m for m in lm.modules() if any(getattr(m, b, None) is not None for b in m._non_persistent_buffers_set)]


def sharded_read_refusal(lm, folder: str | Path) -> str | None:
    """Why ``lm`` (built on the meta device from ``folder``'s config, before any vocabulary extension) cannot be
    filled shard by shard from the folder's safetensors files with the weights ``from_pretrained`` would give;
    None when it can. Reads file headers only."""
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        return f"{folder} has no .safetensors files (.bin checkpoints are read whole)"
    saved = checkpoint_shapes(folder)
    for names, t in _tensors(lm):
        found = [n for n in names if n in saved]
        if not found:
            return (f"{names[0]} is not a key of the checkpoint (transformers would rename, merge or initialise it "
                    "on load)")
        if saved[found[0]] != tuple(t.shape):
            return f"{found[0]}: checkpoint shape {saved[found[0]]}, model shape {tuple(t.shape)}"
    dtypes = {p.dtype for p in lm.parameters() if p.is_floating_point()}
    if len(dtypes) > 1:
        return f"the backbone mixes parameter dtypes {sorted(map(str, dtypes))}"
    for module in _buffer_owners(lm):
        name = type(module).__name__
        if any(True for _ in module.parameters(recurse=False)):
            return f"{name} has parameters beside its non-persistent buffers"
        probe = copy.deepcopy(module).to_empty(device="cpu")
        for b in probe._non_persistent_buffers_set:
            if getattr(probe, b, None) is not None and getattr(probe, b).is_floating_point():
                getattr(probe, b).fill_(float("nan"))
        lm._init_weights(probe)
        if any(getattr(probe, b).isnan().any() for b in probe._non_persistent_buffers_set
               if getattr(probe, b, None) is not None and getattr(probe, b).is_floating_point()):
            return f"the model's _init_weights does not recompute the non-persistent buffers of {name}"
    return None


class _RowBlock:
    """Rows ``[offsets[0], offsets[0] + len(local))`` of a checkpoint tensor of ``size`` (the rows of an extended
    table that lie inside the checkpoint's vocabulary), read into ``local``; what DCP's planner asks of a target."""

    def __init__(self, local: torch.Tensor, offsets: tuple[int, ...], size: tuple[int, ...]):
        self.local, self.offsets, self._size = local, offsets, torch.Size(size)

    def size(self) -> torch.Size:
        return self._size

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        if self.local.numel() == 0:
            return []
        return [ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.local.shape)]


class _Planner(DefaultLoadPlanner):
    """DCP's default load planner, with :class:`_RowBlock` targets (which its state-dict walk would drop)."""

    def __init__(self):
        super().__init__(flatten_state_dict=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        blocks = {k: v for k, v in state_dict.items() if isinstance(v, _RowBlock)}
        super().set_up_planner({k: v for k, v in state_dict.items() if k not in blocks}, metadata, is_coordinator)
        self.state_dict.update(blocks)

    def lookup_tensor(self, index):
        obj = self.state_dict[index.fqn]
        return obj.local if isinstance(obj, _RowBlock) else super().lookup_tensor(index)


def _block(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """This rank's local tensor of ``t`` and its offsets in the global tensor (a DTensor's shard is one block)."""
    if isinstance(t, DTensor):
        sizes, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        local = t.to_local()
        if tuple(local.shape) != tuple(sizes):
            raise RuntimeError(f"local shard {tuple(local.shape)} is not the block {tuple(sizes)} DCP expects")
        return local, tuple(offsets)
    return t, (0,) * t.dim()


@torch.no_grad()
def read_backbone_shards(backbone) -> dict:
    """Fill ``backbone`` (an :class:`~audex.modules.backbone.AudexBackbone` built with ``read_shards``, sharded,
    its tensors allocated by ``to_empty``) from ``backbone.sharded_source``; collective over the default group.
    Returns what was read (also kept as ``backbone.read_report``)."""
    source, lm = backbone.sharded_source, backbone.lm
    saved = checkpoint_shapes(source["folder"])
    emb = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings()
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))     # as extend_vocabulary decides
    if tied and head is not None and head.weight is not emb:
        raise RuntimeError("the tied embedding and head are two tensors after sharding")
    tables = [emb] + ([head.weight] if head is not None and not tied else [])
    extra = None
    state, tails, local_bytes = {}, [], 0
    for names, t in _tensors(lm):
        if t.is_meta:
            raise RuntimeError(f"{names[0]} is still on the meta device: allocate the shards (to_empty) first")
        key = next(n for n in names if n in saved)
        shape = saved[key]
        local, offsets = _block(t)
        local_bytes += local.numel() * local.element_size()
        if tuple(t.shape) == shape:
            if not isinstance(t, DTensor) and tuple(local.shape) != shape:
                raise RuntimeError(f"{key} is a plain tensor of shape {tuple(local.shape)}, not the whole {shape}")
            state[key] = t
            continue
        is_bias = head is not None and t is getattr(head, "bias", None)
        if not (is_bias or any(t is w for w in tables)) or shape[1:] != tuple(t.shape[1:]) or shape[0] > t.shape[0]:
            raise RuntimeError(f"{key}: checkpoint shape {shape}, model shape {tuple(t.shape)}")
        if not isinstance(t, DTensor) and t.shape[0] != lm.config.vocab_size:
            raise RuntimeError(f"{key} is a plain tensor of {t.shape[0]} rows, not the whole vocabulary")
        old = shape[0]
        inside = max(0, min(offsets[0] + local.shape[0], old) - offsets[0])
        state[key] = _RowBlock(local[:inside], offsets, shape)
        if inside < local.shape[0]:
            tail, start = local[inside:], (max(offsets[0], old) - old, *offsets[1:])
            if is_bias:
                tail.zero_()
                continue
            if extra is None:   # extend_vocabulary's draws: the embedding's new rows, then the untied head's
                extra = new_vocabulary_rows(old, int(emb.shape[0]), [int(w.shape[1]) for w in tables],
                                            source["init_std"], source["init_seed"])
            rows = extra[next(i for i, w in enumerate(tables) if t is w)]
            tails.append((tail, rows[tuple(slice(s, s + n) for s, n in zip(start, tail.shape))]))
    dcp.load(state, storage_reader=HuggingFaceStorageReader(source["folder"]), planner=_Planner())
    for tail, rows in tails:
        tail.copy_(rows)        # float32 draws cast to the model's dtype, as extend_vocabulary casts them
    for module in _buffer_owners(lm):     # rotary inv_freq: what from_pretrained's _init_weights computes
        lm._init_weights(module)
    backbone.read_report = {"source": "safetensors", "tensors": len(state), "local_bytes": local_bytes,
                            "new_rows_drawn": extra is not None}
    log.info("backbone: %d tensors of %s read shard by shard (%.1f MB on this rank)", len(state), source["folder"],
             local_bytes / 2**20)
    return backbone.read_report
