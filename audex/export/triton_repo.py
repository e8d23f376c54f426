"""Triton model repositories for Audex, generated as ``ModelConfig`` protos and validated by parsing them back.

Two layouts, both filled from the model's own config (hidden size, vocabulary, context, frame rate):

**CPU** (:func:`write_cpu_repository`, runs here): one python-backend model ``audex`` that runs Audex's PyTorch
generation engine, CFG included (:mod:`audex.export.triton_models.audex_engine`), dynamic batching::

    repo/audex/config.pbtxt   repo/audex/1/model.py   repo/audex/1/presets.yaml

**GPU** (:func:`write_gpu_repository`, for hosts with TensorRT-LLM and its Triton backend): the standard ensemble
of TensorRT-LLM's ``inflight_batcher_llm`` layout::

    preprocessing   (python)       task/text/audio -> input_ids (audio frames as ids >= vocab_size) +
                                   prompt_embedding_table (the ONNX front end) + sampling inputs
    tensorrt_llm    (tensorrtllm)  the engine from trtllm-build, in-flight batching
    postprocessing  (python)       output_ids -> text, or codec codes -> 16 kHz waveform (codec decoders)
    ensemble        (ensemble)     wires the three; ``ensemble_stream`` is the decoupled (streaming) twin for TTS

``config.pbtxt`` is written with ``google.protobuf.text_format`` from ``tritonclient.grpc.model_config_pb2`` and
:func:`validate_repository` parses every file back (unknown fields are errors) and checks the ensemble wiring.

Example::

    >>> write_cpu_repository("triton_repo", "audex_tiny.nemo", model_config=model_summary(model))
    >>> validate_repository("triton_repo")
    ['audex']
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from audex.export.serving import ServeLimits

MODELS_DIR = Path(__file__).resolve().parent / "triton_models"
PRESETS_YAML = Path(__file__).resolve().parents[2] / "conf" / "infer" / "presets.yaml"


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
    c.input.extend([
        _tensor(mc.ModelInput, "task", "TYPE_STRING", [1]),
        _tensor(mc.ModelInput, "text", "TYPE_STRING", [1], optional=True),
        _tensor(mc.ModelInput, "audio", "TYPE_FP32", [-1], optional=True, ragged=True),
        _tensor(mc.ModelInput, "sample_rate", "TYPE_INT32", [1], optional=True),
        _tensor(mc.ModelInput, "max_new_tokens", "TYPE_INT32", [1], optional=True),
        _tensor(mc.ModelInput, "seed", "TYPE_INT64", [1], optional=True),
        _tensor(mc.ModelInput, "guidance_scale", "TYPE_FP32", [1], optional=True),
    ])
    c.output.extend([
        _tensor(mc.ModelOutput, "text", "TYPE_STRING", [1]),
        _tensor(mc.ModelOutput, "audio", "TYPE_FP32", [-1]),
        _tensor(mc.ModelOutput, "finish_reason", "TYPE_STRING", [1]),
    ])
    c.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    c.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances))
    limit_params = {k: v for k, v in asdict(limits).items() if v is not None}
    _params(c, {"model_path": model_path, "python": sys.executable, "num_threads": num_threads,
                "presets": "presets.yaml", **limit_params})
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
    (version / "model.py").write_text(
        '"""Audex on the CPU: the PyTorch generation engine behind Triton (see audex.export.triton_models)."""\n'
        "from audex.export.triton_models.audex_engine import TritonPythonModel  # noqa: F401\n")
    shutil.copy(presets_yaml or PRESETS_YAML, version / "presets.yaml")
    return out


# ---- GPU repository ----------------------------------------------------------------------------
def preprocessing_config(summary: ModelSummary, export_dir: str, max_batch_size: int) -> mc.ModelConfig:
    c = mc.ModelConfig(name="preprocessing", backend="python", max_batch_size=max_batch_size)
    c.input.extend([
        _tensor(mc.ModelInput, "task", "TYPE_STRING", [1]),
        _tensor(mc.ModelInput, "text", "TYPE_STRING", [1], optional=True),
        _tensor(mc.ModelInput, "audio", "TYPE_FP32", [-1], optional=True, ragged=True),
        _tensor(mc.ModelInput, "max_new_tokens", "TYPE_INT32", [1], optional=True),
        _tensor(mc.ModelInput, "seed", "TYPE_UINT64", [1], optional=True),
    ])
    c.output.extend([
        _tensor(mc.ModelOutput, "input_ids", "TYPE_INT32", [-1]),
        _tensor(mc.ModelOutput, "input_lengths", "TYPE_INT32", [1]),
        _tensor(mc.ModelOutput, "request_output_len", "TYPE_INT32", [1]),
        _tensor(mc.ModelOutput, "prompt_embedding_table", "TYPE_FP16", [-1, summary.hidden_size]),
        _tensor(mc.ModelOutput, "prompt_vocab_size", "TYPE_INT32", [1]),
        _tensor(mc.ModelOutput, "end_id", "TYPE_INT32", [1]),
        _tensor(mc.ModelOutput, "pad_id", "TYPE_INT32", [1]),
        _tensor(mc.ModelOutput, "runtime_top_k", "TYPE_INT32", [1]),
        _tensor(mc.ModelOutput, "runtime_top_p", "TYPE_FP32", [1]),
        _tensor(mc.ModelOutput, "temperature", "TYPE_FP32", [1]),
        _tensor(mc.ModelOutput, "random_seed", "TYPE_UINT64", [1]),
    ])
    c.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    _params(c, {"export_dir": export_dir, "vocab_size": summary.vocab_size, "hidden_size": summary.hidden_size,
                "frames_per_window": summary.frames_per_window, "window_seconds": summary.window_seconds})
    return c


def tensorrt_llm_config(summary: ModelSummary, engine_dir: str, max_batch_size: int, decoupled: bool,
                        name: str = "tensorrt_llm") -> mc.ModelConfig:
    """TensorRT-LLM's own Triton backend (``backend: "tensorrtllm"``), as its ``inflight_batcher_llm`` layout
    declares it: in-flight fused batching, guaranteed-no-evict scheduling (twins of a CFG pair stay scheduled
    together once admitted, see :mod:`audex.export.cfg_pairing`), prompt tuning for the audio frames."""
    c = mc.ModelConfig(name=name, backend="tensorrtllm", max_batch_size=max_batch_size)
    c.model_transaction_policy.decoupled = decoupled
    c.input.extend([
        _tensor(mc.ModelInput, "input_ids", "TYPE_INT32", [-1], ragged=True),
        _tensor(mc.ModelInput, "input_lengths", "TYPE_INT32", [1]),
        _tensor(mc.ModelInput, "request_output_len", "TYPE_INT32", [1]),
        _tensor(mc.ModelInput, "end_id", "TYPE_INT32", [1], optional=True),
        _tensor(mc.ModelInput, "pad_id", "TYPE_INT32", [1], optional=True),
        _tensor(mc.ModelInput, "streaming", "TYPE_BOOL", [1], optional=True),
        _tensor(mc.ModelInput, "runtime_top_k", "TYPE_INT32", [1], optional=True),
        _tensor(mc.ModelInput, "runtime_top_p", "TYPE_FP32", [1], optional=True),
        _tensor(mc.ModelInput, "temperature", "TYPE_FP32", [1], optional=True),
        _tensor(mc.ModelInput, "random_seed", "TYPE_UINT64", [1], optional=True),
        _tensor(mc.ModelInput, "prompt_embedding_table", "TYPE_FP16", [-1, summary.hidden_size], optional=True),
        _tensor(mc.ModelInput, "prompt_vocab_size", "TYPE_INT32", [1], optional=True),
    ])
    c.output.extend([
        _tensor(mc.ModelOutput, "output_ids", "TYPE_INT32", [-1, -1]),
        _tensor(mc.ModelOutput, "sequence_length", "TYPE_INT32", [-1]),
    ])
    c.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    _params(c, {
        "gpt_model_type": "inflight_fused_batching",
        "gpt_model_path": engine_dir,
        "batch_scheduler_policy": "guaranteed_no_evict",
        "enable_chunked_context": "false",
        "max_beam_width": 1,
        "kv_cache_free_gpu_mem_fraction": 0.85,
        "exclude_input_in_output": "true",
        "decoding_mode": "top_k_top_p",
    })
    return c


def postprocessing_config(summary: ModelSummary, export_dir: str, max_batch_size: int) -> mc.ModelConfig:
    c = mc.ModelConfig(name="postprocessing", backend="python", max_batch_size=max_batch_size)
    c.input.extend([
        _tensor(mc.ModelInput, "task", "TYPE_STRING", [1]),
        _tensor(mc.ModelInput, "output_ids", "TYPE_INT32", [-1, -1]),
        _tensor(mc.ModelInput, "sequence_length", "TYPE_INT32", [-1]),
    ])
    c.output.extend([
        _tensor(mc.ModelOutput, "text", "TYPE_STRING", [1]),
        _tensor(mc.ModelOutput, "audio", "TYPE_FP32", [-1]),
    ])
    c.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    _params(c, {"export_dir": export_dir, "sample_rate": summary.sample_rate})
    return c


_PRE_TO_LLM = ("input_ids", "input_lengths", "request_output_len", "prompt_embedding_table", "prompt_vocab_size",
               "end_id", "pad_id", "runtime_top_k", "runtime_top_p", "temperature", "random_seed")


def ensemble_config(name: str, max_batch_size: int, llm: str, decoupled: bool) -> mc.ModelConfig:
    c = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch_size)
    if decoupled:
        c.model_transaction_policy.decoupled = True
    c.input.extend([
        _tensor(mc.ModelInput, "task", "TYPE_STRING", [1]),
        _tensor(mc.ModelInput, "text", "TYPE_STRING", [1], optional=True),
        _tensor(mc.ModelInput, "audio", "TYPE_FP32", [-1], optional=True),
        _tensor(mc.ModelInput, "max_new_tokens", "TYPE_INT32", [1], optional=True),
        _tensor(mc.ModelInput, "seed", "TYPE_UINT64", [1], optional=True),
    ])
    c.output.extend([_tensor(mc.ModelOutput, "text", "TYPE_STRING", [1]),
                     _tensor(mc.ModelOutput, "audio", "TYPE_FP32", [-1])])
    pre = c.ensemble_scheduling.step.add(model_name="preprocessing", model_version=-1)
    for key in ("task", "text", "audio", "max_new_tokens", "seed"):
        pre.input_map[key] = key
    for key in _PRE_TO_LLM:
        pre.output_map[key] = f"_{key}"
    gen = c.ensemble_scheduling.step.add(model_name=llm, model_version=-1)
    for key in _PRE_TO_LLM:
        gen.input_map[key] = f"_{key}"
    gen.output_map["output_ids"] = "_output_ids"
    gen.output_map["sequence_length"] = "_sequence_length"
    post = c.ensemble_scheduling.step.add(model_name="postprocessing", model_version=-1)
    post.input_map["task"] = "task"
    post.input_map["output_ids"] = "_output_ids"
    post.input_map["sequence_length"] = "_sequence_length"
    post.output_map["text"] = "text"
    post.output_map["audio"] = "audio"
    return c


def write_gpu_repository(out_dir: str | Path, export_dir: str | Path, summary: ModelSummary, *,
                         engine_dir: str | Path | None = None, max_batch_size: int = 64) -> Path:
    """The GPU ensemble (see the module docstring) over an export folder written by ``scripts/export_trtllm.py``."""
    out = Path(out_dir)
    export_dir = str(Path(export_dir).resolve())
    engine_dir = str(engine_dir or Path(export_dir) / "engine")
    configs = [
        preprocessing_config(summary, export_dir, max_batch_size),
        tensorrt_llm_config(summary, engine_dir, max_batch_size, decoupled=False),
        tensorrt_llm_config(summary, engine_dir, max_batch_size, decoupled=True, name="tensorrt_llm_stream"),
        postprocessing_config(summary, export_dir, max_batch_size),
        ensemble_config("ensemble", max_batch_size, "tensorrt_llm", decoupled=False),
        ensemble_config("ensemble_stream", max_batch_size, "tensorrt_llm_stream", decoupled=True),
    ]
    for config in configs:
        write_config(config, out / config.name)
        if config.backend == "python":
            version = out / config.name / "1"
            version.mkdir(parents=True, exist_ok=True)
            (version / "model.py").write_text(
                f"from audex.export.triton_models.trtllm_{config.name} import TritonPythonModel  # noqa: F401\n")
        elif config.platform == "ensemble" or config.backend == "tensorrtllm":
            (out / config.name / "1").mkdir(parents=True, exist_ok=True)
    return out


# ---- validation --------------------------------------------------------------------------------
class RepositoryError(ValueError):
    """A model repository Triton would refuse (the message names the file and the field)."""


def read_config(path: str | Path) -> mc.ModelConfig:
    path = Path(path)
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except text_format.ParseError as e:
        raise RepositoryError(f"{path}: not a valid Triton ModelConfig ({e})") from None


def validate_repository(repo: str | Path) -> list[str]:
    """Parse every ``config.pbtxt`` back into a ``ModelConfig`` and check what Triton checks at load time that the
    schema cannot: folder name = model name, a version folder, ``1/model.py`` for python models, and every ensemble
    step naming a model of the repository with inputs/outputs that model declares. Returns the model names."""
    repo = Path(repo)
    configs = {}
    for cfg_path in sorted(repo.glob("*/config.pbtxt")):
        config = read_config(cfg_path)
        folder = cfg_path.parent.name
        if config.name != folder:
            raise RepositoryError(f"{cfg_path}: name {config.name!r} differs from its folder {folder!r}")
        if not config.backend and not config.platform:
            raise RepositoryError(f"{cfg_path}: neither backend nor platform is set")
        if not (cfg_path.parent / "1").is_dir():
            raise RepositoryError(f"{cfg_path.parent}: no version folder 1/")
        if config.backend == "python" and not (cfg_path.parent / "1" / "model.py").exists():
            raise RepositoryError(f"{cfg_path.parent}: python backend without 1/model.py")
        for kind, tensors in (("input", config.input), ("output", config.output)):
            names = [t.name for t in tensors]
            if len(names) != len(set(names)):
                raise RepositoryError(f"{cfg_path}: duplicate {kind} names {sorted({n for n in names if names.count(n) > 1})}")
        configs[config.name] = config
    if not configs:
        raise RepositoryError(f"{repo}: no */config.pbtxt found")
    for config in configs.values():
        if config.platform != "ensemble":
            continue
        for step in config.ensemble_scheduling.step:
            target = configs.get(step.model_name)
            if target is None:
                raise RepositoryError(f"ensemble {config.name!r}: step model {step.model_name!r} is not in {repo}")
            inputs = {t.name for t in target.input}
            outputs = {t.name for t in target.output}
            bad_in = set(step.input_map) - inputs
            bad_out = set(step.output_map) - outputs
            if bad_in or bad_out:
                raise RepositoryError(f"ensemble {config.name!r} -> {step.model_name!r}: unknown inputs {sorted(bad_in)} "
                                      f"/ outputs {sorted(bad_out)}")
            required = {t.name for t in target.input if not t.optional}
            if required - set(step.input_map):
                raise RepositoryError(f"ensemble {config.name!r} -> {step.model_name!r}: required inputs "
                                      f"{sorted(required - set(step.input_map))} are not mapped")
            if target.model_transaction_policy.decoupled and not config.model_transaction_policy.decoupled:
                raise RepositoryError(f"ensemble {config.name!r} runs the decoupled model {step.model_name!r} "
                                      "but is not decoupled itself")
    return sorted(configs)
