"""The handlers behind the Triton python model: the local engine, and the GPU ensemble's three steps.

Each is run by :class:`~audex.serving.triton.python_model.AudexPythonModel` (``submit(rid, inputs, emit)`` or
``submit_batch``, see :mod:`audex.serving.triton.worker`) and configured by its ``config.pbtxt`` parameters, which
:mod:`audex.serving.triton.repository` fills from the model:

* :class:`LocalEngineHandler` (the CPU repository's ``audex`` model): ``task``, ``text``, ``audio``, ``sample_rate``,
  ``max_new_tokens``, ``seed``, ``guidance_scale``, and the voice prompt of TTS (``voice``, ``voice_sample_rate``,
  ``voice_text``) or the ``tools`` of a chat (a JSON list) -> ``text``, ``audio`` (16 kHz), ``finish_reason``,
  ``tool_calls`` (JSON), through the :class:`~audex.serving.local_engine.LocalEngine` (one Triton batch decodes
  together);
* :class:`PreprocessingHandler`: the same request inputs -> the LLM inputs of
  :meth:`~audex.serving.triton.llm_io.LlmInputBuilder.build`;
* :class:`LlmHandler`: those inputs -> ``output_ids [1, 1, L]`` and ``sequence_length [1, 1]`` (the layout of
  TensorRT-LLM's own Triton model), through :class:`~audex.serving.guided_executor.GuidedExecutor` on
  TensorRT-LLM's executor (``parameters.executor: tensorrt_llm``, the TensorRT-LLM engine in ``gpt_model_path``) or on
  the reference executor (``executor: torch``, the export's ``hf/``; what runs on CPU machines). TTS/TTA requests with
  lambda != 1 decode as a token-synchronised CFG pair. The model is decoupled and serves both ensembles: a request
  with ``streaming`` true (TensorRT-LLM's input) gets one response per ``stream_chunk_seconds`` of audio (16 tokens
  of text) and the final flag with the last, any other request one response; ``output_kind`` is echoed;
* :class:`PostprocessingHandler`: ``output_ids``, ``sequence_length``, ``output_kind`` (text / speech / audio, echoed
  by the LLM step; read off the ids when absent) -> ``text`` and ``audio`` (16 kHz); with ``partial: true`` (the
  streaming ensemble) each chunk is decoded on its own.

:mod:`audex.serving.triton.llm_io` holds the work behind the two outer steps (request -> LLM inputs, ids -> output).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch

from audex.export.trtllm_checkpoint import BUILD_KEYS, check_prompt_table
from audex.inference.sampling import SamplingParams
from audex.models.checkpoint import load_model
from audex.serving.executor_api import mpi_world
from audex.serving.guided_executor import GuidedExecutor, LlmJob
from audex.serving.local_engine import LocalEngine
from audex.serving.requests import ServeLimits, ServeRequest, serving_presets
from audex.serving.triton.llm_io import LlmInputBuilder, LlmOutputDecoder
from audex.tokenizer import AudexTokenizer

log = logging.getLogger(__name__)


# ---- one request's inputs -------------------------------------------------------------------------
def one_request(inputs: dict, name: str) -> None:
    """Each Triton request carries one item (batch dimension 1): the server batches requests itself."""
    array = inputs.get(name)
    if array is None:
        raise ValueError(f"input {name!r} is required")
    if array.ndim == 0 or array.shape[0] != 1:
        batch = array.shape[0] if array.ndim else 0
        raise ValueError(f"send one input per request (input {name!r} has a batch of {batch}); the server batches "
                         "requests itself")


def one_value(inputs: dict, name: str, cast, default=None):
    """One value per request: an input of shape ``[1, 1]`` (or ``[1]``) -> ``cast(value)``; absent -> ``default``."""
    array = inputs.get(name)
    if array is None:
        return default
    if array.size != 1:
        raise ValueError(f"input {name!r} must hold one value per request, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"input {name!r} is not UTF-8 text") from None
    return cast(value)


def _waveform(inputs: dict, name: str) -> torch.Tensor | None:
    audio = inputs.get(name)
    if audio is None:
        return None
    if audio.dtype != np.float32:
        raise ValueError(f"input {name!r} must be FP32, got {audio.dtype}")
    return torch.from_numpy(np.ascontiguousarray(audio.reshape(-1)))


def _tools(text: str | None) -> list | None:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"input 'tools' must be a JSON list of tool definitions ({e})") from None


def serve_request(inputs: dict) -> ServeRequest:
    """The request inputs of the ``audex`` model and of ``preprocessing`` as a :class:`ServeRequest`."""
    one_request(inputs, "task")
    return ServeRequest(task=one_value(inputs, "task", str), text=one_value(inputs, "text", str),
                        audio=_waveform(inputs, "audio"), sample_rate=one_value(inputs, "sample_rate", int, 16000),
                        max_new_tokens=one_value(inputs, "max_new_tokens", int), seed=one_value(inputs, "seed", int),
                        guidance_scale=one_value(inputs, "guidance_scale", float),
                        voice=_waveform(inputs, "voice"),
                        voice_sample_rate=one_value(inputs, "voice_sample_rate", int, 16000),
                        voice_text=one_value(inputs, "voice_text", str), tools=_tools(one_value(inputs, "tools", str)))


def model_file(params: dict, key: str) -> str | None:
    """A file parameter: absolute as given, else relative to the model's version folder."""
    path, model_dir = params.get(key), params.get("model_dir")
    if path and not Path(path).is_absolute() and model_dir:
        return str(Path(model_dir) / path)
    return path or None


