"""A request's life in the reference executor (:mod:`audex.serving.reference_executor`): its state while it waits
and while it runs, the checks of ``LlmRequest::validate`` and the executor's own, and the draw of its
``SamplingConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from audex.inference.sampling import SamplingParams, TokenSampler
from audex.serving.executor_api import Request, SamplingConfig


@dataclass
class WaitingRequest:
    req_id: int
    request: Request
    prompt_len: int
    tokens: list          # unique tokens (token, extra id), the block-reuse key material
    blocks: int           # KV blocks reserved to completion (prompt + output)
    checked: bool = False


@dataclass
class ActiveRequest:
    req_id: int
    request: Request
    pending: list[int]
    cache: object
    generated: list[int] = field(default_factory=list)
    streamed: int = 0
    sampler: object = None
    max_tokens: int = 0
    tokens: list = field(default_factory=list)      # unique tokens of the prompt (block keys)
    blocks: int = 0                                  # KV blocks reserved to completion


def sampler_for(sc: SamplingConfig) -> TokenSampler:
    """The engine's draw for a ``SamplingConfig``, with Audex's seeded sampler (transformers' warpers): greedy when
    ``top_k == 1`` or no sampling field is set, else temperature / top-k / top-p with ``seed``."""
    sampling = (sc.top_k not in (None, 1)) or (sc.top_p not in (None, 0.0)) or (sc.temperature not in (None, 1.0))
    if sc.top_k == 1 or not sampling:
        return TokenSampler(SamplingParams(do_sample=False))
    return TokenSampler(SamplingParams(do_sample=True, temperature=float(sc.temperature or 1.0), top_k=sc.top_k or None,
                                       top_p=sc.top_p if sc.top_p not in (None, 0.0) else None, seed=sc.seed))


@dataclass(frozen=True)
class RequestLimits:
    """What a new request is checked against: the engine's sizes and the executor's configuration."""

    max_input_len: int
    max_num_tokens: int
    vocab_size: int
    block_reuse: bool
    kv_capacity_blocks: int | None
    processor_names: frozenset
    has_batched_processor: bool

    def problem(self, w: WaitingRequest) -> str | None:
        """The error message the executor answers ``w`` with, or None (``LlmRequest::validate`` and the
        executor's own checks)."""
        request, ids = w.request, w.request.input_token_ids
        if not ids:
            return "input_token_ids is empty"
        if len(ids) > self.max_input_len:
            return f"Prompt length ({len(ids)}) exceeds maximum input length ({self.max_input_len})."
        if len(ids) > self.max_num_tokens:
            return (f"Prompt length ({len(ids)}) exceeds max_num_tokens ({self.max_num_tokens}) and chunked context "
                    "is off: the request can never be scheduled")
        if request.max_tokens < 1:
            return f"max_tokens must be >= 1, got {request.max_tokens}"
        if self.kv_capacity_blocks is not None and w.blocks > self.kv_capacity_blocks:
            return (f"the request needs {w.blocks} KV blocks to completion but the cache holds "
                    f"{self.kv_capacity_blocks} (KvCacheConfig.max_tokens): it can never be scheduled")
        if request.end_id is not None and not -1 <= request.end_id < self.vocab_size:
            return f"EndId ({request.end_id}) is not within acceptable range [-1, {self.vocab_size})."
        ptc = request.prompt_tuning_config
        rows = 0 if ptc is None else int(ptc.embedding_table.shape[0])
        bad = [t for t in ids if t < 0 or t >= self.vocab_size + rows]
        if bad:
            return (f"input token id {bad[0]} is outside the vocabulary ({self.vocab_size}) and the prompt table "
                    f"({rows} rows)")
        if self.block_reuse and ptc is not None:
            if not ptc.input_token_extra_ids:
                return "Input token extra ids must be provided when enabling kv cache reuse with prompt table"
            if len(ptc.input_token_extra_ids) != len(ids):
                return (f"inputTokenExtraIds vector size ({len(ptc.input_token_extra_ids)}) must be the same as "
                        f"input token vector size ({len(ids)}).")
        name = request.logits_post_processor_name
        if name is not None and name != Request.BATCHED_POST_PROCESSOR_NAME and name not in self.processor_names:
            return f"logits post-processor {name!r} is not configured"
        if name == Request.BATCHED_POST_PROCESSOR_NAME and not self.has_batched_processor:
            return "the request asks for the batched logits post-processor but none is configured"
        return None
