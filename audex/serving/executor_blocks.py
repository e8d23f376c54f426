"""KV block reuse and the scheduling rules of TensorRT-LLM's in-flight batcher, for the reference executor.

:mod:`audex.serving.reference_executor` uses these to behave like the pinned release (``TRTLLM_VERSION``) where that
behaviour decides whether Audex's serving is right:

* **block reuse** (``KvCacheConfig.enable_block_reuse``, on by default): the cache is cut into blocks of
  ``tokens_per_block`` tokens; a full block is keyed by its *unique tokens* -- ``(token id, extra id)`` pairs, the
  extra id from ``PromptTuningConfig.input_token_extra_ids`` or 0 -- chained to the key of the block before it
  (``kvCacheManager.cpp``, ``BlockKey``). A new request reuses the cached keys/values of the longest run of matching
  full blocks of its prompt less its last token, whatever embeddings produced them: two clips that enter through
  the same fake prompt-table ids and the same extra ids share blocks, and the second gets the first one's cache.
* **skip on a shared first block** (``capacityScheduler.cpp``, ``beneficialToSkip``): under block reuse the
  guaranteed-no-evict scheduler skips a context request for one step when its first block not yet cached is the
  first new block of a context request scheduled earlier in the same step.
* **KV capacity** (``capacityScheduler.cpp``, ``GuaranteedNoEvictScheduler``): a request reserves the blocks of its
  prompt and all its output tokens; a waiting context that does not fit what running requests left ends the step's
  scheduling (the cache is bounded when ``KvCacheConfig.max_tokens`` is set).
* **token budget** (``microBatchScheduler.cpp``): without chunked context a context request costs its whole prompt
  (reused blocks included), a generation request one token; requests are taken in arrival order and the first one
  that does not fit in ``max_num_tokens`` ends the step's batch.

Written by hand because nothing in PyTorch or transformers models TensorRT-LLM's block manager; keys here are
Python hashes (the real ones are 64-bit hashes of the same data), and only full blocks are reused (partial reuse,
``enable_partial_reuse``, is not modelled).
"""

from __future__ import annotations

import collections
from typing import Sequence

import torch
from transformers.cache_utils import DynamicLayer

TRTLLM_VERSION = "1.2.0rc2"          # the TensorRT-LLM release every binding name and rule here was read from
DEFAULT_TOKENS_PER_BLOCK = 32         # BuildConfig.plugin_config.tokens_per_block / KvCacheConfig.tokens_per_block


def unique_tokens(token_ids: Sequence[int], extra_ids: Sequence[int] | None) -> list[tuple[int, int]]:
    """``(token, extra id)`` per position (extra id 0 when the request has none)."""
    if extra_ids is None:
        return [(int(t), 0) for t in token_ids]
    return [(int(t), int(e)) for t, e in zip(token_ids, extra_ids)]


def block_keys(tokens: Sequence[tuple[int, int]], tokens_per_block: int) -> list[int]:
    """Chained keys of the full blocks of ``tokens``."""
    keys, parent = [], 0
    for start in range(0, len(tokens) - tokens_per_block + 1, tokens_per_block):
        parent = hash((parent, tuple(tokens[start:start + tokens_per_block])))
        keys.append(parent)
    return keys