def _setup(params: dict) -> ServeLimits:
    # small per-request work in several processes on few cores: one torch thread each beats oversubscription
    torch.set_num_threads(int(params.get("num_threads", "1")))
    return ServeLimits.from_params(params)


def _text_tensor(text: str) -> np.ndarray:
    return np.array([[text.encode("utf-8")]], dtype=np.object_)


# ---- the CPU repository ---------------------------------------------------------------------------
class LocalEngineHandler:
    """Requests -> answers with the local engine on the model of ``parameters.model_path`` (see the module docstring)."""

    def __init__(self, params: dict):
        model_path = params.get("model_path")
        if not model_path:
            raise ValueError("the audex model needs parameters.model_path (.nemo, pretrained folder or model YAML)")
        limits = _setup(params)
        self.engine = LocalEngine(load_model(model_path, device="cpu"), limits, presets_path=model_file(params, "presets"))

    def submit_batch(self, batch: list, emit) -> None:
        requests, rids = [], []
        for rid, inputs in batch:
            try:
                requests.append(serve_request(inputs))
                rids.append(rid)
            except ValueError as e:                       # the request is at fault: the client gets a 400
                emit(rid, None, str(e), True, True)
        for rid, result in zip(rids, self.engine.run(requests) if requests else []):
            if result.error:
                emit(rid, None, result.error, True, True)
                continue
            audio = result.audio.detach().float().cpu().numpy().reshape(1, -1)
            calls = {"tool_calls": result.tool_calls, "tool_call_error": result.tool_call_error}
            emit(rid, {"text": _text_tensor(result.text), "audio": audio,
                       "finish_reason": _text_tensor(result.finish_reason),
                       "tool_calls": _text_tensor(json.dumps(calls) if result.tool_calls is not None else "")})


# ---- the GPU ensemble ------------------------------------------------------------------------------
class PreprocessingHandler:
    """Request -> LLM inputs (see the module docstring)."""

    def __init__(self, params: dict):
        context = params.get("max_context_tokens")
        self.builder = LlmInputBuilder(params["export_dir"], int(params["frames_per_window"]),
                                       float(params["window_seconds"]), presets_path=model_file(params, "presets"),
                                       limits=_setup(params),
                                       max_context_tokens=int(context) if context not in (None, "", "None") else None,
                                       table_dtype=params.get("prompt_table_dtype", "float32"))

    def submit(self, rid, inputs, emit) -> None:
        emit(rid, self.builder.build_request(serve_request(inputs)))


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
        return importlib.import_module("audex.serving.reference_executor")
    raise ValueError(f"parameters.executor must be 'tensorrt_llm' or 'torch', got {kind!r}")


