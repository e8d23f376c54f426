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
                               reference executor, which is how the whole ensemble is served on a CPU here
    postprocessing   (python)  output_ids -> text, or codec codes -> 16 kHz waveform (codec decoders)
    ensemble         (ensemble) wires the three; ``ensemble_stream`` (+ ``tensorrt_llm_stream``,
                               ``postprocessing_stream``) is the decoupled twin that streams TTS one second at a time

``llm_backend="tensorrtllm"`` writes TensorRT-LLM's C++ backend instead of the python LLM model: it cannot run a
Python logits post-processor, so TTS/TTA then decode without CFG. Every python model of both layouts is the one
:class:`~audex.serving.triton.python_model.AudexPythonModel` with its handler named in ``1/model.py``.

``config.pbtxt`` is written with ``google.protobuf.text_format`` from ``tritonclient.grpc.model_config_pb2`` and
:func:`~audex.serving.triton.repository_check.validate_repository` parses every file back (unknown fields are
errors) and checks the ensemble wiring.

Example::

    >>> write_cpu_repository("triton_repo", "audex_tiny.nemo", model_config=model_summary(model))
    >>> validate_repository("triton_repo")
    ['audex']
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from audex import config_path
from audex.export.trtllm_checkpoint import BUILD_KEYS, check_prompt_table
from audex.serving.requests import ServeLimits


@dataclass(frozen=True)
class ModelSummary:
    """The numbers of an Audex model that the repository configs need."""

    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    frames_per_window: int
    window_seconds: float
    sample_rate: int = 16000

    @classmethod
    def from_export(cls, export_dir: str | Path) -> "ModelSummary":
        """From an export folder (``hf/config.json`` and ``hf/audex_export.json``): no model load needed."""
        hf = Path(export_dir) / "hf"
        if not (hf / "audex_export.json").exists():
            raise FileNotFoundError(f"{hf} has no audex_export.json: is {str(export_dir)!r} an export folder written by "
                                    "examples/audex_export.py?")
        meta = json.loads((hf / "audex_export.json").read_text())
        config = json.loads((hf / "config.json").read_text())
        if "frames_per_window" not in meta and (Path(export_dir) / "frontend.onnx").exists():
            raise ValueError(f"{hf / 'audex_export.json'} predates the encoder fields: export the model again")
        return cls(hidden_size=int(config["hidden_size"]), vocab_size=int(meta["vocab_size"]),
                   max_position_embeddings=int(config["max_position_embeddings"]),
                   frames_per_window=int(meta.get("frames_per_window", 750)),       # no encoder: never used
                   window_seconds=float(meta.get("window_seconds", 30.0)))

    @classmethod
    def of(cls, model) -> "ModelSummary":
        enc = model.audio_encoder
        return cls(hidden_size=int(model.backbone.config.hidden_size), vocab_size=int(model.vocab.size),
                   max_position_embeddings=int(model.backbone.config.max_position_embeddings),
                   frames_per_window=int(enc.frames_per_window), window_seconds=float(enc.window_seconds))


def _tensor(cls, name: str, dtype: str, dims, optional: bool = False, ragged: bool = False):
    t = cls(name=name, data_type=mc.DataType.Value(dtype), dims=list(dims))
    if cls is mc.ModelInput:
        t.optional = optional
        t.allow_ragged_batch = ragged
    return t


def request_inputs(seed_type: str, ragged_audio: bool) -> list:
    """The inputs of a :class:`~audex.serving.requests.ServeRequest`, as every request-facing model declares them:
    ``task`` and, optional, ``text``, ``audio``, ``sample_rate``, ``max_new_tokens``, ``seed``, ``guidance_scale``
    (``seed`` is UINT64 where it meets TensorRT-LLM's ``random_seed``; an ensemble's own inputs are not ragged)."""
    specs = [("task", "TYPE_STRING", [1], False), ("text", "TYPE_STRING", [1], True),
             ("audio", "TYPE_FP32", [-1], True), ("sample_rate", "TYPE_INT32", [1], True),
             ("max_new_tokens", "TYPE_INT32", [1], True), ("seed", seed_type, [1], True),
             ("guidance_scale", "TYPE_FP32", [1], True)]
    return [_tensor(mc.ModelInput, name, dtype, dims, optional=optional, ragged=ragged_audio and name == "audio")
            for name, dtype, dims, optional in specs]


def _params(config: mc.ModelConfig, values: dict) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def write_config(config: mc.ModelConfig, model_dir: Path) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.pbtxt"
    path.write_text(text_format.MessageToString(config))
    return path


