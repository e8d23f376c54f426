"""A CPU reference of the part of TensorRT-LLM's LLM API (PyTorch backend) that :mod:`audex.serving.llm_api_backend`
uses, as strict as the pinned release (``TRTLLM_VERSION``), so the serving code runs and is tested without a GPU.

Names and keywords follow the pinned sources: ``LLM(model, ..., **kwargs)`` with the ``LlmArgs`` fields of
``tensorrt_llm/llmapi/llm_args.py`` (a keyword ``LlmArgs`` does not have is a ``TypeError``; one it has but this
reference does not model is a ``ValueError`` unless left at its default), ``LLM.generate_async`` of
``tensorrt_llm/llmapi/llm.py`` (a multimodal prompt: ``{"prompt", "multi_modal_embeddings", "mm_processor_kwargs"}``
through the registered input processor's ``attach_multimodal_embeddings``; the ``max_num_tokens`` check of
``_check_arguments``; ``end_id`` required without a tokenizer), ``SamplingParams`` of
``tensorrt_llm/sampling_params.py``, and the result object of ``tensorrt_llm/executor/result.py``
(``result()``, ``aresult()``, sync and async iteration, ``abort()``, ``outputs[0].token_ids`` / ``finish_reason``).

The engine loop follows the PyTorch executor with ``GUARANTEED_NO_EVICT``, no chunked prefill and no overlap
scheduler: each step takes new contexts in arrival order while batch slots and the ``max_num_tokens`` budget last
(:func:`~audex.serving.executor_blocks.schedule_contexts`), runs the model, then calls every request's logits
processors -- context requests first -- as ``lp(req_id, logits, token_ids, None, None)`` with ``logits`` a
``[1, 1, vocab]`` view of the step's one logits tensor (``_execute_logit_post_processors``, which also refuses a
processor without 4 or 5 parameters), and only then samples. A registered model architecture is required
(:func:`register_architecture`, as ``get_model_architecture`` refuses unknown ones); its multimodal rows replace the
prompt's ids ``>= vocab_size`` in order (``fuse_input_embeds``). Every request runs alone with its own transformers
cache: the point is the contract, not speed; the ``gpu`` tests check the real engine.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from audex.inference.sampling import SamplingParams as _Draw
from audex.inference.sampling import TokenSampler
from audex.serving.executor_blocks import TRTLLM_VERSION, schedule_contexts

ARCHITECTURES: dict[str, type] = {}      # architecture name -> input processor class (MODEL_CLASS_MAPPING + registry)


def register_architecture(name: str, input_processor_cls) -> None:
    """What ``register_auto_model(name)`` + ``register_input_processor(cls, ...)`` do for the real engine."""
    ARCHITECTURES[name] = input_processor_cls


def _refuse(owner: str, given: dict, modelled_defaults: dict) -> None:
    for name, value in given.items():
        if name not in modelled_defaults:
            raise TypeError(f"{owner} got an unexpected keyword argument {name!r}: tensorrt_llm=={TRTLLM_VERSION} "
                            "has no such argument")
        if value != modelled_defaults[name]:
            raise ValueError(f"{owner}({name}={value!r}) is a real tensorrt_llm argument that the reference LLM API "
                             "does not model; leave it at its default")


class CapacitySchedulerPolicy(str, enum.Enum):
    MAX_UTILIZATION = "MAX_UTILIZATION"
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"
    STATIC_BATCH = "STATIC_BATCH"


class SchedulerConfig:
    """``tensorrt_llm.llmapi.SchedulerConfig``: the guaranteed-no-evict policy only."""

    def __init__(self, capacity_scheduler_policy=CapacitySchedulerPolicy.GUARANTEED_NO_EVICT, **kwargs):
        _refuse("SchedulerConfig", kwargs, {"context_chunking_policy": None, "dynamic_batch_config": None})
        if capacity_scheduler_policy != CapacitySchedulerPolicy.GUARANTEED_NO_EVICT:
            raise ValueError("the reference LLM API models the GUARANTEED_NO_EVICT capacity scheduler only")
        self.capacity_scheduler_policy = capacity_scheduler_policy


class KvCacheConfig:
    """``tensorrt_llm.llmapi.KvCacheConfig``; block reuse (on by default in the real one) is not modelled here."""

    def __init__(self, enable_block_reuse: bool = True, max_tokens: int | None = None,
                 free_gpu_memory_fraction: float | None = 0.9, **kwargs):
        _refuse("KvCacheConfig", kwargs, {k: None for k in (
            "max_attention_window", "sink_token_length", "host_cache_size", "onboard_blocks", "cross_kv_cache_fraction",
            "secondary_offload_min_priority", "event_buffer_max_size", "enable_partial_reuse", "copy_on_partial_reuse",
            "use_uvm", "tokens_per_block", "dtype")})
        if enable_block_reuse:
            raise ValueError("KvCacheConfig(enable_block_reuse=True) is the real default, but block reuse is not "
                             "modelled by the reference LLM API: pass enable_block_reuse=False")
        self.enable_block_reuse, self.max_tokens = enable_block_reuse, max_tokens
        self.free_gpu_memory_fraction = free_gpu_memory_fraction


_UNMODELLED = dict(bad=None, bad_token_ids=None, stop=None, stop_token_ids=None, include_stop_str_in_output=False,
                   embedding_bias=None, apply_batched_logits_processor=False, n=1, best_of=None, use_beam_search=False,
                   top_p_min=None, top_p_reset_ids=None, top_p_decay=None, min_tokens=None, presence_penalty=None,
                   beam_search_diversity_rate=None, repetition_penalty=None, frequency_penalty=None,
                   length_penalty=None, early_stopping=None, no_repeat_ngram_size=None,
                   min_p=None, beam_width_array=None, logprobs=None, prompt_logprobs=None, return_context_logits=False,
                   return_generation_logits=False, exclude_input_from_output=True, return_encoder_output=False,
                   return_perf_metrics=False, additional_model_outputs=None, lookahead_config=None,
                   guided_decoding=None, ignore_eos=False, add_special_tokens=True, truncate_prompt_tokens=None,
                   skip_special_tokens=True, spaces_between_special_tokens=True)


class SamplingParams:
    """``tensorrt_llm.SamplingParams`` (keyword-only): the fields modelled here; the other real ones at defaults."""

    def __init__(self, *, end_id=None, pad_id=None, max_tokens=32, logits_processor=None, top_k=None, top_p=None,
                 seed=None, temperature=None, detokenize=True, **kwargs):
        _refuse("SamplingParams", kwargs, _UNMODELLED)
        self.end_id, self.pad_id, self.max_tokens, self.logits_processor = end_id, pad_id, max_tokens, logits_processor
        self.top_k, self.top_p, self.seed, self.temperature, self.detokenize = top_k, top_p, seed, temperature, detokenize

    def draw(self) -> TokenSampler:
        """The engine's sampler: greedy when ``top_k == 1``, ``temperature == 0`` or nothing is set."""
        sampled = self.top_k not in (None, 1) or self.top_p not in (None, 1.0) or self.temperature not in (None, 1.0)
        if self.top_k == 1 or self.temperature == 0 or not sampled:
            return TokenSampler(_Draw(do_sample=False))
        return TokenSampler(_Draw(do_sample=True, temperature=float(self.temperature or 1.0), top_k=self.top_k or None,
                                  top_p=self.top_p, seed=self.seed))


