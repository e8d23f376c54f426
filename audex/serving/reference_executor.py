"""A CPU reference of the TensorRT-LLM executor API, over the PyTorch backbone: the serving code runs without a GPU.

``tensorrt_llm`` installs only on CUDA hosts, yet everything Audex wraps around its executor (CFG twins, the batched
logits post-processor of :mod:`audex.serving.cfg_pairing`, streaming, cancellation, the Triton LLM model) has to run
on CPU machines. This module has the names and call signatures of the part of ``tensorrt_llm.bindings.executor``
that :mod:`audex.serving.guided_executor` uses (``Executor`` with ``enqueue_request(s)``, ``await_responses``,
``cancel_request``, ``can_enqueue_requests``, ``get_num_responses_ready``, ``shutdown``; the value types of
:mod:`audex.serving.executor_api`, re-exported here, with the pinned bindings' keyword names: any other keyword is a
``TypeError``), so the same code takes either module.

Each step follows the in-flight batcher with ``GUARANTEED_NO_EVICT`` and no chunked context
(:mod:`audex.serving.executor_blocks`: batch slots, KV blocks reserved to completion, the ``max_num_tokens`` budget,
KV block reuse keyed by ids and extra ids, the skip on a shared first block), with the sizes of a
:class:`ReferenceEngine`. New requests are checked as ``LlmRequest::validate`` does; a prompt table when its context
enters the step (``PromptTuningBuffers::validate``), and a failure there ends every request of the iteration, as the
executor does. The step's last-position logits go to the batched logits post-processor in one call
(``(req_ids, logits, token_ids, stream_ptr, client_ids)``, each ``[1, beam=1, vocab]``, modified in place), then
each request samples from its ``SamplingConfig``; it ends at ``end_id`` (not returned) or after ``max_tokens``
(capped at ``max_seq_len``). Prompt ids from the vocabulary size on index ``PromptTuningConfig.embedding_table``
(row ``id - vocab_size``): Audex's audio frames.

Not a fast engine: every request runs alone with its own transformers KV cache (reused blocks copied in); the point
is the executor's *contract*. Real-engine equality is checked by the ``gpu`` tests.

Example::

    >>> import audex.serving.reference_executor as trtllm
    >>> engine = trtllm.ReferenceEngine("export/hf", max_batch_size=4, max_input_len=256, max_num_tokens=1024)
    >>> executor = trtllm.Executor(engine, trtllm.ModelType.DECODER_ONLY, trtllm.ExecutorConfig())
    >>> rid = executor.enqueue_request(trtllm.Request(input_token_ids=[1, 2, 3], max_tokens=8, end_id=7))
    >>> [r.result.output_token_ids for r in executor.await_responses(rid)]
"""

from __future__ import annotations

import collections
import datetime
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from audex.inference.sampling import SamplingParams, TokenSampler
from audex.serving.executor_api import (  # noqa: F401 - the executor API this module stands in for
    BatchingType,
    CapacitySchedulerPolicy,
    ExecutorConfig,
    FinishReason,
    KvCacheConfig,
    LogitsPostProcessorConfig,
    ModelType,
    OutputConfig,
    PromptTuningConfig,
    ReferenceEngine,
    Request,
    Response,
    Result,
    SamplingConfig,
    SchedulerConfig,
)
from audex.serving.executor_blocks import (
    BlockStore,
    blocks_to_completion,
    check_table,
    plain_layers,
    schedule_contexts,
    unique_tokens,
)


@dataclass
class _Active:
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


@dataclass
class _Waiting:
    req_id: int
    request: Request
    prompt_len: int
    tokens: list          # unique tokens (token, extra id), the block-reuse key material
    blocks: int           # KV blocks reserved to completion (prompt + output)
    checked: bool = False


def _sampler(sc: SamplingConfig):
    """The engine's draw for a ``SamplingConfig``, with Audex's seeded sampler (transformers' warpers): greedy when
    ``top_k == 1`` or no sampling field is set, else temperature / top-k / top-p with ``seed``."""
    sampling = (sc.top_k not in (None, 1)) or (sc.top_p not in (None, 0.0)) or (sc.temperature not in (None, 1.0))
    if sc.top_k == 1 or not sampling:
        return TokenSampler(SamplingParams(do_sample=False))
    return TokenSampler(SamplingParams(do_sample=True, temperature=float(sc.temperature or 1.0), top_k=sc.top_k or None,
                                       top_p=sc.top_p if sc.top_p not in (None, 0.0) else None, seed=sc.seed))


