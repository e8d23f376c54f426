"""The step handlers of the GPU ensemble: preprocessing, the LLM with CFG pairs, postprocessing.

Each is run by :class:`~audex.export.triton_models.step_model.StepModel` (``submit(rid, inputs, emit)``, see
:mod:`audex.export.step_worker`) and configured by its ``config.pbtxt`` parameters, which
:mod:`audex.export.triton_repo` fills from the model:

* :class:`PreprocessingHandler`: ``task``, ``text``, ``audio``, ``sample_rate``, ``max_new_tokens``, ``seed``,
  ``guidance_scale`` -> the LLM inputs of :meth:`~audex.export.triton_models.trtllm_steps.EngineInputBuilder.build`;
* :class:`LlmHandler`: those inputs -> ``output_ids [1, 1, L]`` and ``sequence_length [1, 1]`` (the layout of
  TensorRT-LLM's own Triton model), through :class:`~audex.export.guided_executor.GuidedExecutor` on
  TensorRT-LLM's executor (``parameters.executor: tensorrt_llm``, the engine in ``gpt_model_path``) or on the PyTorch
  reference executor (``executor: torch``, the export's ``hf/``; what runs on CPU machines). TTS/TTA requests with
  lambda != 1 decode as a token-synchronised CFG pair. A decoupled (streaming) instance sends one response per
  ``stream_chunk_seconds`` of audio (16 tokens of text) and the final flag with the last; ``output_kind`` is echoed;
* :class:`PostprocessingHandler`: ``output_ids``, ``sequence_length``, ``output_kind`` (text / speech / audio, echoed
  by the LLM step; read off the ids when absent) -> ``text`` and ``audio`` (16 kHz); with ``partial: true`` (the
  streaming ensemble) each chunk is decoded on its own.
"""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import Path

import numpy as np

from audex.export.triton_models.model_params import limit_values, model_file, one_request, one_value
from audex.export.triton_models.pairing_metrics import PairingMetrics
from audex.export.trtllm import BUILD_KEYS, check_prompt_table

log = logging.getLogger(__name__)

def _value(inputs: dict, name: str, cast, default=None):
    return one_value(inputs.get(name), name, cast, default)


def _one_request(inputs: dict, name: str) -> None:
    one_request(inputs.get(name), name)


def _limits(params: dict):
    from audex.export.serving import ServeLimits

    return ServeLimits(**limit_values(params))


def _presets_path(params: dict) -> str | None:
    return model_file(params.get("presets"), params.get("model_dir"))


class PreprocessingHandler:
    """Request -> LLM inputs (see the module docstring)."""

    def __init__(self, params: dict):
        from audex.export.triton_models.trtllm_steps import EngineInputBuilder

        context = params.get("max_context_tokens")
        self.builder = EngineInputBuilder(params["export_dir"], int(params["frames_per_window"]),
                                          float(params["window_seconds"]), presets_path=_presets_path(params),
                                          limits=_limits(params),
                                          max_context_tokens=int(context) if context not in (None, "", "None") else None,
                                          table_dtype=params.get("prompt_table_dtype", "float32"))

    def submit(self, rid, inputs, emit) -> None:
        _one_request(inputs, "task")
        audio = inputs.get("audio")
        if audio is not None:
            if audio.dtype != np.float32:
                raise ValueError(f"input 'audio' must be FP32, got {audio.dtype}")
            audio = audio.reshape(-1)
        emit(rid, self.builder.build(
            _value(inputs, "task", str), text=_value(inputs, "text", str), audio=audio,
            sample_rate=_value(inputs, "sample_rate", int, 16000), max_new_tokens=_value(inputs, "max_new_tokens", int),
            seed=_value(inputs, "seed", int), guidance_scale=_value(inputs, "guidance_scale", float)))


def build_values(params: dict) -> dict:
    """The engine's ``trtllm-build`` sizes that the repository writer copied into the LLM model's parameters."""
    return {k: int(params[k]) for k in BUILD_KEYS if params.get(k) not in (None, "", "None")}


