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
:class:`ReferenceEngine`. New requests are checked as ``LlmRequest::validate`` does
(:mod:`audex.serving.reference_requests`); a prompt table when its context enters the step
(``PromptTuningBuffers::validate``, :mod:`audex.serving.reference_model`), and a failure there ends every request of
the iteration, as the executor does. The step's last-position logits go to the batched logits post-processor in one call
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
from typing import Sequence

from audex.serving.executor_api import (  # noqa: F401 - the executor API this module stands in for
    BatchingType,
    CapacitySchedulerPolicy,
    CommunicationMode,
    CommunicationType,
    ExecutorConfig,
    FinishReason,
    KvCacheConfig,
    LogitsPostProcessorConfig,
    ModelType,
    OrchestratorConfig,
    OutputConfig,
    ParallelConfig,
    PromptTuningConfig,
    ReferenceEngine,
    Request,
    Response,
    Result,
    SamplingConfig,
    SchedulerConfig,
    serves_requests,
)
from audex.serving.executor_blocks import (
    BlockStore,
    blocks_to_completion,
    plain_layers,
    schedule_contexts,
    unique_tokens,
)
from audex.serving.reference_model import ReferenceModel
from audex.serving.reference_requests import ActiveRequest, RequestLimits, WaitingRequest, sampler_for


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
        self.max_batch_size = int(self.config.max_batch_size or engine.max_batch_size)
        self.max_num_tokens = int(self.config.max_num_tokens or engine.max_num_tokens)
        self.model = ReferenceModel(engine, self.max_batch_size)
        self.lm, self.vocab_size, self.max_seq_len = self.model.lm, self.model.vocab_size, self.model.max_seq_len
        lpp = self.config.logits_post_processor_config
        self.batched_processor = lpp.processor_batched if lpp is not None else None
        self.processor_map = dict(lpp.processor_map or {}) if lpp is not None else {}
        kv = self.config.kv_cache_config
        self.block_reuse = bool(kv.enable_block_reuse)
        self.kv_capacity_blocks = kv.max_tokens // engine.tokens_per_block if kv.max_tokens else None
        self.blocks = BlockStore(engine.tokens_per_block, self.kv_capacity_blocks or 4096)
        self.limits = RequestLimits(engine.max_input_len, self.max_num_tokens, self.vocab_size, self.block_reuse,
                                    self.kv_capacity_blocks, frozenset(self.processor_map),
                                    self.batched_processor is not None)
        self._lock = threading.Condition()
        self._waiting: list[WaitingRequest] = []
        self._active: dict[int, ActiveRequest] = {}
        self._cancelled: set[int] = set()
        self._responses: collections.deque = collections.deque()
        self._next_id = 1
        self._running = True
        self.iterations = 0
        self.batch_sizes: list[int] = []          # requests per iteration (what the scheduler ran)
        self.skipped_for_shared_block = 0         # context steps deferred by the shared-first-block rule
        # tensor/pipeline parallelism: on a participant rank (LEADER mode, rank > 0) or a non-orchestrator the real
        # executor runs its share of the engine for the leader; the reference runs the whole model on the rank that
        # takes requests, and a participant only refuses the client API
        self.serves = serves_requests(self.config.parallel_config, engine.world_size)
        self._thread = threading.Thread(target=self._loop, name="torch-executor", daemon=True)
        if self.serves:
            self._thread.start()

    # ---- client API ---------------------------------------------------------------------------
    def can_enqueue_requests(self) -> bool:
        return self._running and self.serves

    def is_participant(self) -> bool:
        return True

    def _leader_only(self, method: str) -> None:
        """``checkParallelApiUsage``: only the leader (or the orchestrator) may use the client API."""
        if not self.serves:
            raise RuntimeError(f"{method}: with tensor/pipeline parallelism only the leader rank (LEADER mode) or the "
                               "orchestrator (ORCHESTRATOR mode) may call it; this rank is a participant")

    def enqueue_request(self, request: Request) -> int:
        return self.enqueue_requests([request])[0]

    def enqueue_requests(self, requests: Sequence[Request]) -> list[int]:
        """Queue requests in order (their contexts are scheduled in this order when the step has room)."""
        self._leader_only("enqueue_requests")
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
                self._waiting.append(WaitingRequest(req_id, request, len(ids_), unique_tokens(
                    ids_, ptc.input_token_extra_ids if ptc is not None else None), blocks))
                ids.append(req_id)
            self._lock.notify_all()
            return ids

    def cancel_request(self, req_id: int) -> None:
        self._leader_only("cancel_request")
        with self._lock:
            self._cancelled.add(int(req_id))
            self._lock.notify_all()

    def get_num_responses_ready(self) -> int:
        with self._lock:
            return len(self._responses)

    def await_responses(self, id_or_timeout=None, timeout: datetime.timedelta | None = None) -> list[Response]:
        """``await_responses(timeout=...)`` for any request, ``await_responses(req_id[, timeout])`` for one (until
        its final response when no timeout is given)."""
        self._leader_only("await_responses")
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
        """Stop the executor (on a participant rank the real one returns when the leader shuts down; the reference
        has no leader to wait for)."""
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # ---- the iteration loop -------------------------------------------------------------------
    def _emit(self, response: Response) -> None:
        self._responses.append(response)

    def _error(self, req_id: int, request: Request, message: str) -> None:
        self._emit(Response(req_id, None, message, request.client_id))

    def _first_new_block(self, w: WaitingRequest):
        return self.blocks.first_new_block(w.tokens) if self.block_reuse else None

    def _schedule(self) -> list[ActiveRequest]:
        """Validate new requests, then pick this step's contexts (see :mod:`audex.serving.executor_blocks`)."""
        keep = []
        for w in self._waiting:
            if w.req_id in self._cancelled:
                self._cancelled.discard(w.req_id)
                self._emit(Response(w.req_id, Result([[]], True, [FinishReason.CANCELLED]),
                                    client_id=w.request.client_id))
                continue
            if not w.checked:
                problem = self.limits.problem(w)
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
            cache, pending = self.model.new_cache(), w.request.input_token_ids
            hits = self.blocks.reusable(w.tokens) if self.block_reuse else []
            if hits:
                for i, (k, v) in enumerate(self.blocks.load(hits)):
                    cache.update(k, v, i)
                pending = pending[len(hits) * self.blocks.tokens_per_block:]
            # LlmRequest::validate: prompt + output are capped at max_seq_len (a warning, not an error)
            budget = min(w.request.max_tokens, self.max_seq_len - w.prompt_len)
            state = ActiveRequest(w.req_id, w.request, pending, cache, sampler=sampler_for(w.request.sampling_config),
                            max_tokens=budget, tokens=w.tokens, blocks=w.blocks)
            self._active[w.req_id] = state
            started.append(state)
        return started

    def _forward(self, state: ActiveRequest, context: bool):
        ptc = state.request.prompt_tuning_config
        logits = self.model.forward(state.pending, None if ptc is None else ptc.embedding_table, state.cache, context)
        state.pending = []
        if context and self.block_reuse:
            layers = plain_layers(state.cache)
            if layers is not None:
                self.blocks.store(state.tokens, layers)
        return logits

    def _retire(self, state: ActiveRequest, reason: FinishReason) -> None:
        self._active.pop(state.req_id, None)
        self._respond(state, final=True, reason=reason)

    def _respond(self, state: ActiveRequest, final: bool, reason: FinishReason = FinishReason.NOT_FINISHED) -> None:
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