class Executor:
    """In-flight batching over a transformers causal LM (see the module docstring).

    Args:
        model_path: a :class:`ReferenceEngine` (the model and its build sizes), a Hugging Face folder (the export's
            ``hf/``) or a ``torch.nn.Module``; the last two get ``trtllm-build``'s default sizes.
        model_type: ``ModelType.DECODER_ONLY``.
        executor_config: ``max_batch_size`` / ``max_num_tokens`` (default: the engine's) bound each step;
            ``kv_cache_config.enable_block_reuse`` turns block reuse on (the default);
            ``logits_post_processor_config.processor_batched`` is called once per iteration.
    """

    def __init__(self, model_path, model_type: ModelType = ModelType.DECODER_ONLY,
                 executor_config: ExecutorConfig | None = None):
        if model_type is not ModelType.DECODER_ONLY:
            raise ValueError(f"the reference executor runs decoder-only models, not {model_type}")
        self.config = executor_config or ExecutorConfig()
        engine = model_path if isinstance(model_path, ReferenceEngine) else ReferenceEngine(model_path)
        self.engine = engine
        if isinstance(engine.model, torch.nn.Module):
            self.lm = engine.model
        else:
            if not (Path(engine.model) / "config.json").exists():
                raise FileNotFoundError(f"{engine.model!r} is not a Hugging Face model folder (no config.json): give "
                                        "the export's hf/ folder")
            self.lm = AutoModelForCausalLM.from_pretrained(str(engine.model), dtype=torch.float32)
        self.lm.eval()
        self.vocab_size = int(self.lm.get_input_embeddings().weight.shape[0])
        lpp = self.config.logits_post_processor_config
        self.batched_processor = lpp.processor_batched if lpp is not None else None
        self.processor_map = dict(lpp.processor_map or {}) if lpp is not None else {}
        self.max_batch_size = int(self.config.max_batch_size or engine.max_batch_size)
        self.max_num_tokens = int(self.config.max_num_tokens or engine.max_num_tokens)
        self.max_seq_len = int(engine.max_seq_len or self.lm.config.max_position_embeddings)
        # PromptTuningBuffers: the table holds max_batch_size slices of this many rows, one per request
        self.max_prompt_vocab_size = int(engine.max_prompt_embedding_table_size) // self.max_batch_size
        kv = self.config.kv_cache_config
        self.block_reuse = bool(kv.enable_block_reuse)
        self.kv_capacity_blocks = kv.max_tokens // engine.tokens_per_block if kv.max_tokens else None
        self.blocks = BlockStore(engine.tokens_per_block, self.kv_capacity_blocks or 4096)
        self._lock = threading.Condition()
        self._waiting: list[_Waiting] = []
        self._active: dict[int, _Active] = {}
        self._cancelled: set[int] = set()
        self._responses: collections.deque = collections.deque()
        self._next_id = 1
        self._running = True
        self.iterations = 0
        self.batch_sizes: list[int] = []          # requests per iteration (what the scheduler ran)
        self.skipped_for_shared_block = 0         # context steps deferred by the shared-first-block rule
        self._thread = threading.Thread(target=self._loop, name="torch-executor", daemon=True)
        self._thread.start()

    # ---- client API ---------------------------------------------------------------------------
    def can_enqueue_requests(self) -> bool:
        return self._running

    def enqueue_request(self, request: Request) -> int:
        return self.enqueue_requests([request])[0]

    def enqueue_requests(self, requests: Sequence[Request]) -> list[int]:
        """Queue requests in order (their contexts are scheduled in this order when the step has room)."""
        with self._lock:
            if not self._running:
                raise RuntimeError("the executor was shut down")
            ids = []
            for request in requests:
                req_id, self._next_id = self._next_id, self._next_id + 1
                ptc = request.prompt_tuning_config
                ids_ = request.input_token_ids
                blocks = blocks_to_completion(len(ids_), max(0, min(request.max_tokens, self.max_seq_len - len(ids_))),
                                              self.blocks.tokens_per_block)
                self._waiting.append(_Waiting(req_id, request, len(ids_), unique_tokens(
                    ids_, ptc.input_token_extra_ids if ptc is not None else None), blocks))
                ids.append(req_id)
            self._lock.notify_all()
            return ids

    def cancel_request(self, req_id: int) -> None:
        with self._lock:
            self._cancelled.add(int(req_id))
            self._lock.notify_all()

    def get_num_responses_ready(self) -> int:
        with self._lock:
            return len(self._responses)

    def await_responses(self, id_or_timeout=None, timeout: datetime.timedelta | None = None) -> list[Response]:
        """``await_responses(timeout=...)`` for any request, ``await_responses(req_id[, timeout])`` for one (until
        its final response when no timeout is given)."""
        req_id = None
        if isinstance(id_or_timeout, datetime.timedelta):
            timeout = id_or_timeout
        elif id_or_timeout is not None:
            req_id = int(id_or_timeout)
        deadline = None if timeout is None else timeout.total_seconds()
        with self._lock:
            def ready():
                if req_id is None:
                    return bool(self._responses)
                return any(r.request_id == req_id for r in self._responses)

            if req_id is not None and timeout is None:
                out = []
                while True:
                    self._lock.wait_for(lambda: ready() or not self._running)
                    out += self._take(req_id)
                    if (out and (out[-1].has_error() or out[-1].result.is_final)) or not self._running:
                        return out
            self._lock.wait_for(lambda: ready() or not self._running, timeout=deadline)
            return self._take(req_id)

    def _take(self, req_id):
        if req_id is None:
            out = list(self._responses)
            self._responses.clear()
            return out
        out = [r for r in self._responses if r.request_id == req_id]
        self._responses = collections.deque(r for r in self._responses if r.request_id != req_id)
        return out

    def shutdown(self) -> None:
        with self._lock:
            self._running = False
            self._lock.notify_all()
        self._thread.join(timeout=30)

    # ---- validation (LlmRequest::validate and the executor's own checks); the iteration loop ----
    def _check(self, w: _Waiting) -> str | None:
        request, ids = w.request, w.request.input_token_ids
        if not ids:
            return "input_token_ids is empty"
        if len(ids) > self.engine.max_input_len:
            return f"Prompt length ({len(ids)}) exceeds maximum input length ({self.engine.max_input_len})."
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
        if name is not None and name != Request.BATCHED_POST_PROCESSOR_NAME and name not in self.processor_map:
            return f"logits post-processor {name!r} is not configured"
        if name == Request.BATCHED_POST_PROCESSOR_NAME and self.batched_processor is None:
            return "the request asks for the batched logits post-processor but none is configured"
        return None

    def _emit(self, response: Response) -> None:
        self._responses.append(response)

    def _error(self, req_id: int, request: Request, message: str) -> None:
        self._emit(Response(req_id, None, message, request.client_id))

    def _first_new_block(self, w: _Waiting):
        return self.blocks.first_new_block(w.tokens) if self.block_reuse else None

    def _schedule(self) -> list[_Active]:
        """Validate new requests, then pick this step's contexts (see :mod:`audex.serving.executor_blocks`)."""
        keep = []
        for w in self._waiting:
            if w.req_id in self._cancelled:
                self._cancelled.discard(w.req_id)
                self._emit(Response(w.req_id, Result([[]], True, [FinishReason.CANCELLED]),
                                    client_id=w.request.client_id))
                continue
            if not w.checked:
                problem = self._check(w)
                if problem:
                    self._error(w.req_id, w.request, problem)
                    continue
                w.checked = True
            keep.append(w)
        self._waiting = keep
        free = None if self.kv_capacity_blocks is None else \
            self.kv_capacity_blocks - sum(a.blocks for a in self._active.values())
        scheduled, skipped = schedule_contexts(keep, self.max_batch_size - len(self._active), len(self._active),
                                               self.max_num_tokens, self._first_new_block, free)
        self.skipped_for_shared_block += len(skipped)
        started = []
        for w in scheduled:
            self._waiting.remove(w)
            cache, pending = DynamicCache(config=self.lm.config), w.request.input_token_ids
            hits = self.blocks.reusable(w.tokens) if self.block_reuse else []
            if hits:
                for i, (k, v) in enumerate(self.blocks.load(hits)):
                    cache.update(k, v, i)
                pending = pending[len(hits) * self.blocks.tokens_per_block:]
            # LlmRequest::validate: prompt + output are capped at max_seq_len (a warning, not an error)
            budget = min(w.request.max_tokens, self.max_seq_len - w.prompt_len)
            state = _Active(w.req_id, w.request, pending, cache, sampler=_sampler(w.request.sampling_config),
                            max_tokens=budget, tokens=w.tokens, blocks=w.blocks)
            self._active[w.req_id] = state
            started.append(state)
        return started

    def _embed(self, state: _Active) -> dict:
        ids = torch.tensor([state.pending])
        if state.request.prompt_tuning_config is None or int(ids.max()) < self.vocab_size:
            return {"input_ids": ids}
        table = state.request.prompt_tuning_config.embedding_table
        emb = self.lm.get_input_embeddings()
        fake = ids >= self.vocab_size
        embeds = emb(torch.where(fake, torch.zeros_like(ids), ids))
        embeds[fake] = table.to(embeds.dtype)[ids[fake] - self.vocab_size]
        return {"inputs_embeds": embeds}

    @torch.no_grad()
    def _forward(self, state: _Active, context: bool) -> torch.Tensor:
        if context and state.request.prompt_tuning_config is not None:
            check_table(state.request.prompt_tuning_config.embedding_table, self.max_prompt_vocab_size,
                        self.engine.dtype)
        out = self.lm(**self._embed(state), past_key_values=state.cache, use_cache=True)
        state.pending = []
        if context and self.block_reuse:
            layers = plain_layers(state.cache)
            if layers is not None:
                self.blocks.store(state.tokens, layers)
        return out.logits[:, -1:, :].float()                     # [1, beam=1, vocab]

    def _retire(self, state: _Active, reason: FinishReason) -> None:
        self._active.pop(state.req_id, None)
        self._respond(state, final=True, reason=reason)

    def _respond(self, state: _Active, final: bool, reason: FinishReason = FinishReason.NOT_FINISHED) -> None:
        request = state.request
        if request.streaming:
            tokens = state.generated[state.streamed:]
            state.streamed = len(state.generated)
        else:
            if not final:
                return
            tokens = list(state.generated)
            if not request.output_config.exclude_input_from_output:
                tokens = list(request.input_token_ids) + tokens
        self._emit(Response(state.req_id, Result([tokens], final, [reason]), client_id=request.client_id))

    def step(self) -> int:
        """One iteration (scheduling, forward, post-processor, sampling, responses); returns the rows it ran."""
        with self._lock:
            for req_id in list(self._cancelled):
                if req_id in self._active:
                    self._retire(self._active[req_id], FinishReason.CANCELLED)
                    self._cancelled.discard(req_id)
            contexts = {s.req_id for s in self._schedule()}
            rows = list(self._active.values())
            self._lock.notify_all()
        if not rows:
            return 0
        try:
            logits = [self._forward(s, s.req_id in contexts) for s in rows]
            batched = [i for i, s in enumerate(rows)
                       if s.request.logits_post_processor_name == Request.BATCHED_POST_PROCESSOR_NAME]
            if batched:
                self.batched_processor([rows[i].req_id for i in batched], [logits[i] for i in batched],
                                       [[rows[i].request.input_token_ids + rows[i].generated] for i in batched],
                                       None, [rows[i].request.client_id for i in batched])
            for s, lg in zip(rows, logits):
                name = s.request.logits_post_processor_name
                if name is not None and name != Request.BATCHED_POST_PROCESSOR_NAME:
                    self.processor_map[name](s.req_id, lg, [s.request.input_token_ids + s.generated], None,
                                             s.request.client_id)
            tokens = [int(s.sampler(lg.reshape(1, -1))[0]) for s, lg in zip(rows, logits)]
        except Exception as e:  # the executor terminates every active request with the error, then goes on
            with self._lock:
                for s in rows:
                    self._active.pop(s.req_id, None)
                    self._error(s.req_id, s.request, f"{type(e).__name__}: {e}")
                self._lock.notify_all()
            return len(rows)
        with self._lock:
            self.iterations += 1
            self.batch_sizes.append(len(rows))
            for s, token in zip(rows, tokens):
                if s.req_id not in self._active:
                    continue
                if s.request.end_id is not None and token == s.request.end_id:
                    self._retire(s, FinishReason.END_ID)
                    continue
                s.generated.append(token)
                s.pending = [token]
                if len(s.generated) >= s.max_tokens:
                    self._retire(s, FinishReason.LENGTH)
                else:
                    self._respond(s, final=False)
            self._lock.notify_all()
        return len(rows)

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: not self._running or self._waiting or self._active or self._cancelled)
                if not self._running:
                    return
                if not self._waiting and not self._active:
                    self._cancelled.clear()       # cancelling a request that already ended is a no-op
                    continue
            self.step()