def executor_module(kind: str):
    """``tensorrt_llm`` -> ``tensorrt_llm.bindings.executor`` (GPU hosts); ``torch`` -> the PyTorch reference."""
    if kind == "tensorrt_llm":
        try:
            return importlib.import_module("tensorrt_llm.bindings.executor")
        except ImportError as e:
            raise RuntimeError(f"parameters.executor is 'tensorrt_llm' but it cannot be imported ({e}); on a host "
                               "without TensorRT-LLM write the repository with executor='torch'") from None
    if kind == "torch":
        return importlib.import_module("audex.export.torch_executor")
    raise ValueError(f"parameters.executor must be 'tensorrt_llm' or 'torch', got {kind!r}")


class LlmHandler:
    """LLM inputs -> generated ids, CFG pairs included (see the module docstring)."""

    TEXT_CHUNK_TOKENS = 16

    def __init__(self, params: dict):
        from audex.export.guided_executor import GuidedExecutor
        from audex.tokenizer import AudexTokenizer

        export_dir = Path(params["export_dir"])
        kind = params.get("executor", "tensorrt_llm")
        trtllm = executor_module(kind)
        self.tokenizer = AudexTokenizer.load(export_dir / "hf")
        self.vocab = self.tokenizer.vocab
        limits = _limits(params)
        build = build_values(params)
        if build.get("max_prompt_embedding_table_size") is not None and params.get("frames_per_window"):
            # fail at start-up, not on the first clip: each request gets size // max_batch_size rows
            check_prompt_table(build, limits.max_audio_seconds, int(params["frames_per_window"]),
                               float(params["window_seconds"]))
        config = trtllm.ExecutorConfig(
            1, scheduler_config=trtllm.SchedulerConfig(trtllm.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT),
            kv_cache_config=trtllm.KvCacheConfig(
                params.get("enable_kv_cache_reuse", "false") == "true",
                free_gpu_memory_fraction=float(params.get("kv_cache_free_gpu_mem_fraction", "0.85"))),
            enable_chunked_context=False)
        if kind == "torch":
            # the reference executor gets the sizes trtllm-build would have fixed in the engine
            model_path = trtllm.ReferenceEngine.from_build(str(export_dir / "hf"), build)
        else:
            model_path = params.get("gpt_model_path")
        # the grammar of the presets, as the CPU engine applies it (the limits cap the token budget per request)
        from audex.export.serving import serving_presets

        presets = serving_presets(self.vocab, limits, _presets_path(params))
        self.guided = GuidedExecutor.create(trtllm, model_path, self.tokenizer, config,
                                            audio_seconds=presets["tta"].audio_seconds or limits.tta_seconds,
                                            max_speech_seconds=presets["tts"].max_speech_seconds,
                                            max_lag_steps=int(params.get("max_lag_steps", "4")),
                                            # pairs reach the engine only when both twins fit in its batch
                                            max_inflight=max(2, int(params.get("max_batch_size", "8"))))
        # the executor refuses a prompt table whose dtype is not the weights' (PromptTuningBuffers::validate): take
        # it from the engine (its config.json; float32 for the reference executor)
        self.table_dtype = self.guided.engine.dtype
        self.metrics = None
        self.streaming = params.get("decoupled") == "true"
        self.chunk_seconds = float(params.get("stream_chunk_seconds", "1.0"))
        self._jobs: dict[int, int] = {}
        self._lock = threading.Lock()

    def _chunk_tokens(self, output: str) -> int:
        if output == "text":
            return self.TEXT_CHUNK_TOKENS
        per_second = self.vocab.tokens_per_second(output)
        tokens = max(1, int(round(self.chunk_seconds * per_second)))
        n_q = self.vocab.audio_rvq_used if output == "audio" else 1
        return max(n_q, tokens - tokens % n_q)                       # whole RVQ frames for audio

    @staticmethod
    def _outputs(tokens, output: str) -> dict:
        return {"output_ids": np.array(tokens, np.int32).reshape(1, 1, -1),
                "sequence_length": np.array([[len(tokens)]], np.int32),
                "output_kind": np.array([[output.encode()]], dtype=np.object_)}

    def job(self, inputs: dict):
        from audex.export.guided_executor import LlmJob
        from audex.inference.sampling import SamplingParams

        _one_request(inputs, "input_ids")
        length = _value(inputs, "input_lengths", int)
        ids = inputs["input_ids"].reshape(-1)[:length].astype(np.int64).tolist()
        output = _value(inputs, "output_kind", str, "text")
        top_k = _value(inputs, "runtime_top_k", int, 1)
        top_p = _value(inputs, "runtime_top_p", float, 0.0)
        temperature = _value(inputs, "temperature", float, 1.0)
        greedy = top_k == 1 or (top_k == 0 and top_p == 0.0)
        sampling = SamplingParams(do_sample=not greedy, temperature=temperature if temperature > 0 else 1.0,
                                  top_k=top_k or None, top_p=top_p if 0.0 < top_p <= 1.0 else None,
                                  guidance_scale=_value(inputs, "guidance_scale", float, 1.0),
                                  max_new_tokens=_value(inputs, "request_output_len", int),
                                  seed=_value(inputs, "random_seed", int))
        uncond = None
        if "uncond_input_ids" in inputs and _value(inputs, "uncond_input_lengths", int, 0) > 0:
            uncond = inputs["uncond_input_ids"].reshape(-1)[: _value(inputs, "uncond_input_lengths", int)].tolist()
        table = inputs.get("prompt_embedding_table")
        prompt_table = None
        if table is not None and max(ids) >= self.vocab.size:
            import torch

            prompt_table = torch.from_numpy(np.ascontiguousarray(table.reshape(-1, table.shape[-1]))).to(self.table_dtype)
        return LlmJob(ids, sampling.max_new_tokens, _value(inputs, "end_id", int), _value(inputs, "pad_id", int), sampling,
                      uncond_input_ids=uncond if sampling.uses_cfg else None, output=output, prompt_table=prompt_table,
                      streaming=self.streaming)

    def submit(self, rid, inputs, emit) -> None:
        job = self.job(inputs)
        chunk, buffer = self._chunk_tokens(job.output), []

        def on_event(event):
            if event.error is not None:
                emit(rid, None, f"generation failed: {event.error}", True, False)
            elif not self.streaming:
                emit(rid, self._outputs(event.tokens, job.output), final=True)
            else:
                buffer.extend(event.tokens)
                if event.final or len(buffer) >= chunk:
                    emit(rid, self._outputs(list(buffer), job.output), final=event.final)
                    buffer.clear()
            if event.final:
                with self._lock:
                    self._jobs.pop(rid, None)
                if self.metrics is not None:
                    self.metrics.update(self.guided.stats)

        job_id = self.guided.submit(job, on_event)
        with self._lock:
            self._jobs[rid] = job_id

    def cancel(self, rid) -> None:
        with self._lock:
            job_id = self._jobs.get(rid)
        if job_id is not None:
            log.info("request %d was cancelled by its client: cancelling job %d (both CFG twins)", rid, job_id)
            self.guided.cancel(job_id)

    def attach_metrics(self, pb_utils, model_name: str) -> None:
        """Export the pairing counts as Triton metrics (see :mod:`~audex.export.triton_models.pairing_metrics`)."""
        self.metrics = PairingMetrics(pb_utils, model_name)

    def close(self) -> None:
        stats = self.guided.stats
        log.info("CFG pairing over this instance's life: %d guided, %d unguided, %d replayed, %d solo, %d retired "
                 "tokens, %d split pairs", stats["guided"], stats["unguided"], stats["replay"], stats["solo"],
                 stats["retire"], stats["split"])
        self.guided.shutdown()


class PostprocessingHandler:
    """Generated ids -> text / 16 kHz audio (see the module docstring)."""

    def __init__(self, params: dict):
        from audex.export.triton_models.trtllm_steps import EngineOutputDecoder

        self.decoder = EngineOutputDecoder(params["export_dir"])
        self.partial = params.get("partial") == "true"

    def submit(self, rid, inputs, emit) -> None:
        _one_request(inputs, "output_ids")
        ids = inputs["output_ids"].reshape(-1)
        length = _value(inputs, "sequence_length", int, ids.size)
        ids = ids[:length]
        kind = _value(inputs, "output_kind", str) or self.decoder.kind_of(ids)
        text, audio = self.decoder.decode(kind, ids, partial=self.partial)
        emit(rid, {"text": np.array([[text.encode("utf-8")]], dtype=np.object_), "audio": audio.reshape(1, -1)})
