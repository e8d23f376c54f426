"""Audex requests on a TensorRT-LLM executor, with classifier-free guidance: the serving side of the CFG twins.

One :class:`LlmJob` is what the Triton LLM model receives for one user request: the prompt ids (audio frames as
prompt-table ids), the paper's sampling preset, the task's output grammar and, for TTS/TTA with lambda != 1, the
unconditional twin prompt. :class:`GuidedExecutor` turns it into executor requests and the executor's responses back
into one event stream per job:

* **text** jobs (ASR, AST, audio QA, chat): one plain request; the engine's own sampler draws
  (``SamplingConfig`` from the preset: greedy as ``top_k=1``, or top-k / top-p / temperature with the job's seed).
* **speech / audio** jobs (TTS, TTA): every token is decided by the batched logits post-processor
  (:class:`~audex.serving.cfg_pairing.CfgLogitsPostProcessor`), which applies eq. (3) on the twin rows, the codec
  grammar (:class:`~audex.inference.constraints.CodecConstraint`: RVQ layer by position, exactly 2,000 TTA codes),
  the preset's temperature / top-k and the pair's seeded draw, then forces the token on both rows. The two twins are
  enqueued in one ``enqueue_requests([cond, uncond])`` call, conditional first, tagged with
  ``client_id = 2 * pair + role`` and ``logits_post_processor_name = Request.BATCHED_POST_PROCESSOR_NAME``; they run
  greedy (``top_k=1``) in the engine, which then can only pick the forced token. With lambda = 1 the job is one
  request that decides *solo* (the grammar still applies).

**Admission.** TensorRT-LLM's batcher takes contexts first come first served while the batch has slots and the
step's ``max_num_tokens`` has room (it stops at the first context that does not fit), and under KV block reuse it
skips for one step a context whose first new block an earlier context of the step is filling
(:mod:`audex.serving.executor_blocks`). Any of these can start two twins a step apart, and a pair that starts apart
stays apart. So :class:`GuidedExecutor` keeps the queue itself and hands a pair over only when both twins fit the
slots (``max_inflight``, the engine's batch size) *and* the token budget (both prompts, the contexts handed over that
have not run yet, and one token per request in flight, within ``max_num_tokens``), first come first served, a pair
never overtaken; and under block reuse each twin carries pair-unique ``input_token_extra_ids`` (with a one-row
prompt table when it has none), so its blocks are its own and it is never skipped for its partner's. Every request
goes through the batched post-processor, which is how the router sees that a context has run. Clips under block
reuse carry their content hash as extra id on their prompt-table positions: TensorRT-LLM keys cached blocks by
(id, extra id), and every clip uses the same fake ids. With a bounded KV cache (``KvCacheConfig.max_tokens``) a pair
also waits until both twins' blocks to completion are free; an unbounded one can still admit one twin alone.

Pairs split all the same are handled by the tracker (a lone conditional row decides unguided, its twin replays and
is retired after ``max_lag_steps``, counted in :attr:`stats`; :mod:`audex.serving.cfg_pairing`). The unconditional
twin is internal: its tokens are never returned; when the conditional one ends the twin is cancelled, and when the
twin fails or is cancelled the conditional one goes on alone.

``executor_module``: ``tensorrt_llm.bindings.executor`` (GPU hosts) or :mod:`audex.serving.reference_executor` (CPU).

Example::

    >>> import audex.serving.reference_executor as trtllm
    >>> guided = GuidedExecutor.create(trtllm, "export/hf", tokenizer, trtllm.ExecutorConfig(max_batch_size=8))
    >>> job = guided.submit(LlmJob(cond_ids, 300, end_id, pad_id, SamplingParams(guidance_scale=1.5, ...),
    ...                            uncond_input_ids=uncond_ids, output="speech"), on_event=print)
"""

from __future__ import annotations

import collections
import datetime
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from audex.inference.constraints import CodecConstraint
from audex.inference.sampling import SamplingParams
from audex.serving.cfg_pairing import COND, UNCOND, CfgLogitsPostProcessor, CfgPairTracker, pair_client_id
from audex.serving.engine_facts import EngineFacts, engine_facts
from audex.serving.guided_requests import executor_request
from audex.serving.llm_job import (  # noqa: F401 - re-exported
    FINISH_NAMES,
    OUTPUTS,
    JobEvent,
    LlmJob,
    finish_reason,
    fits_step,
)