def parallel_config(trtllm, params: dict):
    """The executor's ``ParallelConfig``, as TensorRT-LLM's own Triton model builds it (``get_parallel_config`` of
    ``triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/1/model.py``): ``gpu_device_ids`` (comma-separated)
    and, with ``TRTLLM_ORCHESTRATOR=1``, ORCHESTRATOR mode with this process as orchestrator when it is MPI rank 0 and
    ``executor_worker_path`` as the worker; None (LEADER mode over the MPI job, the default) otherwise."""
    kwargs = {}
    if params.get("gpu_device_ids"):
        kwargs["device_ids"] = [int(x) for x in params["gpu_device_ids"].split(",")]
    if os.environ.get("TRTLLM_ORCHESTRATOR", "0") == "1":
        if os.environ.get("TRTLLM_ORCHESTRATOR_SPAWN_PROCESSES", "1") != "1":
            raise ValueError("orchestrator mode with --disable-spawn-processes is not supported in the Python "
                             "backend (TRTLLM_ORCHESTRATOR_SPAWN_PROCESSES=0)")
        if params.get("worker_path"):
            raise ValueError("parameters.worker_path is no longer supported: name the trtllmExecutorWorker "
                             "executable in parameters.executor_worker_path")
        kwargs["communication_mode"] = trtllm.CommunicationMode.ORCHESTRATOR
        kwargs["orchestrator_config"] = trtllm.OrchestratorConfig(mpi_world()[0] == 0,
                                                                  params.get("executor_worker_path") or "")
    return trtllm.ParallelConfig(**kwargs) if kwargs else None


class LlmHandler:
    """LLM inputs -> generated ids, CFG pairs included (see the module docstring)."""

    TEXT_CHUNK_TOKENS = 16

    def __init__(self, params: dict):
        export_dir = Path(params["export_dir"])
        kind = params.get("executor", "tensorrt_llm")
        trtllm = executor_module(kind)
        self.tokenizer = AudexTokenizer.load(export_dir / "hf")
        self.vocab = self.tokenizer.vocab
        limits = _setup(params)
        build = build_values(params)
        if build.get("max_prompt_embedding_table_size") is not None and params.get("frames_per_window"):
            # fail at start-up, not on the first clip: each request gets size // max_batch_size rows
            check_prompt_table(build, limits.max_audio_seconds, int(params["frames_per_window"]),
                               float(params["window_seconds"]))
        config = trtllm.ExecutorConfig(
            1, scheduler_config=trtllm.SchedulerConfig(trtllm.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT),
            kv_cache_config=trtllm.KvCacheConfig(
                params.get("enable_kv_cache_reuse", "false") == "true",
                # bounded: the router then also counts KV blocks for CFG pairs (see GuidedExecutor._admit)
                int(params["kv_cache_max_tokens"]) if params.get("kv_cache_max_tokens") else None,
                free_gpu_memory_fraction=float(params.get("kv_cache_free_gpu_mem_fraction", "0.85"))),
            enable_chunked_context=False, parallel_config=parallel_config(trtllm, params))
        if kind == "torch":
            # the reference executor gets the sizes trtllm-build would have fixed in the engine, and its ranks
            model_path = trtllm.ReferenceEngine.from_build(str(export_dir / "hf"),
                                                           build | {"world_size": params.get("world_size", 1)})
        else:
            model_path = params.get("gpt_model_path")
        # the grammar of the presets, as the local engine applies it (the limits cap the token budget per request)
        presets = serving_presets(self.vocab, limits, model_file(params, "presets"))
        self.guided = GuidedExecutor.create(trtllm, model_path, self.tokenizer, config,
                                            audio_seconds=presets["tta"].audio_seconds or limits.tta_seconds,
                                            max_speech_seconds=presets["tts"].max_speech_seconds,
                                            max_lag_steps=int(params.get("max_lag_steps", "4")),
                                            # pairs reach the engine only when both twins fit in its batch
                                            max_inflight=max(2, int(params.get("max_batch_size", "8"))))
        # the executor refuses a prompt table whose dtype is not the weights' (PromptTuningBuffers::validate): take
        # it from the engine (its config.json; float32 for the reference executor)
        self.table_dtype = self.guided.engine.dtype
        # LEADER mode with tensor/pipeline parallelism: every rank's server loads this model and its executor, only
        # the leader's takes requests; as TensorRT-LLM's own model does, a participant waits here for the leader
        self.participant = not self.guided.executor.can_enqueue_requests()
        if self.participant:
            log.info("this rank is a participant of the LLM's executor (TensorRT-LLM leader mode): it runs its share "
                     "of the engine for the leader and takes no requests")
            self.guided.shutdown()
        self.report = None
        self.decoupled = params.get("decoupled") == "true"
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
        one_request(inputs, "input_ids")
        length = one_value(inputs, "input_lengths", int)
        ids = inputs["input_ids"].reshape(-1)[:length].astype(np.int64).tolist()
        output = one_value(inputs, "output_kind", str, "text")
        top_k = one_value(inputs, "runtime_top_k", int, 1)
        top_p = one_value(inputs, "runtime_top_p", float, 0.0)
        temperature = one_value(inputs, "temperature", float, 1.0)
        greedy = top_k == 1 or (top_k == 0 and top_p == 0.0)
        sampling = SamplingParams(do_sample=not greedy, temperature=temperature if temperature > 0 else 1.0,
                                  top_k=top_k or None, top_p=top_p if 0.0 < top_p <= 1.0 else None,
                                  guidance_scale=one_value(inputs, "guidance_scale", float, 1.0),
                                  max_new_tokens=one_value(inputs, "request_output_len", int),
                                  seed=one_value(inputs, "random_seed", int))
        uncond = None
        if "uncond_input_ids" in inputs and one_value(inputs, "uncond_input_lengths", int, 0) > 0:
            uncond = inputs["uncond_input_ids"].reshape(-1)[: one_value(inputs, "uncond_input_lengths", int)].tolist()
        streaming = bool(one_value(inputs, "streaming", bool, False))
        if streaming and not self.decoupled:      # as TensorRT-LLM's own model answers
            raise ValueError("input 'streaming' is true but this LLM model is not decoupled: streaming is only "
                             "supported in decoupled mode")
        table = inputs.get("prompt_embedding_table")
        prompt_table = None
        if table is not None and max(ids) >= self.vocab.size:
            prompt_table = torch.from_numpy(np.ascontiguousarray(table.reshape(-1, table.shape[-1]))).to(self.table_dtype)
        return LlmJob(ids, sampling.max_new_tokens, one_value(inputs, "end_id", int), one_value(inputs, "pad_id", int), sampling,
                      uncond_input_ids=uncond if sampling.uses_cfg else None, output=output, prompt_table=prompt_table,
                      streaming=streaming)

    def submit(self, rid, inputs, emit) -> None:
        if self.participant:
            raise RuntimeError("this LLM model runs on a participant rank (TensorRT-LLM leader mode): send requests "
                               "to the leader's server (rank 0)")
        job = self.job(inputs)
        chunk, buffer = self._chunk_tokens(job.output), []

        def on_event(event):
            if event.error is not None:
                emit(rid, None, f"generation failed: {event.error}", True, False)
            elif not job.streaming:
                emit(rid, self._outputs(event.tokens, job.output), final=True)
            else:
                buffer.extend(event.tokens)
                if event.final or len(buffer) >= chunk:
                    emit(rid, self._outputs(list(buffer), job.output), final=event.final)
                    buffer.clear()
            if event.final:
                with self._lock:
                    self._jobs.pop(rid, None)
                if self.report is not None:
                    self.report(self.guided.stats)

        job_id = self.guided.submit(job, on_event)
        with self._lock:
            self._jobs[rid] = job_id

    def cancel(self, rid) -> None:
        with self._lock:
            job_id = self._jobs.get(rid)
        if job_id is not None:
            log.info("request %d was cancelled by its client: cancelling job %d (both CFG twins)", rid, job_id)
            self.guided.cancel(job_id)

    def report_stats(self, report) -> None:
        """``report(stats)`` gets the pairing counts after each job; the python model exports them as Triton metrics
        (:mod:`~audex.serving.triton.pairing_metrics`), in the stub or from a worker process."""
        self.report = report

    def close(self) -> None:
        if self.participant:
            return
        stats = self.guided.stats
        log.info("CFG pairing over this instance's life: %d guided, %d unguided, %d replayed, %d solo, %d retired "
                 "tokens, %d split pairs", stats["guided"], stats["unguided"], stats["replay"], stats["solo"],
                 stats["retire"], stats["split"])
        self.guided.shutdown()


class PostprocessingHandler:
    """Generated ids -> text / 16 kHz audio (see the module docstring)."""

    def __init__(self, params: dict):
        _setup(params)
        self.decoder = LlmOutputDecoder(params["export_dir"])
        self.partial = params.get("partial") == "true"

    def submit(self, rid, inputs, emit) -> None:
        one_request(inputs, "output_ids")
        ids = inputs["output_ids"].reshape(-1)
        length = one_value(inputs, "sequence_length", int, ids.size)
        ids = ids[:length]
        kind = one_value(inputs, "output_kind", str) or self.decoder.kind_of(ids)
        text, audio = self.decoder.decode(kind, ids, partial=self.partial)
        emit(rid, {"text": np.array([[text.encode("utf-8")]], dtype=np.object_), "audio": audio.reshape(1, -1)})
