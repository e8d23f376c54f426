"""The pieces every Audex Triton model config is made of: the model's numbers (:class:`ModelSummary`), tensors,
parameters, the request inputs, the ``config.pbtxt`` writer and the ``1/model.py`` of a python model.

Configs are ``ModelConfig`` protos of ``tritonclient.grpc.model_config_pb2``, written with
``google.protobuf.text_format`` (:mod:`audex.serving.triton.repository` assembles the repositories).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc


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


def tensor(cls, name: str, dtype: str, dims, optional: bool = False, ragged: bool = False):
    t = cls(name=name, data_type=mc.DataType.Value(dtype), dims=list(dims))
    if cls is mc.ModelInput:
        t.optional = optional
        t.allow_ragged_batch = ragged
    return t


def request_inputs(seed_type: str, ragged_audio: bool, voice_and_tools: bool = False) -> list:
    """The inputs of a :class:`~audex.serving.requests.ServeRequest`, as every request-facing model declares them:
    ``task`` and, optional, ``text``, ``audio``, ``sample_rate``, ``max_new_tokens``, ``seed``, ``guidance_scale``
    (``seed`` is UINT64 where it meets TensorRT-LLM's ``random_seed``; an ensemble's own inputs are not ragged).
    ``voice_and_tools``: also a TTS voice prompt (``voice``, ``voice_sample_rate``, ``voice_text``) and a chat's
    ``tools`` (JSON), which only the CPU ``audex`` model serves."""
    specs = [("task", "TYPE_STRING", [1], False), ("text", "TYPE_STRING", [1], True),
             ("audio", "TYPE_FP32", [-1], True), ("sample_rate", "TYPE_INT32", [1], True),
             ("max_new_tokens", "TYPE_INT32", [1], True), ("seed", seed_type, [1], True),
             ("guidance_scale", "TYPE_FP32", [1], True)]
    if voice_and_tools:
        specs += [("voice", "TYPE_FP32", [-1], True), ("voice_sample_rate", "TYPE_INT32", [1], True),
                  ("voice_text", "TYPE_STRING", [1], True), ("tools", "TYPE_STRING", [1], True)]
    return [tensor(mc.ModelInput, name, dtype, dims, optional=optional,
                   ragged=ragged_audio and name in ("audio", "voice")) for name, dtype, dims, optional in specs]


def set_params(config: mc.ModelConfig, values: dict) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def write_config(config: mc.ModelConfig, model_dir: Path) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.pbtxt"
    path.write_text(text_format.MessageToString(config))
    return path


def python_model_py(handler: str) -> str:
    """The ``1/model.py`` of a python model: the one Audex python model, with its handler."""
    return ('"""An Audex python model (see audex.serving.triton.python_model)."""\n'
            "from audex.serving.triton.python_model import AudexPythonModel\n\n\n"
            "class TritonPythonModel(AudexPythonModel):\n"
            f"    handler = {handler!r}\n")
