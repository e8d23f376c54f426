"""What :class:`~audex.serving.guided_executor.GuidedExecutor` needs to know of the engine behind an executor, and a
clip's extra id for KV block reuse.

Read from the reference executor (:mod:`audex.serving.reference_executor`) or from a TensorRT-LLM engine folder's
``config.json`` (``pretrained_config`` and ``build_config``, as ``trtllm-build`` of the pinned release writes them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class EngineFacts:
    """What the router needs to know of the engine: ``block_reuse`` (``KvCacheConfig.enable_block_reuse``),
    ``max_num_tokens`` (the step's token budget), ``vocab_size`` (prompt ids from it on are prompt-table rows), and the
    ``hidden_size`` / ``dtype`` of a prompt table (a CFG twin under block reuse gets a one-row table to carry its extra
    ids), and the KV cache's ``kv_blocks`` of ``tokens_per_block`` tokens when it is bounded
    (``KvCacheConfig.max_tokens``; the guaranteed-no-evict scheduler reserves a request's blocks to completion)."""

    vocab_size: int
    block_reuse: bool = False
    max_num_tokens: int | None = None
    hidden_size: int | None = None
    dtype: torch.dtype = torch.float32
    kv_blocks: int | None = None
    tokens_per_block: int = 32

    def blocks(self, prompt_len: int, max_new_tokens: int) -> int:
        return -(-(prompt_len + max_new_tokens) // self.tokens_per_block)


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def engine_facts(executor, model_path, config, vocab_size: int) -> EngineFacts:
    """:class:`EngineFacts` from the reference executor, or from a TensorRT-LLM engine folder's ``config.json``
    (``pretrained_config.hidden_size`` / ``dtype``, ``build_config.max_num_tokens``)."""
    kv = getattr(config, "kv_cache_config", None)
    reuse = bool(getattr(kv, "enable_block_reuse", True))
    budget = getattr(config, "max_num_tokens", None)
    if hasattr(executor, "engine") and hasattr(executor, "lm"):                   # audex.serving.reference_executor
        return EngineFacts(vocab_size, reuse, budget or executor.max_num_tokens, int(executor.lm.config.hidden_size),
                           executor.engine.dtype, executor.kv_capacity_blocks, executor.blocks.tokens_per_block)
    path = Path(str(model_path)) / "config.json"
    if not path.exists():
        return EngineFacts(vocab_size, reuse, budget)
    engine = json.loads(path.read_text())
    pretrained, build = engine.get("pretrained_config", engine), engine.get("build_config", {})
    dtype = TORCH_DTYPES.get(str(pretrained.get("dtype") or pretrained.get("torch_dtype") or "float32"), torch.float32)
    per_block = int(build.get("plugin_config", {}).get("tokens_per_block") or 32)
    max_tokens = getattr(kv, "max_tokens", None)
    return EngineFacts(vocab_size, reuse, budget or build.get("max_num_tokens"), pretrained.get("hidden_size"), dtype,
                       max_tokens // per_block if max_tokens else None, per_block)


def engine_dtype(engine_dir) -> str | None:
    """The weights' dtype of a TensorRT-LLM engine folder (``pretrained_config.dtype`` of its ``config.json``), or
    None when there is no engine there yet: the dtype its executor requires of a prompt table."""
    path = Path(str(engine_dir)) / "config.json"
    if not path.exists():
        return None
    engine = json.loads(path.read_text())
    pretrained = engine.get("pretrained_config", engine)
    dtype = pretrained.get("dtype") or pretrained.get("torch_dtype")
    return str(dtype) if dtype else None


def content_id(table: torch.Tensor) -> int:
    """A clip's extra id: a 56-bit hash of its prompt-table rows (never 0, the id of plain text positions)."""
    data = table.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "little") | 1
