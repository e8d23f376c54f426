"""One export folder with everything a TensorRT-LLM + Triton deployment of an Audex model needs.

``.nemo`` (or pretrained folder) -> ``export_dir/``::

    hf/                    backbone + tokenizer, Hugging Face layout (TensorRT-LLM LLM API / PyTorch backend)
    trtllm_ckpt/           config.json + rank{N}.safetensors for trtllm-build (Llama-family backbones)
    frontend.onnx          audio -> prompt-embedding table (features + encoder + adapter)
    speech_codec/          X-Codec2 (decoder used by the post-processing step), Hugging Face layout
    audio_codec/           X-Codec, Hugging Face layout
    engine/                the TensorRT-LLM engine, when tensorrt_llm is importable (GPU hosts)
    manifest.json          what was written, the vocabulary layout and the trtllm-build command

The command is ``audex-export model_path=x.nemo export_dir=out`` (or ``python examples/audex_export.py ...``, see
:mod:`audex.cli.export`); keys come from the package's ``export.yaml``. Without TensorRT-LLM the last line printed is
the exact ``trtllm-build`` command.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from audex.export.frontend_onnx import export_frontend_onnx
from audex.export.hf_folder import export_hf_folder
from audex.export.trtllm_checkpoint import (
    LLAMA_FAMILY,
    build_engine,
    tensorrt_llm_available,
    trtllm_build_command,
    write_trtllm_checkpoint,
)


def export_bundle(model, out_dir: str | Path, cfg: DictConfig) -> dict:
    """Write the export folder for ``model`` (an AudexModel); returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = cfg.trtllm
    manifest: dict = {"hf": str(export_hf_folder(model, out / "hf", dtype=t.dtype))}
    if model.backbone.config.model_type in LLAMA_FAMILY:
        ckpt = write_trtllm_checkpoint(model.backbone, out / "trtllm_ckpt", dtype=t.dtype, tp_size=t.tp_size,
                                       pp_size=t.pp_size, use_parallel_embedding=t.use_parallel_embedding)
        manifest["trtllm_checkpoint"] = str(ckpt)
        build = OmegaConf.to_container(t.build, resolve=True)
        manifest["trtllm_build_command"] = shlex.join(trtllm_build_command(ckpt, out / "engine", build))
        manifest["engine"] = build_engine(ckpt, out / "engine", build)
    else:
        manifest["trtllm_checkpoint"] = None
        manifest["engine"] = ("hybrid backbone: serve hf/ with TensorRT-LLM's PyTorch backend "
                              f"(LLM(model={str(out / 'hf')!r}, skip_tokenizer_init=True))")
    if model.audio_encoder is not None:
        manifest["frontend_onnx"] = str(export_frontend_onnx(model, out / "frontend.onnx", opset=cfg.frontend.opset))
    for name in ("speech_codec", "audio_codec"):
        codec = getattr(model, name)
        if codec is not None:
            codec.model.save_pretrained(out / name, safe_serialization=True)
            manifest[name] = str(out / name)
    vocab = model.vocab
    manifest["vocab"] = vocab.to_dict() | {"size": vocab.size}
    manifest["audio_rvq_used"] = vocab.audio_rvq_used
    manifest["tensorrt_llm_available"] = tensorrt_llm_available()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest

