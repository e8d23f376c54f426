"""Triton model repositories for Audex, generated as ``ModelConfig`` protos and validated by parsing them back.

Two layouts, both filled from the model's own config (hidden size, vocabulary, context, frame rate):

**CPU** (:func:`write_cpu_repository`, runs here): one python-backend model ``audex`` that runs the local engine
(Audex's PyTorch generation, CFG included: :class:`~audex.serving.triton.handlers.LocalEngineHandler`), dynamic
batching::

    repo/audex/config.pbtxt   repo/audex/1/model.py   repo/audex/1/presets.yaml

**GPU** (:func:`write_gpu_repository`, for hosts with TensorRT-LLM): the standard ensemble of TensorRT-LLM's
``inflight_batcher_llm`` layout, with the tensor names of that layout::

    preprocessing    (python)  task/text/audio -> input_ids (audio frames as ids >= vocab_size) +
                               prompt_embedding_table (the ONNX front end) + sampling inputs, and for TTS/TTA the
                               unconditional twin prompt + guidance_scale (validation as on the CPU engine)
    tensorrt_llm     (python)  TensorRT-LLM's executor (the engine from trtllm-build, in-flight batching) with the
                               CFG pairing logits post-processor: TTS/TTA decode as token-synchronised CFG pairs
                               (:mod:`audex.serving.guided_executor`); ``executor: torch`` runs the same model on the
                               reference executor, which is how the whole ensemble is served on a CPU here. Decoupled,
                               with TensorRT-LLM's ``streaming`` input: the one model (and engine) of both ensembles
    tensorrt_llm_once (python) a BLS front of ``tensorrt_llm`` that is not decoupled (``streaming=false``, one answer)
    postprocessing   (python)  output_ids -> text, or codec codes -> 16 kHz waveform (codec decoders)
    ensemble         (ensemble) preprocessing -> tensorrt_llm_once -> postprocessing (HTTP / gRPC ``infer``);
                               ``ensemble_stream`` (preprocessing -> tensorrt_llm -> ``postprocessing_stream``) is the
                               decoupled one: with ``stream=true`` it streams TTS one second at a time

``llm_backend="tensorrtllm"`` writes TensorRT-LLM's C++ backend instead of the python LLM model: it cannot run a
Python logits post-processor, so TTS/TTA then decode without CFG. Every python model of both layouts is the one
:class:`~audex.serving.triton.python_model.AudexPythonModel` with its handler named in ``1/model.py``.

The configs' pieces are in :mod:`~audex.serving.triton.config_protos`, the GPU steps' configs in
:mod:`~audex.serving.triton.ensemble_configs`. ``config.pbtxt`` is written with ``google.protobuf.text_format`` from
``tritonclient.grpc.model_config_pb2`` and
:func:`~audex.serving.triton.repository_check.validate_repository` parses every file back (unknown fields are
errors) and checks the ensemble wiring.

Example::

    >>> write_cpu_repository("triton_repo", "audex_tiny.nemo", model_config=model_summary(model))
    >>> validate_repository("triton_repo")
    ['audex']
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from audex import config_path
from audex.export.trtllm_checkpoint import check_prompt_table
from audex.serving.engine_facts import engine_dtype
from audex.serving.requests import ServeLimits
from audex.serving.triton.config_protos import (  # noqa: F401 - ModelSummary is part of this module's API
    ModelSummary,
    python_model_py,
    request_inputs,
    set_params,
    tensor,
    write_config,
)
from audex.serving.triton.ensemble_configs import (
    ensemble_config,
    llm_once_config,
    postprocessing_config,
    preprocessing_config,
    table_dtype_for,
    tensorrt_llm_config,
)

log = logging.getLogger(__name__)


# ---- CPU repository ----------------------------------------------------------------------------
def audex_engine_config(model_path: str, limits: ServeLimits, *, max_batch_size: int = 8,
                        max_queue_delay_us: int = 2000, instances: int = 1, num_threads: int = 1) -> mc.ModelConfig:
    """``audex``: the python-backend model running the PyTorch engine (all tasks)."""
    c = mc.ModelConfig(name="audex", backend="python", max_batch_size=max_batch_size)
    c.input.extend(request_inputs("TYPE_INT64", ragged_audio=True, voice_and_tools=True))
    c.output.extend([
        tensor(mc.ModelOutput, "text", "TYPE_STRING", [1]),
        tensor(mc.ModelOutput, "audio", "TYPE_FP32", [-1]),
        tensor(mc.ModelOutput, "finish_reason", "TYPE_STRING", [1]),
        tensor(mc.ModelOutput, "tool_calls", "TYPE_STRING", [1]),   # JSON {tool_calls, tool_call_error}; "" otherwise
    ])
    c.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    c.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances))
    set_params(c, {"model_path": model_path, "python": sys.executable, "num_threads": num_threads,
                "presets": "presets.yaml", "handler_process": "worker", **limits.as_params()})
    return c


def write_cpu_repository(out_dir: str | Path, model_path: str | Path, *, limits: ServeLimits | None = None,
                         max_batch_size: int = 8, max_queue_delay_us: int = 2000, instances: int = 1,
                         num_threads: int = 1, presets_yaml: str | Path | None = None) -> Path:
    """The CPU repository (see the module docstring). ``model_path`` is stored as an absolute path."""
    out = Path(out_dir)
    model_path = Path(model_path).resolve()
    if not model_path.exists():
        raise FileNotFoundError(f"model {str(model_path)!r} does not exist: give a .nemo, a pretrained folder or a model YAML")
    config = audex_engine_config(str(model_path), limits or ServeLimits(), max_batch_size=max_batch_size,
                                 max_queue_delay_us=max_queue_delay_us, instances=instances, num_threads=num_threads)
    model_dir = out / "audex"
    write_config(config, model_dir)
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    (version / "model.py").write_text(python_model_py(HANDLERS["audex"]))
    shutil.copy(presets_yaml or config_path("infer", "presets.yaml"), version / "presets.yaml")
    return out


# ---- GPU repository ----------------------------------------------------------------------------
HANDLERS = {  # model name -> the handler its python model runs
    "audex": "audex.serving.triton.handlers:LocalEngineHandler",
    "preprocessing": "audex.serving.triton.handlers:PreprocessingHandler",
    "tensorrt_llm": "audex.serving.triton.handlers:LlmHandler",
    "tensorrt_llm_once": "audex.serving.triton.llm_once:LlmOnceHandler",
    "postprocessing": "audex.serving.triton.handlers:PostprocessingHandler",
    "postprocessing_stream": "audex.serving.triton.handlers:PostprocessingHandler",
}


def write_gpu_repository(out_dir: str | Path, export_dir: str | Path, summary: ModelSummary, *,
                         engine_dir: str | Path | None = None, max_batch_size: int = 64, llm_backend: str = "python",
                         executor: str = "tensorrt_llm", limits: ServeLimits | None = None,
                         prompt_table_dtype: str = "bfloat16", handler_process: str | None = None,
                         num_threads: int = 1, build: dict | None = None, kv_cache_reuse: bool = False,
                         kv_cache_max_tokens: int | None = None) -> Path:
    """The GPU ensemble (see the module docstring) over an export folder written by ``examples/audex_export.py``.

    ``llm_backend``/``executor``: see :func:`tensorrt_llm_config` (``executor="torch"`` serves the same ensemble on a
    CPU machine with the reference executor). ``handler_process="worker"`` forces the python steps' handlers into
    worker processes (:mod:`audex.serving.triton.python_model`); by default they run in the stub unless the launcher
    says otherwise.
    """
    out = Path(out_dir)
    export_dir = str(Path(export_dir).resolve())
    engine_dir = str(engine_dir or Path(export_dir) / "engine")
    built = engine_dtype(engine_dir)
    if built is not None and built != prompt_table_dtype:
        # the executor refuses a prompt table whose dtype is not the weights': the built engine decides
        log.warning("the engine in %s holds %s weights, not %s: the prompt table follows the engine", engine_dir,
                    built, prompt_table_dtype)
        prompt_table_dtype = built
    limits = limits or ServeLimits()
    cfg = llm_backend == "python"
    build = dict(build or {})
    if build.get("max_prompt_embedding_table_size") is not None and summary.frames_per_window:
        build.setdefault("max_batch_size", max_batch_size)
        check_prompt_table(build, limits.max_audio_seconds, summary.frames_per_window, summary.window_seconds)
    llm = dict(backend=llm_backend, export_dir=export_dir, executor=executor, limits=limits,
               prompt_table_dtype=prompt_table_dtype, build=build, kv_cache_reuse=kv_cache_reuse,
               kv_cache_max_tokens=kv_cache_max_tokens)
    configs = [
        preprocessing_config(summary, export_dir, max_batch_size, limits,
                             table_dtype=table_dtype_for(llm_backend, prompt_table_dtype)),
        tensorrt_llm_config(summary, engine_dir, max_batch_size, decoupled=True, **llm),
        llm_once_config(summary, max_batch_size, backend=llm_backend, prompt_table_dtype=prompt_table_dtype),
        postprocessing_config(summary, export_dir, max_batch_size),
        postprocessing_config(summary, export_dir, max_batch_size, name="postprocessing_stream", partial=True),
        ensemble_config("ensemble", max_batch_size, "tensorrt_llm_once", decoupled=False, cfg=cfg),
        ensemble_config("ensemble_stream", max_batch_size, "tensorrt_llm", decoupled=True, cfg=cfg,
                        postprocessing="postprocessing_stream"),
    ]
    for config in configs:
        if config.backend == "python":
            # torch threads of a step run in a worker process (on this kind of stub): one each, several run at once
            config.parameters["num_threads"].string_value = str(num_threads)
            in_stub = "handler_process" in config.parameters and config.parameters["handler_process"].string_value == "stub"
            if handler_process and not in_stub:
                config.parameters["handler_process"].string_value = handler_process
        write_config(config, out / config.name)
        version = out / config.name / "1"
        version.mkdir(parents=True, exist_ok=True)
        if config.backend == "python":
            (version / "model.py").write_text(python_model_py(HANDLERS[config.name]))
    shutil.copy(config_path("infer", "presets.yaml"), out / "preprocessing" / "1" / "presets.yaml")
    return out
