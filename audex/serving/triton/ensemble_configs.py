"""The model configs of the GPU ensemble (:func:`~audex.serving.triton.repository.write_gpu_repository`):
``preprocessing``, the LLM step ``tensorrt_llm`` with the input / output names of TensorRT-LLM's
``inflight_batcher_llm`` layout, ``postprocessing`` and the ensembles that wire them.
"""

from __future__ import annotations

import sys

from tritonclient.grpc import model_config_pb2 as mc

from audex.export.trtllm_checkpoint import BUILD_KEYS
from audex.serving.requests import ServeLimits
from audex.serving.triton.config_protos import ModelSummary, request_inputs, set_params, tensor

LLM_BACKENDS = ("python", "tensorrtllm")
EXECUTORS = ("tensorrt_llm", "torch")


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
        tensors.append(tensor(cls, name, dtype, dims, optional=optional, ragged=ragged))


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


def _llm_tensors(c: mc.ModelConfig, summary: ModelSummary, backend: str, prompt_table_dtype: str,
                 streaming: bool) -> None:
    """The LLM step's inputs and outputs (TensorRT-LLM's names; ``streaming`` only on the model that can stream)."""
    inputs = []
    _add(inputs, mc.ModelInput, _LLM_INPUTS)
    inputs.append(tensor(mc.ModelInput, "prompt_embedding_table",
                         TABLE_TYPES[table_dtype_for(backend, prompt_table_dtype)], [-1, summary.hidden_size],
                         optional=True))
    if streaming:
        inputs.append(tensor(mc.ModelInput, "streaming", "TYPE_BOOL", [1], optional=True))
    if backend == "python":
        _add(inputs, mc.ModelInput, _CFG_INPUTS)
    c.input.extend(inputs)
    c.output.extend([
        tensor(mc.ModelOutput, "output_ids", "TYPE_INT32", [-1, -1]),
        tensor(mc.ModelOutput, "sequence_length", "TYPE_INT32", [-1]),
    ])
    if backend == "python":
        # echoed so that postprocessing takes all its inputs from this step: Triton refuses a step whose inputs come
        # from different decoupled sources (the ensemble's own inputs and a decoupled LLM)
        c.output.append(tensor(mc.ModelOutput, "output_kind", "TYPE_STRING", [1]))