log = logging.getLogger(__name__)


@dataclass
class _Job:
    job: LlmJob
    on_event: Callable[[JobEvent], None]
    pair_id: int | None = None
    open_reqs: set = field(default_factory=set)
    tokens: list[int] = field(default_factory=list)
    finished: bool = False


class GuidedExecutor:
    """Runs :class:`LlmJob` s on an executor with the CFG pairing post-processor (see the module docstring).

    Args:
        executor_module: ``tensorrt_llm.bindings.executor`` or :mod:`audex.serving.reference_executor`.
        executor: an ``Executor`` whose config carries ``processor`` as its batched logits post-processor.
        processor: the :class:`CfgLogitsPostProcessor` (its tracker holds the pairs).
        constraint_factory: ``(output, prompt) -> constraint rows`` for speech/audio jobs, or None for no grammar.
        max_inflight: the engine's batch size (admission counts slots); None: hand everything over at once.
        engine: :class:`EngineFacts` (block reuse, token budget, prompt-table shape); None: no reuse, no budget.
    """

    def __init__(self, executor_module, executor, processor: CfgLogitsPostProcessor,
                 constraint_factory: Callable | None = None, poll_ms: int = 20, max_inflight: int | None = None,
                 engine: EngineFacts | None = None):
        if max_inflight is not None and max_inflight < 2:
            raise ValueError(f"max_inflight must be >= 2 (a CFG pair is two requests) or None, got {max_inflight}")
        self.max_inflight = max_inflight
        self.engine = engine
        if engine is not None and engine.block_reuse and not engine.hidden_size:
            raise ValueError("block reuse is on, so CFG twins need pair-unique extra ids, which TensorRT-LLM takes only "
                             "with a prompt table: give EngineFacts.hidden_size, or turn KvCacheConfig."
                             "enable_block_reuse off")
        self._req_len: dict[int, int] = {}                         # executor request id -> prompt length
        self._req_blocks: dict[int, int] = {}                      # executor request id -> KV blocks to completion
        self.trtllm = executor_module
        self.executor = executor
        self.processor = processor
        self.tracker = processor.tracker
        self.constraint_factory = constraint_factory
        self.poll = datetime.timedelta(milliseconds=poll_ms)
        self._lock = threading.Lock()
        self._jobs: dict[int, _Job] = {}
        self._by_req: dict[int, tuple[int, int | None]] = {}      # executor request id -> (job id, role or None)
        self._job_ids = itertools.count(1)
        self._pair_ids = itertools.count(0)
        self._waiting: collections.deque = collections.deque()  # jobs not yet handed to the executor (admission)
        self._inflight = 0                                          # executor requests handed over and not ended
        self._running = True
        self._thread = threading.Thread(target=self._await_loop, name="audex-guided-executor", daemon=True)
        if executor.can_enqueue_requests():        # a participant rank (tensor parallelism) gets no responses
            self._thread.start()

    @classmethod
    def create(cls, executor_module, model_path, tokenizer, executor_config=None, *, audio_seconds: float = 10.0,
               max_speech_seconds: float | None = None, max_lag_steps: int = 4,
               max_inflight: int | None = None) -> "GuidedExecutor":
        """Build the tracker, the post-processor, the executor (with the processor installed) and the router."""
        tracker = CfgPairTracker(SamplingParams(), 1.0, [tokenizer.im_end], can_hold=False, max_lag_steps=max_lag_steps)
        processor = CfgLogitsPostProcessor(tracker)
        config = executor_config if executor_config is not None else executor_module.ExecutorConfig(1)
        # replicate=False: with tensor parallelism the (stateful) processor runs once, on the first rank
        config.logits_post_processor_config = executor_module.LogitsPostProcessorConfig(
            processor_batched=processor, replicate=False)
        executor = executor_module.Executor(model_path, executor_module.ModelType.DECODER_ONLY, config)
        grammars = {kind: CodecConstraint.for_task(tokenizer, kind, audio_seconds=audio_seconds,
                                                   max_speech_seconds=max_speech_seconds) for kind in ("speech", "audio")}
        return cls(executor_module, executor, processor, lambda output, prompt: grammars[output].begin([prompt]),
                   max_inflight=max_inflight, engine=engine_facts(executor, model_path, config, tokenizer.vocab.size))

    @property
    def stats(self) -> dict:
        """The tracker's counts: ``guided`` tokens (both twins in the step), ``unguided`` (a lone conditional row),
        ``replay``, ``retire``, ``solo``."""
        with self.processor.lock:
            return dict(self.tracker.stats)

    # ---- submitting ---------------------------------------------------------------------------
    def submit(self, job: LlmJob, on_event: Callable[[JobEvent], None]) -> int:
        """Queue ``job``; ``on_event`` gets its :class:`JobEvent` s from the executor's response thread.

        With ``max_inflight`` (the engine's batch size), jobs reach the executor first come first served and a CFG
        pair only when both twins fit: the in-flight batcher then has room for both, admits them in one step, and
        the pair is guided from its first token. Without it, everything is handed over at once and the tracker
        copes with pairs the batcher splits (see the module docstring)."""
        budget = self.engine.max_num_tokens if self.engine is not None else None
        if job.guided and budget is not None and len(job.input_ids) + len(job.uncond_input_ids) > budget:
            raise ValueError(f"a CFG pair needs both prompts in one step: {len(job.input_ids)} + "
                             f"{len(job.uncond_input_ids)} tokens exceed the engine's max_num_tokens={budget}")
        if job.guided and self.engine is not None and self.engine.kv_blocks is not None \
                and self._pair_blocks(job) > self.engine.kv_blocks:
            raise ValueError(f"a CFG pair needs {self._pair_blocks(job)} KV blocks to completion, more than the cache's "
                             f"{self.engine.kv_blocks}: lower max_new_tokens or give the KV cache more memory")
        job_id = next(self._job_ids)
        with self._lock:
            if not self._running:
                raise RuntimeError("the guided executor was shut down")
            self._jobs[job_id] = _Job(job, on_event)
            self._waiting.append(job_id)
            self._admit()
        return job_id

    @staticmethod
    def _slots(job: LlmJob) -> int:
        return 2 if job.guided else 1

    def _pair_blocks(self, job: LlmJob) -> int:
        return sum(self.engine.blocks(len(ids), job.max_new_tokens) for ids in (job.input_ids, job.uncond_input_ids))

    def _waiting_context_tokens(self) -> int:
        """Prompt tokens of requests handed over whose context has not run yet (caller holds the lock)."""
        with self.processor.lock:
            return sum(n for req_id, n in self._req_len.items() if not self.processor.started(req_id))

    def _admit(self) -> None:
        """Hand waiting jobs to the executor while they fit, first come first served (caller holds the lock).

        A CFG pair is handed over only when both twins fit the batch slots *and* the step's token budget: every
        context not yet run, both twin prompts and one token per request in flight within ``max_num_tokens``. The
        micro-batch scheduler then has room for both contexts in the same step (it stops adding contexts at the
        first that does not fit, which would otherwise start the twins a step apart for good). With a bounded KV
        cache, the blocks every request in flight reserves to completion and both twins' must fit it as well."""
        while self._waiting:
            state = self._jobs[self._waiting[0]]
            job, need = state.job, self._slots(state.job)
            budget = self.engine.max_num_tokens if self.engine is not None else None
            if not fits_step(job, inflight=self._inflight, max_inflight=self.max_inflight, max_num_tokens=budget,
                             waiting_context_tokens=self._waiting_context_tokens):
                return
            kv_blocks = self.engine.kv_blocks if self.engine is not None else None
            if job.guided and kv_blocks is not None and sum(self._req_blocks.values()) + self._pair_blocks(job) > kv_blocks:
                return                                             # both twins' blocks to completion must be free
            self._enqueue(self._waiting.popleft(), state)
            self._inflight += need

    def _enqueue(self, job_id: int, state: _Job) -> None:
        job = state.job
        if job.output == "text":
            requests = [executor_request(self.trtllm, self.engine, job.input_ids, job, forced=False)]
            roles = [None]
        else:
            pair = next(self._pair_ids)
            state.pair_id = pair
            constraint = self.constraint_factory(job.output, job.input_ids) if self.constraint_factory else None
            with self.processor.lock:
                self.tracker.register(pair, guidance_scale=job.sampling.guidance_scale, sampling=job.sampling,
                                      constraint=constraint)
                if not job.guided:
                    self.tracker.cancel(pair, UNCOND)          # lambda = 1: the conditional row decides alone
            requests = [executor_request(self.trtllm, self.engine, job.input_ids, job, client_id=pair_client_id(pair, COND),
                                         forced=True)]
            roles = [COND]
            if job.guided:
                requests.append(executor_request(self.trtllm, self.engine, job.uncond_input_ids, job,
                                                 client_id=pair_client_id(pair, UNCOND), forced=True))
                roles.append(UNCOND)
        req_ids = self.executor.enqueue_requests(requests)       # both twins in one call, conditional first
        for req_id, role, request in zip(req_ids, roles, requests):
            self._by_req[req_id] = (job_id, role)
            self._req_len[req_id] = len(request.input_token_ids)
            if self.engine is not None:
                self._req_blocks[req_id] = self.engine.blocks(len(request.input_token_ids), job.max_new_tokens)
            state.open_reqs.add(req_id)

    def cancel(self, job_id: int) -> None:
        """Cancel a job (client gone, timeout): both twins; the final event says ``cancelled``."""
        with self._lock:
            state = self._jobs.get(job_id)
            if state is None:
                return
            queued = job_id in self._waiting
            if queued:                                             # never reached the executor
                self._waiting.remove(job_id)
                self._jobs.pop(job_id)
            else:
                if state.pair_id is not None:
                    with self.processor.lock:
                        self.tracker.cancel(state.pair_id, COND)
                        self.tracker.cancel(state.pair_id, UNCOND)
                for req_id in list(state.open_reqs):
                    self.executor.cancel_request(req_id)
        if queued:
            state.on_event(JobEvent(job_id, [], True, "cancelled"))

    # ---- responses ----------------------------------------------------------------------------
    def _close_request(self, job_id: int, state: _Job, req_id: int) -> None:
        """One executor request ended; the job is forgotten once it has answered and all its requests ended."""
        state.open_reqs.discard(req_id)
        self._by_req.pop(req_id, None)
        self._req_len.pop(req_id, None)
        self._req_blocks.pop(req_id, None)
        self._inflight -= 1
        with self.processor.lock:
            self.processor.release(req_id)
            if state.pair_id is not None and not state.open_reqs:
                self.tracker.finish(state.pair_id)
        if state.finished and not state.open_reqs:
            self._jobs.pop(job_id, None)

    def _handle(self, response) -> tuple[JobEvent, Callable] | None:
        key = self._by_req.get(response.request_id)
        if key is None:
            return None
        job_id, role = key
        state = self._jobs[job_id]
        error = response.error_msg if response.has_error() else None
        final = error is not None or response.result.is_final
        if role == UNCOND:                                         # internal twin: never returned
            if final:
                if not state.finished:                             # the conditional row is still decoding
                    if error:
                        log.warning("CFG twin of job %d failed (%s): the conditional row goes on unguided", job_id, error)
                    with self.processor.lock:
                        self.tracker.cancel(state.pair_id, UNCOND)
                self._close_request(job_id, state, response.request_id)
            return None
        if error is not None:
            tokens, reason = [], "error"
        else:
            tokens = [int(t) for t in response.result.output_token_ids[0]]
            reason = finish_reason(response.result) if final else ""
        if final:
            state.finished = True
            self._close_request(job_id, state, response.request_id)
            for other in list(state.open_reqs):                    # the twin has nothing left to guide
                with self.processor.lock:
                    self.tracker.cancel(state.pair_id, UNCOND)
                self.executor.cancel_request(other)
        state.tokens += tokens
        out = tokens if state.job.streaming else (list(state.tokens) if final else None)
        if out is None:
            return None
        return JobEvent(job_id, out, final, reason, error), state.on_event

    def _await_loop(self) -> None:
        while self._running:
            try:
                responses = self.executor.await_responses(timeout=self.poll)
            except Exception as e:  # pragma: no cover - an executor that died: report and stop
                log.error("the executor stopped answering: %s", e)
                break
            if not responses:
                with self._lock:
                    self._admit()                                  # contexts that ran free token budget
            for response in responses:
                with self._lock:
                    handled = self._handle(response)
                    self._admit()                                  # slots freed by finished requests
                if handled is None:
                    continue
                event, callback = handled
                try:
                    callback(event)
                except Exception:  # a consumer's failure must not stop the other jobs
                    log.exception("on_event of job %d failed", event.job_id)

    def pending(self) -> int:
        """Jobs not answered yet (waiting for admission or in the executor)."""
        with self._lock:
            return len(self._jobs)

    def shutdown(self) -> None:
        self._running = False
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.executor.shutdown()
