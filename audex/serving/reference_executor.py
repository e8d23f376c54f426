"""A CPU reference of the TensorRT-LLM executor API, over the PyTorch backbone: the serving code runs without a GPU.

``tensorrt_llm`` installs only on CUDA hosts, yet everything Audex wraps around its executor -- CFG twin requests,
the batched logits post-processor (:mod:`audex.serving.cfg_pairing`), streaming, cancellation, the Triton LLM model
-- has to be tested and run on CPU machines. This module has the names, constructors and call signatures of the
subset of ``tensorrt_llm.bindings.executor`` that :mod:`audex.serving.guided_executor` uses, so the same code takes
either module (``executor_module=tensorrt_llm.bindings.executor`` on a GPU host, this one elsewhere):

* ``Executor(model_path, ModelType.DECODER_ONLY, ExecutorConfig)``, ``enqueue_request(s)``, ``await_responses``,
  ``cancel_request``, ``can_enqueue_requests``, ``get_num_responses_ready``, ``shutdown``;
* ``Request(input_token_ids, max_tokens | max_new_tokens, streaming, sampling_config, output_config, end_id,
  pad_id, prompt_tuning_config, client_id, logits_post_processor_name)`` and
  ``Request.BATCHED_POST_PROCESSOR_NAME``;
* ``ExecutorConfig(max_beam_width, scheduler_config, max_batch_size, ...)`` with
  ``logits_post_processor_config = LogitsPostProcessorConfig(processor_batched=fn, replicate=False)``;
* ``Response.request_id / client_id / has_error() / error_msg / result.output_token_ids / result.is_final /
  result.finish_reasons``.

Scheduling follows the in-flight batcher with the ``GUARANTEED_NO_EVICT`` capacity policy: at every iteration the
waiting requests are admitted first come first served while fewer than ``max_batch_size`` are active (a running
request is never paused or evicted), newly admitted requests run their context step and the others one generation
step, the last-position logits of every active request go to the batched logits post-processor in one call
(``(req_ids, logits, token_ids, stream_ptr, client_ids)``, each logits tensor ``[1, beam=1, vocab]`` and modified in
place, each token list the prompt plus the tokens generated so far), and then each request samples from its own
``SamplingConfig`` (greedy when ``top_k == 1`` or no sampling field is set). A request ends at ``end_id`` (which,
as TensorRT-LLM does, is not part of the returned tokens) or after ``max_tokens`` tokens. Prompt ids at or above
the vocabulary size index the request's ``PromptTuningConfig.embedding_table`` (row ``id - vocab_size``), which is
how Audex feeds audio frames (:mod:`audex.export.frontend_onnx`).

What it is not: a fast engine. Every request runs alone with its own transformers KV cache; the point is the
executor's *contract* (admission order, step boundaries, the post-processor call, responses), so that pairing code
which passes here behaves the same under TensorRT-LLM. Real-engine equality is checked by the ``gpu`` tests.

One module that reads better whole (~470 lines): it mirrors one external module, ``tensorrt_llm.bindings.executor``,
so that ``import audex.serving.reference_executor as trtllm`` stands in for it name for name.

Example::

    >>> import audex.serving.reference_executor as trtllm
    >>> executor = trtllm.Executor("export/hf", trtllm.ModelType.DECODER_ONLY, trtllm.ExecutorConfig(max_batch_size=4))
    >>> rid = executor.enqueue_request(trtllm.Request(input_token_ids=[1, 2, 3], max_tokens=8, end_id=7))
    >>> [r.result.output_token_ids for r in executor.await_responses(rid)]
"""

from __future__ import annotations

import collections
import datetime
import enum
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from audex.inference.sampling import SamplingParams, TokenSampler


class ModelType(enum.Enum):
    DECODER_ONLY = 0


class BatchingType(enum.Enum):
    STATIC = 0
    INFLIGHT = 1


class CapacitySchedulerPolicy(enum.Enum):
    MAX_UTILIZATION = 0
    GUARANTEED_NO_EVICT = 1
    STATIC_BATCH = 2


