"""Audex requests on TensorRT-LLM's LLM API (PyTorch backend): both backbones, audio as multimodal embeddings, CFG
twins through per-request logits processors.

TensorRT-LLM is removing its TensorRT-engine backend, and only the PyTorch backend has Nemotron-H (the 30B-A3B), so
this is the route for both backbones. :class:`LlmApiBackend` takes the same :class:`~audex.serving.guided_executor.
LlmJob` s as :class:`~audex.serving.guided_executor.GuidedExecutor` (``submit`` / ``cancel`` / ``stats`` /
``shutdown``), so the Triton LLM step runs either:

* the model is the export's ``hf/`` folder under an Audex architecture (:mod:`audex.serving.llm_api_model`), loaded
  by ``LLM(model=..., skip_tokenizer_init=True, ...)``; a prompt with audio is
  :func:`~audex.serving.llm_api_model.audio_prompt` (its frames as multimodal embeddings);
* **text** jobs are one request sampled by the engine (``SamplingParams(top_k, top_p, temperature, seed)``; greedy
  as ``top_k=1``); **speech / audio** jobs are a CFG pair whose every token is decided by
  :class:`~audex.serving.cfg_pairing.CfgPairTracker` (eq. (3), the codec grammar, the pair's seeded draw) and forced
  on both twins through their ``logits_processor`` (:mod:`audex.serving.llm_api_pairing`);
* **admission** as for the executor path: a pair is handed over only when both twins fit the batch slots and the
  step's token budget (both prompts, the contexts handed over that have not run, one token per request in flight,
  within ``max_num_tokens``); every request has a processor, which is how a context is seen to have run;
* **settings** that keep a pair together and the audio right: KV block reuse off (the multimodal rows carry no
  content hash here, and twins must not share blocks), chunked prefill off (a prompt and its rows in one step),
  the overlap scheduler off (a processor must see the tokens of the step before), guaranteed-no-evict scheduling,
  one rank in this process (``TLLM_WORKER_USE_SINGLE_PROCESS=1``; the processors and the registered Audex models
  live here). :func:`check_llm_api_limits` refuses sizes that cannot hold a clip of the longest allowed length.

``llm_module``: :func:`llm_api_module` ``("tensorrt_llm")`` on GPU hosts, or :mod:`audex.serving.reference_llm_api`.

Example::

    >>> backend = LlmApiBackend.create(llm_api_module("torch"), "export", tokenizer, sizes, ServeLimits(), 750, 30.0)
    >>> backend.submit(LlmJob(ids, 64, end_id, pad_id, SamplingParams(), prompt_table=table), on_event=print)
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import itertools
import json
import logging
import math
import os
import secrets
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from audex.inference.constraints import CodecConstraint
from audex.inference.sampling import SamplingParams
from audex.serving.cfg_pairing import COND, UNCOND, CfgPairTracker
from audex.serving.engine_facts import EngineFacts
from audex.serving.llm_api_model import (
    AUDEX_ARCHITECTURES,
    AudexInputProcessor,
    audio_prompt,
    prepare_model_dir,
    register_trtllm_models,
)
from audex.serving.llm_api_pairing import ContextProbe, StepPairing, TwinLogitsProcessor
from audex.serving.llm_job import JobEvent, LlmJob, fits_step
from audex.serving.requests import ServeLimits

log = logging.getLogger(__name__)

PROMPT_TEXT_TOKENS = 256        # room the checks leave for a prompt's text around one clip's frames


def llm_api_module(kind: str):
    """``tensorrt_llm``: the names Audex uses from ``tensorrt_llm`` / ``tensorrt_llm.llmapi``; ``torch``: the CPU
    reference (:mod:`audex.serving.reference_llm_api`)."""
    if kind == "torch":
        return importlib.import_module("audex.serving.reference_llm_api")
    if kind != "tensorrt_llm":
        raise ValueError(f"the LLM API module must be 'tensorrt_llm' or 'torch', got {kind!r}")
    try:
        import tensorrt_llm  # optional heavy dependency (CUDA hosts)
        from tensorrt_llm import llmapi
    except ImportError as e:
        raise RuntimeError(f"tensorrt_llm cannot be imported ({e}); on a host without it use executor='torch'") from None
    return types.SimpleNamespace(LLM=tensorrt_llm.LLM, SamplingParams=tensorrt_llm.SamplingParams,
                                 KvCacheConfig=llmapi.KvCacheConfig, SchedulerConfig=llmapi.SchedulerConfig,
                                 CapacitySchedulerPolicy=llmapi.CapacitySchedulerPolicy, __name__="tensorrt_llm")


def check_llm_api_limits(sizes: dict, limits: ServeLimits, frames_per_window: int, window_seconds: float, vocab,
                         tp_size: int = 1) -> None:
    """``ValueError`` naming the setting to change when the LLM's sizes (``trtllm.build``: ``max_batch_size``,
    ``max_input_len``, ``max_seq_len``, ``max_num_tokens``) cannot serve what ``serve.*`` allows."""
    clip = math.ceil(limits.max_audio_seconds / window_seconds) * int(frames_per_window)
    need = {"max_input_len": clip + PROMPT_TEXT_TOKENS}
    need["max_num_tokens"] = need["max_input_len"]                   # no chunked prefill: a prompt runs in one step
    outputs = {"serve.max_new_tokens": limits.max_new_tokens,
               "serve.max_speech_seconds": math.ceil(limits.max_speech_seconds * vocab.tokens_per_second("speech")) + 2,
               "serve.tta_seconds": math.ceil(limits.tta_seconds * vocab.tokens_per_second("audio")) + 2}
    longest = max(outputs, key=outputs.get)
    need["max_seq_len"] = max(need["max_input_len"] + limits.max_new_tokens, outputs[longest] + PROMPT_TEXT_TOKENS)
    need["max_batch_size"] = 2                                        # a CFG pair
    for key, value in need.items():
        if key not in sizes or sizes[key] is None:
            raise ValueError(f"trtllm.build.{key} is not set: the LLM API path needs it (at least {value})")
        if int(sizes[key]) < value:
            raise ValueError(
                f"trtllm.build.{key}={sizes[key]} is too small for the LLM API path: it needs {value} -- one clip of "
                f"serve.max_audio_seconds={limits.max_audio_seconds:g} is {clip} frames ({frames_per_window} per "
                f"{window_seconds:g} s window) + {PROMPT_TEXT_TOKENS} prompt tokens, the longest output is "
                f"{outputs[longest]} tokens ({longest}); raise {key} or lower the serve.* limits")
    if int(tp_size) != 1:
        raise ValueError(f"trtllm.tp_size={tp_size}: the LLM API path runs one rank in the serving process (its CFG "
                         "processors and Audex models live there); serve with trtllm.tp_size=1")


@dataclass
class _Job:
    job: LlmJob
    on_event: Callable[[JobEvent], None]
    pair_id: int | None = None
    results: dict = field(default_factory=dict)      # role (None for text) -> the LLM API result
    keys: dict = field(default_factory=dict)         # role -> request key (admission / context probe)
    sent: int = 0                                    # tokens already emitted (streaming)
    finished: bool = False


class LlmApiBackend:
    """Runs :class:`LlmJob` s on an ``LLM`` (see the module docstring)."""

    def __init__(self, llm_module, llm, pairing: StepPairing, sizes: dict, engine: EngineFacts,
                 constraint_factory: Callable | None = None):
        self.trtllm, self.llm, self.pairing, self.engine = llm_module, llm, pairing, engine
        self.max_inflight = int(sizes["max_batch_size"])
        self.max_num_tokens = int(sizes["max_num_tokens"])
        self.max_seq_len = int(sizes["max_seq_len"])
        self.constraint_factory = constraint_factory
        self._jobs: dict[int, _Job] = {}
        self._waiting: collections.deque = collections.deque()
        self._prompt_len: dict = {}                      # request key -> prompt length, while in flight
        self._inflight = 0
        self._ids, self._pair_ids, self._keys = itertools.count(1), itertools.count(0), itertools.count(1)
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="audex-llm-api", daemon=True)
        self._thread.start()
        pairing.on_started = lambda key: self.loop.call_soon_threadsafe(self._admit)

    @classmethod
    def create(cls, llm_module, export_dir, tokenizer, sizes: dict, limits: ServeLimits, frames_per_window: int,
               window_seconds: float, *, audio_seconds: float = 10.0, max_speech_seconds: float | None = None,
               max_lag_steps: int = 4, tp_size: int = 1, dtype: str = "auto",
               free_gpu_memory_fraction: float = 0.85) -> "LlmApiBackend":
        """Check the sizes, write the Audex model folder, register the models, build the ``LLM`` and the router."""
        check_llm_api_limits(sizes, limits, frames_per_window, window_seconds, tokenizer.vocab, tp_size)
        export_dir = Path(export_dir)
        folder = prepare_model_dir(export_dir / "hf", export_dir / "llm_api")
        if hasattr(llm_module, "register_architecture"):          # the reference
            for name in AUDEX_ARCHITECTURES.values():
                llm_module.register_architecture(name, AudexInputProcessor)
        else:
            os.environ.setdefault("TLLM_WORKER_USE_SINGLE_PROCESS", "1")
            register_trtllm_models()
        t = llm_module
        llm = t.LLM(model=str(folder), skip_tokenizer_init=True, tensor_parallel_size=1, dtype=dtype, backend="pytorch",
                    max_batch_size=int(sizes["max_batch_size"]), max_input_len=int(sizes["max_input_len"]),
                    max_seq_len=int(sizes["max_seq_len"]), max_num_tokens=int(sizes["max_num_tokens"]),
                    kv_cache_config=t.KvCacheConfig(enable_block_reuse=False,
                                                    free_gpu_memory_fraction=free_gpu_memory_fraction),
                    enable_chunked_prefill=False, disable_overlap_scheduler=True,
                    scheduler_config=t.SchedulerConfig(
                        capacity_scheduler_policy=t.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT))
        pairing = StepPairing(CfgPairTracker(SamplingParams(), 1.0, [tokenizer.im_end], can_hold=False,
                                             max_lag_steps=max_lag_steps))
        grammars = {kind: CodecConstraint.for_task(tokenizer, kind, audio_seconds=audio_seconds,
                                                   max_speech_seconds=max_speech_seconds) for kind in ("speech", "audio")}
        hidden = int(json.loads((export_dir / "hf" / "config.json").read_text())["hidden_size"])
        engine = EngineFacts(tokenizer.vocab.size, False, int(sizes["max_num_tokens"]), hidden, torch.float32)
        return cls(llm_module, llm, pairing, sizes, engine, lambda output, prompt: grammars[output].begin([prompt]))

    @property
    def stats(self) -> dict:
        """The pair tracker's counts (``guided``, ``unguided``, ``split``, ... as for the executor path)."""
        return self.pairing.stats()

    def pending(self) -> int:
        with self._lock:
            return len(self._jobs)

    # ---- submitting (any thread) -> the loop thread ------------------------------------------------
    def submit(self, job: LlmJob, on_event: Callable[[JobEvent], None]) -> int:
        """Queue ``job``; ``on_event`` gets its :class:`JobEvent` s from the backend's loop thread."""
        prompts = [job.input_ids] + ([job.uncond_input_ids] if job.guided else [])
        if sum(len(p) for p in prompts) > self.max_num_tokens:
            raise ValueError(f"a CFG pair needs both prompts in one step: {' + '.join(str(len(p)) for p in prompts)} "
                             f"tokens exceed max_num_tokens={self.max_num_tokens}")
        if max(len(p) for p in prompts) + job.max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({max(len(p) for p in prompts)} tokens) + max_new_tokens ({job.max_new_tokens}) "
                             f"exceed max_seq_len={self.max_seq_len}")
        if job.guided and job.sampling.do_sample and job.sampling.seed is None:
            job.sampling = job.sampling.replace(seed=secrets.randbits(62))     # the pair's draw must be repeatable
        job_id = next(self._ids)
        with self._lock:
            self._jobs[job_id] = _Job(job, on_event)
        self.loop.call_soon_threadsafe(self._queue, job_id)
        return job_id

    def cancel(self, job_id: int) -> None:
        """Cancel a job (client gone, timeout): both twins; the final event says ``cancelled``."""
        self.loop.call_soon_threadsafe(self._cancel, job_id)

    def shutdown(self) -> None:
        """Stop following requests (their tasks are cancelled), then the loop, the LLM and the pairing session."""
        async def drain():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(drain(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()
        self.llm.shutdown()
        self.pairing.close()

    # ---- the loop thread ---------------------------------------------------------------------------
    def _queue(self, job_id: int) -> None:
        self._waiting.append(job_id)
        self._admit()

    def _cancel(self, job_id: int) -> None:
        state = self._jobs.get(job_id)
        if state is None:
            return
        if job_id in self._waiting:                                    # never reached the LLM
            self._waiting.remove(job_id)
            self._end_job(job_id, state, JobEvent(job_id, [], True, "cancelled"))
            return
        if state.pair_id is not None:
            self.pairing.cancel(state.pair_id, COND)
            self.pairing.cancel(state.pair_id, UNCOND)
        for result in state.results.values():
            if result is not None:
                result.abort()

    def _admit(self) -> None:
        """Hand waiting jobs over while they fit, first come first served (see the module docstring)."""
        while self._waiting:
            job_id = self._waiting[0]
            job = self._jobs[job_id].job
            if not fits_step(job, inflight=self._inflight, max_inflight=self.max_inflight,
                             max_num_tokens=self.max_num_tokens, waiting_context_tokens=self._waiting_context_tokens):
                return
            self._waiting.popleft()
            self._start(job_id, self._jobs[job_id])

    def _waiting_context_tokens(self) -> int:
        """Prompt tokens of requests handed over whose context has not run yet (caller holds the lock)."""
        return sum(n for key, n in self._prompt_len.items() if key not in self.pairing.started)

    def _params(self, job: LlmJob, processor, forced: bool):
        s = job.sampling
        draw = {"top_k": 1} if forced or not s.do_sample else \
            {"top_k": s.top_k or None, "top_p": s.top_p, "temperature": s.temperature, "seed": s.seed}
        return self.trtllm.SamplingParams(end_id=int(job.end_id), pad_id=int(job.pad_id),
                                          max_tokens=int(job.max_new_tokens), logits_processor=processor,
                                          detokenize=False, **draw)

    def _start(self, job_id: int, state: _Job) -> None:
        job, session = state.job, self.pairing.session
        requests = []                                   # (role, ids, table, processor)
        if job.output == "text":
            key = next(self._keys)
            requests.append((None, job.input_ids, job.prompt_table, ContextProbe(session, key), key))
        else:
            state.pair_id = pair = next(self._pair_ids)
            constraint = self.constraint_factory(job.output, job.input_ids) if self.constraint_factory else None
            self.pairing.register(pair, guidance_scale=job.sampling.guidance_scale, sampling=job.sampling,
                                  constraint=constraint)
            if not job.guided:
                self.pairing.cancel(pair, UNCOND)                     # lambda = 1: the conditional row decides alone
            for role, ids, table in ((COND, job.input_ids, job.prompt_table), (UNCOND, job.uncond_input_ids, None)):
                if role == COND or job.guided:
                    key = next(self._keys)
                    requests.append((role, ids, table, TwinLogitsProcessor(session, key, pair, role, len(ids)), key))
        for role, ids, table, processor, key in requests:             # conditional first, in one go
            try:
                result = self.llm.generate_async(audio_prompt(ids, table), self._params(job, processor, role is not None),
                                                 streaming=job.streaming)
            except Exception as e:  # refused by the LLM (limits, bad prompt): the job fails, the rest goes on
                for other in state.results.values():
                    if other is not None:
                        other.abort()
                self._end_job(job_id, state, JobEvent(job_id, [], True, "error", f"{type(e).__name__}: {e}"))
                return
            state.results[role], state.keys[role] = result, key
            self._prompt_len[key] = len(ids)
            self._inflight += 1
            self.loop.create_task(self._follow(job_id, state, role, result))

    async def _follow(self, job_id: int, state: _Job, role, result) -> None:
        error = None
        try:
            async for out in result:
                if role != UNCOND:
                    self._emit(job_id, state, out, final=out.finished)
        except Exception as e:  # the LLM failed the request
            error = f"{type(e).__name__}: {e}"
        self._request_ended(job_id, state, role, error)

    def _emit(self, job_id: int, state: _Job, out, final: bool) -> None:
        if state.finished:
            return
        tokens = [int(t) for t in out.outputs[0].token_ids]
        reason = (out.outputs[0].finish_reason or "") if final else ""      # stop / length / cancelled / timeout
        if final and tokens and tokens[-1] == state.job.end_id:
            tokens = tokens[:-1]                                      # the end token is not part of the answer
        new, state.sent = tokens[state.sent:], len(tokens)
        if state.job.streaming and (new or final):
            self._deliver(state, JobEvent(job_id, new, final, reason))
        elif final:
            self._deliver(state, JobEvent(job_id, tokens, True, reason))
        if final:
            state.finished = True
            twin = state.results.get(UNCOND)
            if twin is not None and not twin.finished:                # the twin has nothing left to guide
                self.pairing.cancel(state.pair_id, UNCOND)
                twin.abort()

    def _request_ended(self, job_id: int, state: _Job, role, error: str | None) -> None:
        self._prompt_len.pop(state.keys.get(role), None)
        self._inflight -= 1
        if role == UNCOND and not state.finished:
            self.pairing.cancel(state.pair_id, UNCOND)                # the conditional row goes on unguided
        if role != UNCOND and not state.finished:                     # failed before its final output
            state.finished = True
            self._deliver(state, JobEvent(job_id, [], True, "error", error or "the request ended without output"))
        state.results[role] = None
        if all(r is None for r in state.results.values()):
            if state.pair_id is not None:
                self.pairing.finish(state.pair_id)
            with self._lock:
                self._jobs.pop(job_id, None)
        self._admit()

    def _end_job(self, job_id: int, state: _Job, event: JobEvent) -> None:
        state.finished = True
        if state.pair_id is not None and not state.results:
            self.pairing.finish(state.pair_id)
        if not state.results:
            with self._lock:
                self._jobs.pop(job_id, None)
        self._deliver(state, event)

    @staticmethod
    def _deliver(state: _Job, event: JobEvent) -> None:
        try:
            state.on_event(event)
        except Exception:  # a consumer's failure must not stop the other jobs
            log.exception("on_event of job %d failed", event.job_id)