@dataclass
class CompletionOutput:
    index: int
    token_ids: list = field(default_factory=list)
    finish_reason: str | None = None
    _last: int = 0        # tokens before the latest update

    @property
    def token_ids_diff(self) -> list:
        return self.token_ids[self._last:]


class RequestOutput:
    """``GenerationResult``: filled by the engine thread; async when created inside a running event loop."""

    def __init__(self, request_id: int, prompt, prompt_token_ids: list, streaming: bool, engine: "LLM"):
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.outputs = [CompletionOutput(0)]
        self._streaming, self._engine, self._done, self._aborted = streaming, engine, False, False
        self._queue: queue.Queue = queue.Queue()
        try:
            self._loop = asyncio.get_running_loop()
            self._aqueue = asyncio.Queue()
        except RuntimeError:
            self._loop, self._aqueue = None, None

    @property
    def finished(self) -> bool:
        return self._done

    def _push(self, update) -> None:                    # engine thread
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._aqueue.put_nowait, update)
        else:
            self._queue.put(update)

    def _handle(self, update) -> None:
        tokens, reason, error = update
        out = self.outputs[0]
        out._last = len(out.token_ids)
        out.token_ids = out.token_ids + tokens
        if error is not None:
            self._done = True
            raise RuntimeError(error)
        if reason is not None:
            out.finish_reason, self._done = reason, True

    def _result_step(self, timeout=None):
        self._handle(self._queue.get(timeout=timeout))

    async def _aresult_step(self):
        if self._aqueue is None:
            raise RuntimeError("The asyncio event loop was not present during initialization, so async operations "
                               "are not available.")
        self._handle(await self._aqueue.get())

    def result(self, timeout: float | None = None) -> "RequestOutput":
        while not self._done:
            self._result_step(timeout)
        return self

    async def aresult(self) -> "RequestOutput":
        while not self._done:
            await self._aresult_step()
        return self

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        return self._result_step() or self

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        return await self._aresult_step() or self

    def abort(self) -> None:
        self._engine._abort(self.request_id)
        self._aborted = True