# ---- CPU repository ----------------------------------------------------------------------------
def audex_engine_config(model_path: str, limits: ServeLimits, *, max_batch_size: int = 8,
                        max_queue_delay_us: int = 2000, instances: int = 1, num_threads: int = 1) -> mc.ModelConfig:
    """``audex``: the python-backend model running the PyTorch engine (all tasks)."""
    c = mc.ModelConfig(name="audex", backend="python", max_batch_size=max_batch_size)
    c.input.extend(request_inputs("TYPE_INT64", ragged_audio=True))
    c.output.extend([
        _tensor(mc.ModelOutput, "text", "TYPE_STRING", [1]),
        _tensor(mc.ModelOutput, "audio", "TYPE_FP32", [-1]),
        _tensor(mc.ModelOutput, "finish_reason", "TYPE_STRING", [1]),
    ])
    c.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    c.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances))
    _params(c, {"model_path": model_path, "python": sys.executable, "num_threads": num_threads,
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
LLM_BACKENDS = ("python", "tensorrtllm")
EXECUTORS = ("tensorrt_llm", "torch")


def python_model_py(handler: str) -> str:
    """The ``1/model.py`` of a python model: the one Audex python model, with its handler."""
    return ('"""An Audex python model (see audex.serving.triton.python_model)."""\n'
            "from audex.serving.triton.python_model import AudexPythonModel\n\n\n"
            "class TritonPythonModel(AudexPythonModel):\n"
            f"    handler = {handler!r}\n")


_LLM_INPUTS = [  # (name, type, dims, optional, ragged): TensorRT-LLM's inflight_batcher_llm names
    ("input_ids", "TYPE_INT32", [-1], False, True),
    ("input_lengths", "TYPE_INT32", [1], False, False),
    ("request_output_len", "TYPE_INT32", [1], False, False),
    ("end_id", "TYPE_INT32", [1], True, False),
    ("pad_id", "TYPE_INT32", [1], True, False),
    ("runtime_top_k", "TYPE_INT32", [1], True, False),
    ("runtime_top_p", "TYPE_FP32", [1], True, False),
    ("temperature", "TYPE_FP32", [1], True, False),
    ("random_seed", "TYPE_UINT64", [1], True, False),
    ("prompt_vocab_size", "TYPE_INT32", [1], True, False),
]
_CFG_INPUTS = [  # Audex's CFG pair and task grammar (python LLM model only)
    ("uncond_input_ids", "TYPE_INT32", [-1], True, True),
    ("uncond_input_lengths", "TYPE_INT32", [1], True, False),
    ("guidance_scale", "TYPE_FP32", [1], True, False),
    ("output_kind", "TYPE_STRING", [1], True, False),
]


def _add(tensors, cls, specs) -> None:
    for name, dtype, dims, optional, ragged in specs:
        tensors.append(_tensor(cls, name, dtype, dims, optional=optional, ragged=ragged))


TABLE_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}


def table_dtype_for(llm_backend: str, prompt_table_dtype: str) -> str:
    """The prompt table's dtype between preprocessing and the LLM step. Audex's LLM model takes float32 and casts it
    once to the engine's dtype; TensorRT-LLM's C++ backend hands the tensor to the executor as it is, which refuses a
    table whose dtype is not the weights' -- and NumPy (the python steps) has no bfloat16."""
    if llm_backend != "tensorrtllm":
        return "float32"
    if prompt_table_dtype not in TABLE_TYPES:
        raise ValueError(f"llm_backend=tensorrtllm passes the prompt table to the executor as preprocessing writes it, "
                         f"and the executor refuses one whose dtype is not the engine's ({prompt_table_dtype}); the "
                         "python steps cannot write bfloat16: use llm_backend=python, or a float16 engine")
    return prompt_table_dtype


def preprocessing_config(summary: ModelSummary, export_dir: str, max_batch_size: int,
                         limits: ServeLimits | None = None, max_queue_delay_us: int = 1000,
                         table_dtype: str = "float32") -> mc.ModelConfig:
    """``preprocessing``: request -> LLM inputs (validation, prompts, ONNX front end, the CFG twin)."""
    c = mc.ModelConfig(name="preprocessing", backend="python", max_batch_size=max_batch_size)
    c.input.extend(request_inputs("TYPE_UINT64", ragged_audio=True))
    outputs = []
    _add(outputs, mc.ModelOutput, _LLM_INPUTS + _CFG_INPUTS)
    outputs.append(_tensor(mc.ModelOutput, "prompt_embedding_table", TABLE_TYPES[table_dtype], [-1, summary.hidden_size]))
    c.output.extend(outputs)
    c.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    c.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    _params(c, {"export_dir": export_dir, "vocab_size": summary.vocab_size, "hidden_size": summary.hidden_size,
                "frames_per_window": summary.frames_per_window, "window_seconds": summary.window_seconds,
                "max_context_tokens": summary.max_position_embeddings, "python": sys.executable,
                "presets": "presets.yaml", "prompt_table_dtype": table_dtype, **(limits or ServeLimits()).as_params()})
    return c


def tensorrt_llm_config(summary: ModelSummary, engine_dir: str, max_batch_size: int, decoupled: bool,
                        name: str = "tensorrt_llm", *, backend: str = "python", export_dir: str | None = None,
                        executor: str = "tensorrt_llm", limits: ServeLimits | None = None,
                        prompt_table_dtype: str = "bfloat16", max_queue_delay_us: int = 1000,
                        build: dict | None = None, kv_cache_reuse: bool = False,
                        kv_cache_max_tokens: int | None = None) -> mc.ModelConfig:
    """The LLM step, with the input / output names of TensorRT-LLM's ``inflight_batcher_llm`` layout.

    ``backend="python"`` (default): Audex's model (:class:`~audex.serving.triton.handlers.LlmHandler`)
    owning TensorRT-LLM's executor with the CFG pairing post-processor, so TTS/TTA decode with guidance; in-flight
    batching with guaranteed-no-evict scheduling and no chunked context (twins admitted together stay together, see
    :mod:`audex.serving.cfg_pairing`). ``executor="torch"`` runs the same model on the reference executor
    (CPU machines). ``backend="tensorrtllm"``: TensorRT-LLM's own C++ backend, which cannot take a Python logits
    post-processor -- TTS/TTA then decode *without* CFG; only for deployments that do not need it.
    """
    if backend not in LLM_BACKENDS:
        raise ValueError(f"backend must be one of {LLM_BACKENDS}, got {backend!r}")
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    c = mc.ModelConfig(name=name, backend=backend, max_batch_size=max_batch_size)
    c.model_transaction_policy.decoupled = decoupled
    inputs = []
    _add(inputs, mc.ModelInput, _LLM_INPUTS)
    inputs.append(_tensor(mc.ModelInput, "prompt_embedding_table", TABLE_TYPES[table_dtype_for(backend, prompt_table_dtype)],
                          [-1, summary.hidden_size], optional=True))
    inputs.append(_tensor(mc.ModelInput, "streaming", "TYPE_BOOL", [1], optional=True))
    if backend == "python":
        _add(inputs, mc.ModelInput, _CFG_INPUTS)
    c.input.extend(inputs)
    c.output.extend([
        _tensor(mc.ModelOutput, "output_ids", "TYPE_INT32", [-1, -1]),
        _tensor(mc.ModelOutput, "sequence_length", "TYPE_INT32", [-1]),
    ])
    if backend == "python":
        # echoed so that postprocessing takes all its inputs from this step: Triton refuses a step whose inputs come
        # from different decoupled sources (the ensemble's own inputs and a decoupled LLM)
        c.output.append(_tensor(mc.ModelOutput, "output_kind", "TYPE_STRING", [1]))
    c.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    c.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    params = {
        "gpt_model_type": "inflight_fused_batching",
        "gpt_model_path": engine_dir,
        "batch_scheduler_policy": "guaranteed_no_evict",
        "enable_chunked_context": "false",
        "max_beam_width": 1,
        "kv_cache_free_gpu_mem_fraction": 0.85,
        # off: audio enters as prompt-table rows whose fake ids repeat across clips, and CFG twins share a prefix
        # (see audex.serving.guided_executor for what the LLM model does when it is on)
        "enable_kv_cache_reuse": str(bool(kv_cache_reuse)).lower(),
        "exclude_input_in_output": "true",
        "decoding_mode": "top_k_top_p",
    }
    if kv_cache_max_tokens is not None:
        params["kv_cache_max_tokens"] = int(kv_cache_max_tokens)
    if backend == "python":
        params.update({"executor": executor, "export_dir": export_dir or "",
                       "max_batch_size": max_batch_size, "max_lag_steps": 4, "stream_chunk_seconds": 1.0,
                       "prompt_table_dtype": prompt_table_dtype, "python": sys.executable,
                       "frames_per_window": summary.frames_per_window, "window_seconds": summary.window_seconds,
                       # the engine's build sizes: the start-up check of the prompt table, the reference executor
                       **{k: v for k, v in (build or {}).items() if k in BUILD_KEYS and v is not None},
                       "presets": "../../preprocessing/1/presets.yaml",
                       **(limits or ServeLimits()).as_params()})
    _params(c, params)
    return c


def postprocessing_config(summary: ModelSummary, export_dir: str, max_batch_size: int,
                          name: str = "postprocessing", partial: bool = False,
                          max_queue_delay_us: int = 1000) -> mc.ModelConfig:
    c = mc.ModelConfig(name=name, backend="python", max_batch_size=max_batch_size)
    c.input.extend([
        _tensor(mc.ModelInput, "output_ids", "TYPE_INT32", [-1, -1]),
        _tensor(mc.ModelInput, "sequence_length", "TYPE_INT32", [-1]),
        _tensor(mc.ModelInput, "output_kind", "TYPE_STRING", [1], optional=True),   # text | speech | audio
    ])
    c.output.extend([
        _tensor(mc.ModelOutput, "text", "TYPE_STRING", [1]),
        _tensor(mc.ModelOutput, "audio", "TYPE_FP32", [-1]),
    ])
    c.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    c.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    _params(c, {"export_dir": export_dir, "sample_rate": summary.sample_rate, "partial": str(partial).lower(),
                "python": sys.executable})
    return c


_PRE_TO_LLM = tuple(spec[0] for spec in _LLM_INPUTS) + ("prompt_embedding_table",)
_PRE_TO_LLM_CFG = _PRE_TO_LLM + tuple(spec[0] for spec in _CFG_INPUTS)


def ensemble_config(name: str, max_batch_size: int, llm: str, decoupled: bool, *, cfg: bool = True,
                    postprocessing: str = "postprocessing") -> mc.ModelConfig:
    c = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch_size)
    if decoupled:
        c.model_transaction_policy.decoupled = True
    c.input.extend(request_inputs("TYPE_UINT64", ragged_audio=False))
    # ensemble inputs and outputs share one tensor namespace: an output named like an input ("text") would be
    # answered twice (the input at once, the step's output later), hence TensorRT-LLM's "*_output" names
    c.output.extend([_tensor(mc.ModelOutput, "text_output", "TYPE_STRING", [1]),
                     _tensor(mc.ModelOutput, "audio_output", "TYPE_FP32", [-1])])
    to_llm = _PRE_TO_LLM_CFG if cfg else _PRE_TO_LLM
    pre = c.ensemble_scheduling.step.add(model_name="preprocessing", model_version=-1)
    for key in (t.name for t in c.input):
        pre.input_map[key] = key
    for key in _PRE_TO_LLM_CFG:
        pre.output_map[key] = f"_{key}"
    gen = c.ensemble_scheduling.step.add(model_name=llm, model_version=-1)
    for key in to_llm:
        gen.input_map[key] = f"_{key}"
    gen.output_map["output_ids"] = "_output_ids"
    gen.output_map["sequence_length"] = "_sequence_length"
    post = c.ensemble_scheduling.step.add(model_name=postprocessing, model_version=-1)
    if cfg:
        gen.output_map["output_kind"] = "_llm_output_kind"
        post.input_map["output_kind"] = "_llm_output_kind"
    elif not decoupled:
        post.input_map["output_kind"] = "_output_kind"
    # else (C++ backend, streaming): the kind is read off the generated ids (a decoupled step's consumers may take
    # nothing from before it)
    post.input_map["output_ids"] = "_output_ids"
    post.input_map["sequence_length"] = "_sequence_length"
    post.output_map["text"] = "text_output"
    post.output_map["audio"] = "audio_output"
    return c