def preprocessing_config(summary: ModelSummary, export_dir: str, max_batch_size: int,
                         limits: ServeLimits | None = None, max_queue_delay_us: int = 1000,
                         table_dtype: str = "float32") -> mc.ModelConfig:
    """``preprocessing``: request -> LLM inputs (validation, prompts, ONNX front end, the CFG twin)."""
    c = mc.ModelConfig(name="preprocessing", backend="python", max_batch_size=max_batch_size)
    c.input.extend(request_inputs("TYPE_UINT64", ragged_audio=True))
    outputs = []
    _add(outputs, mc.ModelOutput, _LLM_INPUTS + _CFG_INPUTS)
    outputs.append(tensor(mc.ModelOutput, "prompt_embedding_table", TABLE_TYPES[table_dtype], [-1, summary.hidden_size]))
    c.output.extend(outputs)
    c.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    c.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    set_params(c, {"export_dir": export_dir, "vocab_size": summary.vocab_size, "hidden_size": summary.hidden_size,
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

    One model serves both ensembles, so the engine loads once: it is written ``decoupled`` and takes TensorRT-LLM's
    ``streaming`` input (a request with it true gets one response per chunk, any other one response);
    :func:`llm_once_config` puts it behind the non-streaming ensemble.
    """
    if backend not in LLM_BACKENDS:
        raise ValueError(f"backend must be one of {LLM_BACKENDS}, got {backend!r}")
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    c = mc.ModelConfig(name=name, backend=backend, max_batch_size=max_batch_size)
    c.model_transaction_policy.decoupled = decoupled
    _llm_tensors(c, summary, backend, prompt_table_dtype, streaming=True)
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
    set_params(c, params)
    return c


def llm_once_config(summary: ModelSummary, max_batch_size: int, *, backend: str = "python",
                    prompt_table_dtype: str = "bfloat16", llm: str = "tensorrt_llm",
                    max_queue_delay_us: int = 1000) -> mc.ModelConfig:
    """``tensorrt_llm_once``: the LLM step for the non-streaming ensemble, a BLS front of the decoupled LLM model
    (:class:`~audex.serving.triton.llm_once.LlmOnceHandler`). Triton makes an ensemble decoupled as soon as one step
    is, and a decoupled model answers neither HTTP ``infer`` nor gRPC ``ModelInfer``; this model is not decoupled, and
    forwards each request to ``llm`` with ``streaming=false``: one engine serves both ensembles."""
    c = mc.ModelConfig(name="tensorrt_llm_once", backend="python", max_batch_size=max_batch_size)
    _llm_tensors(c, summary, backend, prompt_table_dtype, streaming=False)
    c.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    c.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    # only moves tensors (standard library + NumPy) and needs the stub's BLS API: never in a worker process
    outputs = [t.name for t in c.output]
    set_params(c, {"llm_model": llm, "llm_outputs": ",".join(outputs), "handler_process": "stub",
                   "python": sys.executable})
    return c


def postprocessing_config(summary: ModelSummary, export_dir: str, max_batch_size: int,
                          name: str = "postprocessing", partial: bool = False,
                          max_queue_delay_us: int = 1000) -> mc.ModelConfig:
    c = mc.ModelConfig(name=name, backend="python", max_batch_size=max_batch_size)
    c.input.extend([
        tensor(mc.ModelInput, "output_ids", "TYPE_INT32", [-1, -1]),
        tensor(mc.ModelInput, "sequence_length", "TYPE_INT32", [-1]),
        tensor(mc.ModelInput, "output_kind", "TYPE_STRING", [1], optional=True),   # text | speech | audio
    ])
    c.output.extend([
        tensor(mc.ModelOutput, "text", "TYPE_STRING", [1]),
        tensor(mc.ModelOutput, "audio", "TYPE_FP32", [-1]),
    ])
    c.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    c.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    set_params(c, {"export_dir": export_dir, "sample_rate": summary.sample_rate, "partial": str(partial).lower(),
                "python": sys.executable})
    return c


_PRE_TO_LLM = tuple(spec[0] for spec in _LLM_INPUTS) + ("prompt_embedding_table",)
_PRE_TO_LLM_CFG = _PRE_TO_LLM + tuple(spec[0] for spec in _CFG_INPUTS)


def ensemble_config(name: str, max_batch_size: int, llm: str, decoupled: bool, *, cfg: bool = True,
                    postprocessing: str = "postprocessing") -> mc.ModelConfig:
    """preprocessing -> ``llm`` -> ``postprocessing``. The decoupled ensemble also takes TensorRT-LLM's ``stream``
    input (BOOL, optional), which it hands to the LLM model's ``streaming``: true streams, absent or false answers
    once."""
    c = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch_size)
    if decoupled:
        c.model_transaction_policy.decoupled = True
    c.input.extend(request_inputs("TYPE_UINT64", ragged_audio=False))
    request_names = [t.name for t in c.input]
    if decoupled:
        c.input.append(tensor(mc.ModelInput, "stream", "TYPE_BOOL", [1], optional=True))
    # ensemble inputs and outputs share one tensor namespace: an output named like an input ("text") would be
    # answered twice (the input at once, the step's output later), hence TensorRT-LLM's "*_output" names
    c.output.extend([tensor(mc.ModelOutput, "text_output", "TYPE_STRING", [1]),
                     tensor(mc.ModelOutput, "audio_output", "TYPE_FP32", [-1])])
    to_llm = _PRE_TO_LLM_CFG if cfg else _PRE_TO_LLM
    pre = c.ensemble_scheduling.step.add(model_name="preprocessing", model_version=-1)
    for key in request_names:
        pre.input_map[key] = key
    for key in _PRE_TO_LLM_CFG:
        pre.output_map[key] = f"_{key}"
    gen = c.ensemble_scheduling.step.add(model_name=llm, model_version=-1)
    for key in to_llm:
        gen.input_map[key] = f"_{key}"
    if decoupled:
        gen.input_map["streaming"] = "stream"
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