class BlockStore:
    """Reusable KV blocks: key -> per-layer ``(keys, values)`` of that block's positions (oldest dropped first)."""

    def __init__(self, tokens_per_block: int = DEFAULT_TOKENS_PER_BLOCK, max_blocks: int = 4096):
        if tokens_per_block < 1:
            raise ValueError(f"tokens_per_block must be >= 1, got {tokens_per_block}")
        self.tokens_per_block = int(tokens_per_block)
        self.max_blocks = int(max_blocks)
        self.blocks: collections.OrderedDict[int, list[tuple[torch.Tensor, torch.Tensor]]] = collections.OrderedDict()
        self.reused_blocks = 0

    def reusable(self, tokens: Sequence[tuple[int, int]]) -> list[int]:
        """Keys of the cached leading full blocks of the prompt less its last token (always recomputed)."""
        hits = []
        for key in block_keys(tokens[:-1], self.tokens_per_block):
            if key not in self.blocks:
                break
            hits.append(key)
        return hits

    def first_new_block(self, tokens: Sequence[tuple[int, int]]) -> int | None:
        """Key of the first full block of the whole prompt that is not cached (None when there is none):
        ``WindowBlockManager::findNewContextBlock``."""
        for key in block_keys(tokens, self.tokens_per_block):
            if key not in self.blocks:
                return key
        return None

    def load(self, keys: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer keys/values of ``keys`` concatenated along the sequence."""
        self.reused_blocks += len(keys)
        per_block = [self.blocks[k] for k in keys]
        for k in keys:
            self.blocks.move_to_end(k)
        return [(torch.cat([b[i][0] for b in per_block], dim=-2), torch.cat([b[i][1] for b in per_block], dim=-2))
                for i in range(len(per_block[0]))]

    def store(self, tokens: Sequence[tuple[int, int]], layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the full blocks of a finished context (``layers``: per-layer ``[1, heads, seq, dim]`` keys/values)."""
        n = self.tokens_per_block
        for i, key in enumerate(block_keys(tokens, n)):
            if key not in self.blocks:
                self.blocks[key] = [(k[..., i * n:(i + 1) * n, :].clone(), v[..., i * n:(i + 1) * n, :].clone())
                                    for k, v in layers]
            self.blocks.move_to_end(key)
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)


def plain_layers(cache) -> list | None:
    """Per-layer ``(keys, values)`` of a transformers cache made only of plain attention layers; None for hybrid
    (Mamba) caches, whose state is not a per-position tensor: the reference does not reuse blocks for those."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer) is DynamicLayer for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


def blocks_to_completion(prompt_len: int, max_tokens: int, tokens_per_block: int) -> int:
    """KV blocks the guaranteed-no-evict scheduler reserves for a request: its prompt and all its output tokens."""
    return -(-(prompt_len + max_tokens) // tokens_per_block)


def check_table(table: torch.Tensor, max_prompt_vocab_size: int, dtype: torch.dtype) -> None:
    """``PromptTuningBuffers::validate``, run when a context enters the step (it fails the whole iteration): at most
    ``max_prompt_embedding_table_size // max_batch_size`` rows per request, in the weights' dtype."""
    rows = int(table.shape[0])
    if rows > max_prompt_vocab_size:
        raise RuntimeError(f"Prompt vocab size{rows} is larger than max prompt vocab size of {max_prompt_vocab_size}. "
                           "Max prompt vocab size is computed from max_prompt_embedding_table_size / max_batch_size. ")
    if table.dtype != dtype:
        raise RuntimeError("Request embedding table data type doesn't match model weight data type.")


def schedule_contexts(waiting: Sequence, free_slots: int, running: int, max_num_tokens: int | None,
                      first_new_block, free_blocks: int | None = None) -> tuple[list, list]:
    """One step of the guaranteed-no-evict capacity scheduler + the micro-batch scheduler over waiting contexts.

    Args:
        waiting: context requests in arrival order (anything with ``prompt_len`` and ``blocks``, the KV blocks it
            reserves to completion).
        free_slots: batch slots left after the running requests.
        running: generation requests of the step (one token each against ``max_num_tokens``).
        max_num_tokens: the step's token budget (None: unbounded).
        first_new_block: ``request -> key or None`` (None when block reuse is off or nothing new is full).
        free_blocks: KV blocks not reserved by running requests (None: the cache is not bounded); the first context
            that does not fit ends the step's scheduling (``GuaranteedNoEvictScheduler``).

    Returns:
        ``(scheduled, skipped)``: the contexts that run this step, and those skipped for a shared first new block.
    """
    scheduled, skipped, contributed = [], [], set()
    budget = running
    for req in waiting:
        key = first_new_block(req)
        if key is not None and key in contributed:
            skipped.append(req)
            continue
        if len(scheduled) >= free_slots:
            break
        if free_blocks is not None:
            if req.blocks > free_blocks:
                break
            free_blocks -= req.blocks
        if max_num_tokens is not None and budget + req.prompt_len > max_num_tokens:
            break
        if key is not None:
            contributed.add(key)
        budget += req.prompt_len
        scheduled.append(req)
    return scheduled, skipped