HANDLERS = {  # model name -> the handler its python model runs
    "audex": "audex.serving.triton.handlers:LocalEngineHandler",
    "preprocessing": "audex.serving.triton.handlers:PreprocessingHandler",
    "tensorrt_llm": "audex.serving.triton.handlers:LlmHandler",
    "tensorrt_llm_stream": "audex.serving.triton.handlers:LlmHandler",
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
        tensorrt_llm_config(summary, engine_dir, max_batch_size, decoupled=False, **llm),
        tensorrt_llm_config(summary, engine_dir, max_batch_size, decoupled=True, name="tensorrt_llm_stream", **llm),
        postprocessing_config(summary, export_dir, max_batch_size),
        postprocessing_config(summary, export_dir, max_batch_size, name="postprocessing_stream", partial=True),
        ensemble_config("ensemble", max_batch_size, "tensorrt_llm", decoupled=False, cfg=cfg),
        ensemble_config("ensemble_stream", max_batch_size, "tensorrt_llm_stream", decoupled=True, cfg=cfg,
                        postprocessing="postprocessing_stream"),
    ]
    for config in configs:
        if config.backend == "python":
            # torch threads of a step run in a worker process (on this kind of stub): one each, several run at once
            config.parameters["num_threads"].string_value = str(num_threads)
            if handler_process:
                config.parameters["handler_process"].string_value = handler_process
        write_config(config, out / config.name)
        version = out / config.name / "1"
        version.mkdir(parents=True, exist_ok=True)
        if config.backend == "python":
            (version / "model.py").write_text(python_model_py(HANDLERS[config.name]))
    shutil.copy(config_path("infer", "presets.yaml"), out / "preprocessing" / "1" / "presets.yaml")
    return out