class FinishReason(enum.Enum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


@dataclass
class SchedulerConfig:
    capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT


@dataclass
class KvCacheConfig:
    enable_block_reuse: bool | None = None
    max_tokens: int | None = None
    free_gpu_memory_fraction: float | None = None


@dataclass
class LogitsPostProcessorConfig:
    processor_map: dict | None = None
    processor_batched: Callable | None = None
    replicate: bool = True


@dataclass
class ExecutorConfig:
    """The fields the reference honours; any other keyword of the real ``ExecutorConfig`` is accepted and ignored."""

    max_beam_width: int = 1
    scheduler_config: SchedulerConfig | None = None
    kv_cache_config: KvCacheConfig | None = None
    enable_chunked_context: bool = False
    batching_type: BatchingType | None = None
    max_batch_size: int | None = None
    max_input_len: int | None = None
    logits_post_processor_config: LogitsPostProcessorConfig | None = None

    def __init__(self, max_beam_width: int = 1, *, scheduler_config=None, kv_cache_config=None,
                 enable_chunked_context=False, batching_type=None, max_batch_size=None, max_input_len=None,
                 logits_post_processor_config=None, **_ignored):
        if max_beam_width != 1:
            raise ValueError("the reference executor decodes with beam width 1 only (Audex serves no beam search)")
        self.max_beam_width = 1
        self.scheduler_config = scheduler_config
        self.kv_cache_config = kv_cache_config
        self.enable_chunked_context = bool(enable_chunked_context)
        self.batching_type = batching_type
        self.max_batch_size = max_batch_size
        self.max_input_len = max_input_len
        self.logits_post_processor_config = logits_post_processor_config


@dataclass
class SamplingConfig:
    beam_width: int = 1
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    random_seed: int | None = None

    def __init__(self, beam_width: int = 1, *, top_k=None, top_p=None, temperature=None, random_seed=None, **_ignored):
        self.beam_width, self.top_k, self.top_p = beam_width, top_k, top_p
        self.temperature, self.random_seed = temperature, random_seed


@dataclass
class OutputConfig:
    exclude_input_from_output: bool = False

    def __init__(self, exclude_input_from_output: bool = False, **_ignored):
        self.exclude_input_from_output = bool(exclude_input_from_output)


@dataclass
class PromptTuningConfig:
    embedding_table: torch.Tensor
    input_token_extra_ids: list | None = None


class Request:
    """``tensorrt_llm.bindings.executor.Request`` (the fields Audex sets)."""

    BATCHED_POST_PROCESSOR_NAME = "batched"

    def __init__(self, input_token_ids: Sequence[int], max_tokens: int | None = None, *, max_new_tokens: int | None = None,
                 streaming: bool = False, sampling_config: SamplingConfig | None = None,
                 output_config: OutputConfig | None = None, end_id: int | None = None, pad_id: int | None = None,
                 prompt_tuning_config: PromptTuningConfig | None = None, client_id: int | None = None,
                 logits_post_processor_name: str | None = None, **_ignored):
        self.input_token_ids = [int(t) for t in input_token_ids]
        self.max_tokens = max_tokens if max_tokens is not None else max_new_tokens
        if self.max_tokens is None:
            raise ValueError("a Request needs max_tokens (max_new_tokens)")
        self.streaming = bool(streaming)
        self.sampling_config = sampling_config or SamplingConfig()
        self.output_config = output_config or OutputConfig()
        self.end_id, self.pad_id = end_id, pad_id
        self.prompt_tuning_config = prompt_tuning_config
        self.client_id = client_id
        self.logits_post_processor_name = logits_post_processor_name


@dataclass
class Result:
    output_token_ids: list[list[int]]
    is_final: bool
    finish_reasons: list[FinishReason]
    sequence_index: int = 0


@dataclass
class Response:
    request_id: int
    result: Result | None = None
    error_msg: str = ""
    client_id: int | None = None

    def has_error(self) -> bool:
        return self.result is None


@dataclass
class _Active:
    req_id: int
    request: Request
    pending: list[int]
    cache: object
    generated: list[int] = field(default_factory=list)
    streamed: int = 0
    sampler: object = None


def _sampler(sc: SamplingConfig):
    """The engine's draw for a ``SamplingConfig``, with Audex's seeded sampler (transformers' warpers): greedy when
    ``top_k == 1`` or no sampling field is set, else temperature / top-k / top-p with ``random_seed``."""
    sampling = (sc.top_k not in (None, 1)) or (sc.top_p not in (None, 0.0)) or (sc.temperature not in (None, 1.0))
    if sc.top_k == 1 or not sampling:
        return TokenSampler(SamplingParams(do_sample=False))
    return TokenSampler(SamplingParams(do_sample=True, temperature=float(sc.temperature or 1.0), top_k=sc.top_k or None,
                                       top_p=sc.top_p if sc.top_p not in (None, 0.0) else None, seed=sc.random_seed))


class Executor:
    """In-flight batching over a transformers causal LM (see the module docstring).

    Args:
        model_path: a Hugging Face folder (the export's ``hf/``) loaded with ``AutoModelForCausalLM``, or an
            already built ``torch.nn.Module`` (tests).
        model_type: ``ModelType.DECODER_ONLY``.
        executor_config: ``max_batch_size`` (default 8) bounds the active requests; ``max_input_len`` the prompts;
            ``logits_post_processor_config.processor_batched`` is called once per iteration.
    """

    def __init__(self, model_path, model_type: ModelType = ModelType.DECODER_ONLY,
                 executor_config: ExecutorConfig | None = None):
        if model_type is not ModelType.DECODER_ONLY:
            raise ValueError(f"the reference executor runs decoder-only models, not {model_type}")
        self.config = executor_config or ExecutorConfig()
        if isinstance(model_path, torch.nn.Module):
            self.lm = model_path
        else:
            if not (Path(model_path) / "config.json").exists():
                raise FileNotFoundError(f"{model_path!r} is not a Hugging Face model folder (no config.json): give the "
                                        "export's hf/ folder")
            self.lm = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
        self.lm.eval()
        self.vocab_size = int(self.lm.get_input_embeddings().weight.shape[0])
        lpp = self.config.logits_post_processor_config
        self.batched_processor = lpp.processor_batched if lpp is not None else None
        self.processor_map = dict(lpp.processor_map or {}) if lpp is not None else {}
        self.max_batch_size = int(self.config.max_batch_size or 8)
        self._lock = threading.Condition()
        self._waiting: collections.deque = collections.deque()
        self._active: dict[int, _Active] = {}
        self._cancelled: set[int] = set()
        self._responses: collections.deque = collections.deque()
        self._next_id = 1
        self._running = True
        self.iterations = 0
        self.batch_sizes: list[int] = []          # active requests per iteration (what the scheduler ran)
        self._thread = threading.Thread(target=self._loop, name="torch-executor", daemon=True)
        self._thread.start()

    # ---- client API ---------------------------------------------------------------------------
    def can_enqueue_requests(self) -> bool:
        return self._running

    def enqueue_request(self, request: Request) -> int:
        return self.enqueue_requests([request])[0]

    def enqueue_requests(self, requests: Sequence[Request]) -> list[int]:
        """Queue requests in order (they are admitted in this order when the batch has room)."""
        with self._lock:
            if not self._running:
                raise RuntimeError("the executor was shut down")
            ids = []
            for request in requests:
                req_id, self._next_id = self._next_id, self._next_id + 1
                self._waiting.append((req_id, request))
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

    # ---- the iteration loop -------------------------------------------------------------------
    def _emit(self, response: Response) -> None:
        self._responses.append(response)

    def _error(self, req_id: int, request: Request, message: str) -> None:
        self._emit(Response(req_id, None, message, request.client_id))

    def _admit(self) -> list[_Active]:
        admitted = []
        while self._waiting and len(self._active) < self.max_batch_size:
            req_id, request = self._waiting.popleft()
            if req_id in self._cancelled:
                self._cancelled.discard(req_id)
                self._emit(Response(req_id, Result([[]], True, [FinishReason.CANCELLED]), client_id=request.client_id))
                continue
            problem = self._check(request)
            if problem:
                self._error(req_id, request, problem)
                continue
            state = _Active(req_id, request, list(request.input_token_ids), DynamicCache(config=self.lm.config),
                            sampler=_sampler(request.sampling_config))
            self._active[req_id] = state
            admitted.append(state)
        return admitted

    def _check(self, request: Request) -> str | None:
        ids = request.input_token_ids
        if not ids:
            return "input_token_ids is empty"
        if self.config.max_input_len is not None and len(ids) > self.config.max_input_len:
            return f"prompt length {len(ids)} exceeds the engine's max_input_len {self.config.max_input_len}"
        if request.max_tokens < 1:
            return f"max_tokens must be >= 1, got {request.max_tokens}"
        table = request.prompt_tuning_config.embedding_table if request.prompt_tuning_config is not None else None
        rows = 0 if table is None else int(table.shape[0])
        bad = [t for t in ids if t < 0 or t >= self.vocab_size + rows]
        if bad:
            return (f"input token id {bad[0]} is outside the vocabulary ({self.vocab_size}) and the prompt table "
                    f"({rows} rows)")
        name = request.logits_post_processor_name
        if name is not None and name != Request.BATCHED_POST_PROCESSOR_NAME and name not in self.processor_map:
            return f"logits post-processor {name!r} is not configured"
        if name == Request.BATCHED_POST_PROCESSOR_NAME and self.batched_processor is None:
            return "the request asks for the batched logits post-processor but none is configured"
        return None

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
    def _forward(self, state: _Active) -> torch.Tensor:
        out = self.lm(**self._embed(state), past_key_values=state.cache, use_cache=True)
        state.pending = []
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
        """One iteration (admission, forward, post-processor, sampling, responses); returns the rows it ran."""
        with self._lock:
            for req_id in list(self._cancelled):
                if req_id in self._active:
                    self._retire(self._active[req_id], FinishReason.CANCELLED)
                    self._cancelled.discard(req_id)
            self._admit()
            rows = list(self._active.values())
        if not rows:
            return 0
        try:
            logits = [self._forward(s) for s in rows]
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
        except Exception as e:  # the engine reports a failed iteration on every request of it, then goes on
            with self._lock:
                for s in rows:
                    self._active.pop(s.req_id, None)
                    self._error(s.req_id, s.request, f"iteration failed: {type(e).__name__}: {e}")
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
                if len(s.generated) >= s.request.max_tokens:
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