@dataclass
class _Live:
    output: RequestOutput
    ids: list
    rows: torch.Tensor | None
    params: SamplingParams
    max_tokens: int
    prompt_len: int
    blocks: int = 0
    cache: object = None
    sampler: object = None
    generated: list = field(default_factory=list)


_LLM_ARGS = dict(backend=None, max_batch_size=None, max_input_len=None, max_seq_len=None, max_num_tokens=8192,
                 kv_cache_config=None, enable_chunked_prefill=False, disable_overlap_scheduler=False, scheduler_config=None)
_LLM_UNMODELLED = dict(pipeline_parallel_size=1, context_parallel_size=1, gpus_per_node=None, moe_expert_parallel_size=None,
                       enable_attention_dp=False, cuda_graph_config=None, enable_lora=False, lora_config=None,
                       speculative_config=None, guided_decoding_backend=None, batched_logits_processor=None,
                       max_beam_width=None, load_format="auto", enable_iter_perf_stats=False, return_perf_metrics=False,
                       attn_backend="TRTLLM", torch_compile_config=None, moe_config=None, orchestrator_type=None)


class LLM:
    """``tensorrt_llm.LLM`` (PyTorch backend) over a transformers model on the CPU (see the module docstring)."""

    def __init__(self, model, tokenizer=None, tokenizer_mode="auto", skip_tokenizer_init=False, trust_remote_code=False,
                 tensor_parallel_size=1, dtype="auto", revision=None, tokenizer_revision=None, **kwargs):
        _refuse("LLM", {k: v for k, v in kwargs.items() if k not in _LLM_ARGS}, _LLM_UNMODELLED)
        args = {**_LLM_ARGS, **{k: v for k, v in kwargs.items() if k in _LLM_ARGS}}
        if args["backend"] not in (None, "pytorch"):
            raise ValueError(f"the reference LLM API is the PyTorch backend, not backend={args['backend']!r}")
        if tensor_parallel_size != 1:
            raise ValueError("the reference LLM API runs one rank (tensor_parallel_size=1)")
        if args["enable_chunked_prefill"] or not args["disable_overlap_scheduler"]:
            raise ValueError("the reference LLM API models enable_chunked_prefill=False and "
                             "disable_overlap_scheduler=True only")
        if tokenizer is not None or not skip_tokenizer_init:
            raise ValueError("the reference LLM API takes token-id prompts only: pass skip_tokenizer_init=True")
        self.kv_cache_config = args["kv_cache_config"] or KvCacheConfig()
        self.scheduler_config = args["scheduler_config"] or SchedulerConfig()
        folder = Path(str(model))
        config = json.loads((folder / "config.json").read_text())
        arch = (config.get("architectures") or [None])[0]
        if arch not in ARCHITECTURES:
            raise RuntimeError(f"Unknown model architecture: {arch}")
        self.lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.input_processor = ARCHITECTURES[arch](str(folder), self.lm.config, None, trust_remote_code=True)
        self.vocab_size = int(self.lm.get_input_embeddings().weight.shape[0])
        self.max_batch_size = int(args["max_batch_size"] or 2048)
        self.max_input_len = int(args["max_input_len"] or 1024)                     # set_default_max_input_len
        self.max_seq_len = int(args["max_seq_len"] or self.lm.config.max_position_embeddings)
        self.max_num_tokens = int(args["max_num_tokens"])
        self._keeps_last = "logits_to_keep" in inspect.signature(self.lm.forward).parameters
        self._lock = threading.Condition()
        self._waiting, self._active, self._aborted = [], {}, set()    # _Live s; request id -> _Live; request ids
        self._next_id, self._running = 1, True
        self.steps: list[list[int]] = []                 # request ids of each step (what the scheduler ran)
        self._thread = threading.Thread(target=self._loop, name="reference-llm-api", daemon=True)
        self._thread.start()

    # ---- client API ---------------------------------------------------------------------------
    def generate_async(self, inputs, sampling_params: SamplingParams | None = None, lora_request=None,
                       prompt_adapter_request=None, streaming: bool = False, queries=None,
                       kv_cache_retention_config=None, disaggregated_params=None, scheduling_params=None,
                       cache_salt=None) -> RequestOutput:
        unmodelled = dict(lora_request=lora_request, prompt_adapter_request=prompt_adapter_request, queries=queries,
                          kv_cache_retention_config=kv_cache_retention_config,
                          disaggregated_params=disaggregated_params, scheduling_params=scheduling_params,
                          cache_salt=cache_salt)
        _refuse("LLM.generate_async", unmodelled, dict.fromkeys(unmodelled))
        params = sampling_params or SamplingParams()
        if params.end_id is None:
            raise ValueError("tokenizer is required to reset end_id if it is None, or you can explicitly specify the "
                             "end_id for sampling_params")
        ids, rows, prompt = self._preprocess(inputs, params)
        if len(ids) > self.max_num_tokens:                  # _check_arguments, chunked prefill off
            raise ValueError(f"The sum of prompt length ({float(len(ids))}), query length (0) should not exceed "
                             f"max_num_tokens ({self.max_num_tokens})")
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"prompt length ({len(ids)}) must stay below max_seq_len ({self.max_seq_len})")
        for lp in params.logits_processor if isinstance(params.logits_processor, list) else [params.logits_processor]:
            if lp is not None and not 4 <= len(inspect.signature(lp).parameters) <= 5:
                raise AssertionError("Logit post processor signature must match the `LogitsProcessor` interface "
                                     "defined in `tensorrtllm.sampling_params`.")
        with self._lock:
            req_id, self._next_id = self._next_id, self._next_id + 1
            output = RequestOutput(req_id, prompt, ids, streaming, self)
            budget = min(int(params.max_tokens), self.max_seq_len - len(ids))     # capped, as the engine does
            self._waiting.append(_Live(output, ids, rows, params, budget, len(ids)))
            self._lock.notify_all()
        return output

    def _preprocess(self, inputs, params):
        if isinstance(inputs, list):
            inputs = {"prompt_token_ids": inputs}
        if not isinstance(inputs, dict) or ("prompt" not in inputs and "prompt_token_ids" not in inputs):
            raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")
        mm = inputs.get("multi_modal_embeddings")
        if inputs.get("multi_modal_data") is not None:
            raise ValueError("multi_modal_data (raw media) is not modelled: give multi_modal_embeddings")
        if "prompt_token_ids" in inputs:
            if mm is not None:
                raise ValueError("a prompt given as token ids with multi_modal_embeddings is decoded back to text by "
                                 "the tokenizer (generate_async of the pinned release); this LLM has none")
            return [int(t) for t in inputs["prompt_token_ids"]], None, None
        processed = (self.input_processor.attach_multimodal_embeddings(inputs, mm, params) if mm is not None
                     else self.input_processor(inputs, params))
        ids, extra = processed
        rows = None if not extra else extra["multimodal_data"]["multimodal_embedding"]
        bad = [t for t in ids if t < 0 or (t >= self.vocab_size and rows is None)]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary ({self.vocab_size}) and no multimodal rows "
                             "fill it")
        return ids, rows, inputs["prompt"]

    def _abort(self, req_id: int) -> None:
        with self._lock:
            self._aborted.add(int(req_id))
            self._lock.notify_all()

    def shutdown(self) -> None:
        with self._lock:
            self._running = False
            self._lock.notify_all()
        self._thread.join(timeout=30)

    # ---- the engine ---------------------------------------------------------------------------
    def _embed(self, live: _Live) -> torch.Tensor:
        ids = torch.tensor([live.ids])
        fake = ids >= self.vocab_size
        embeds = self.lm.get_input_embeddings()(torch.where(fake, torch.zeros_like(ids), ids))
        if live.rows is not None:                        # fuse_input_embeds: rows at the ids >= vocab_size, in order
            embeds[fake] = live.rows.to(embeds.dtype)
        return embeds

    @torch.no_grad()
    def _forward(self, live: _Live, context: bool) -> torch.Tensor:
        n = live.prompt_len + len(live.generated)
        kwargs = dict(past_key_values=live.cache, use_cache=True, attention_mask=torch.ones(1, n, dtype=torch.long))
        if self._keeps_last:
            kwargs["logits_to_keep"] = 1
        if context:
            out = self.lm(inputs_embeds=self._embed(live), position_ids=torch.arange(n)[None], **kwargs)
        else:
            out = self.lm(input_ids=torch.tensor([[live.generated[-1]]]), position_ids=torch.tensor([[n - 1]]), **kwargs)
        return out.logits[0, -1].float()

    def _finish(self, live: _Live, tokens: list, reason: str | None, error: str | None = None) -> None:
        self._active.pop(live.output.request_id, None)
        live.output._push((tokens, reason, error))

    def step(self) -> int:
        with self._lock:
            for req_id in list(self._aborted):
                gone = self._active.pop(req_id, None) or next((w for w in self._waiting
                                                               if w.output.request_id == req_id), None)
                if gone is not None:
                    if gone in self._waiting:
                        self._waiting.remove(gone)
                    gone.output._push(([] if gone.output._streaming else list(gone.generated), "cancelled", None))
                self._aborted.discard(req_id)
            contexts, _ = schedule_contexts(self._waiting, self.max_batch_size - len(self._active), len(self._active),
                                            self.max_num_tokens, lambda w: None)
            for live in contexts:
                self._waiting.remove(live)
                live.cache, live.sampler = DynamicCache(config=self.lm.config), live.params.draw()
            rows = contexts + list(self._active.values())     # context requests first, as the engine orders them
            for live in contexts:
                self._active[live.output.request_id] = live
        if not rows:
            return 0
        try:
            logits = torch.stack([self._forward(live, live in contexts) for live in rows])
            for i, live in enumerate(rows):
                lps = live.params.logits_processor
                for lp in (lps if isinstance(lps, list) else [lps] if lps is not None else []):
                    lp(live.output.request_id, logits[i:i + 1].view(1, 1, -1), [live.ids + live.generated], None, None)
            tokens = [int(live.sampler(logits[i:i + 1])[0]) for i, live in enumerate(rows)]
        except Exception as e:  # the executor fails the step's requests with the error
            with self._lock:
                for live in rows:
                    self._finish(live, [], None, f"{type(e).__name__}: {e}")
            return len(rows)
        with self._lock:
            self.steps.append([live.output.request_id for live in rows])
            for live, token in zip(rows, tokens):
                if live.output.request_id not in self._active:
                    continue
                ended = token == live.params.end_id
                if not ended:
                    live.generated.append(token)
                reason = "stop" if ended else "length" if len(live.generated) >= live.max_tokens else None
                streamed = [] if ended else [token]
                if reason is not None:
                    self._finish(live, streamed if live.output._streaming else list(live.generated), reason)
                elif live.output._streaming:
                    live.output._push((streamed, None, None))
            self._lock.notify_all()
        return len(rows)

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: not self._running or self._waiting or self._active or self._aborted)
                if not self._running:
                    return
                if not self._waiting and not self._active:
                    self._aborted.clear()
                    continue
            self.step()

