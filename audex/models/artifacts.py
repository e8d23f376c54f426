"""What an :class:`~audex.models.audex_model.AudexModel` puts into a ``.nemo`` and into a Hugging Face folder.

* ``.nemo`` artifacts: the tokenizer files (``tokenizer.artifacts.*``), each codec's HF ``config.json``
  (``<codec>.config_file``), and the HF config each part was built from (``<part>.resolved_config``), so that a
  restore rebuilds the architectures without the original pretrained folders.
* the pretrained folder (:func:`write_pretrained_folder` / :func:`read_pretrained_folder`): ``backbone/``
  (loads with ``AutoModelForCausalLM``), ``tokenizer/``, ``audio_encoder/``, ``adapter.safetensors``, codec
  folders and ``audex_config.yaml``, as NeMo's newer speech collections do.

These functions take the model (a NeMo ``ModelPT``: ``register_artifact``, ``_cfg``) as their first argument;
:mod:`audex.models.checkpoint` holds the one loader built on them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import save_file

from audex.tokenizer import AudexTokenizer

COMPONENTS = ("audio_encoder", "backbone", "adapter", "speech_codec", "audio_codec")
CODECS = ("speech_codec", "audio_codec")


def scratch_dir(model, name: str) -> Path:
    """A folder for files that must outlive ``__init__`` (artifacts are copied at save time); removed with the model."""
    if getattr(model, "_scratch", None) is None:
        model._scratch = tempfile.TemporaryDirectory(prefix="audex_model_")
    folder = Path(model._scratch.name) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ---- .nemo artifacts ------------------------------------------------------------------------------
def build_tokenizer(model, cfg: DictConfig) -> AudexTokenizer:
    """The tokenizer of ``cfg.tokenizer``: from the ``.nemo`` artifacts on restore, else from ``pretrained_path``
    or a tiny BPE; a freshly built one is registered as artifacts so that ``save_to`` packs it."""
    tcfg = cfg.tokenizer
    artifacts = tcfg.get("artifacts")
    if artifacts:  # restoring a .nemo: the tokenizer files were packed as artifacts
        folder = scratch_dir(model, "tokenizer")
        names = model._cfg.tokenizer.get("artifact_names", {})
        for key in artifacts:
            real = Path(model.register_artifact(f"tokenizer.artifacts.{key}", artifacts[key]))
            shutil.copy(real, folder / names.get(key, real.name))
        return AudexTokenizer.load(folder)
    if tcfg.get("pretrained_path"):
        tok = AudexTokenizer.from_pretrained(tcfg.pretrained_path, model.vocab, tcfg.get("special_token_map"))
    elif tcfg.get("kind", "tiny_bpe") == "tiny_bpe":
        tok = AudexTokenizer.build_tiny(model.vocab, bpe_size=model.vocab.text_vocab_size)
    else:
        raise ValueError(f"model.tokenizer needs pretrained_path or kind: tiny_bpe, got {OmegaConf.to_container(tcfg)}")
    folder = scratch_dir(model, "tokenizer")
    tok.save(folder)
    files = {}
    for f in sorted(folder.iterdir()):
        key = f.name.replace(".", "_")
        files[key] = model.register_artifact(f"tokenizer.artifacts.{key}", str(f))
    with open_dict(model._cfg):
        model._cfg.tokenizer.artifacts = dict(files)
        model._cfg.tokenizer.artifact_names = {f.name.replace(".", "_"): f.name for f in folder.iterdir()}
    return tok


def node_for_build(node: DictConfig, restoring: bool) -> DictConfig:
    """A part's config to instantiate; on restore, built from the recorded HF config instead of the (possibly
    absent) pretrained folder."""
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    resolved = node.pop("resolved_config", None)
    node.pop("config_file", None)  # an artifact of the .nemo, not a constructor argument
    if restoring and resolved is not None and node.get("pretrained_path"):
        node.pretrained_path = None
        node.config = resolved.get("config")
        if "model_type" in resolved:
            node.model_type = resolved.model_type
    return node


def _hf_dict(module) -> dict:
    d = module.config.to_dict()
    d.pop("transformers_version", None)
    d.pop("architectures", None)
    return d


def record_resolved_configs(model) -> None:
    """Write each part's HF config into ``model.cfg.<part>.resolved_config`` (read back by :func:`node_for_build`)."""
    with open_dict(model._cfg):
        if model.llm is not None:
            d = _hf_dict(model.llm.lm)
            model_type = d.pop("model_type")
            d["vocab_size"] = model.llm.text_vocab_size
            model._cfg.backbone.resolved_config = {"model_type": model_type, "config": d}
        if model.audio_encoder is not None:
            d = _hf_dict(model.audio_encoder.encoder)
            d.pop("model_type", None)
            model._cfg.audio_encoder.resolved_config = {"config": d}
        for name in CODECS:
            codec = getattr(model, name)
            if codec is not None:
                d = _hf_dict(codec.model)
                d.pop("model_type", None)
                model._cfg[name].resolved_config = {"config": d}


def register_codec_config_artifacts(model, cfg: DictConfig) -> None:
    """Pack each codec's Hugging Face ``config.json`` into the ``.nemo`` (``<codec>.config_file``), so that a
    user can rebuild the codec alone (e.g. for the Triton post-processing step) from the archive."""
    for name in CODECS:
        codec = getattr(model, name)
        if codec is None:
            continue
        src = cfg[name].get("config_file")
        if not src:
            src = str(scratch_dir(model, name) / f"{name}_config.json")
            Path(src).write_text(codec.model.config.to_json_string())
        path = model.register_artifact(f"{name}.config_file", src)
        with open_dict(model._cfg):
            model._cfg[name].config_file = path


# ---- Hugging Face-style folder --------------------------------------------------------------------
def write_pretrained_folder(model, folder: str | Path) -> Path:
    """Write ``model`` as a pretrained folder (see the module docstring); returns the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(out / "backbone", safe_serialization=True)
    model.tokenizer.save(out / "tokenizer")
    if model.audio_encoder is not None:
        model.audio_encoder.encoder.save_pretrained(out / "audio_encoder", safe_serialization=True)
        save_file({k: v.contiguous() for k, v in model.adapter.state_dict().items()}, str(out / "adapter.safetensors"))
    for name in CODECS:
        codec = getattr(model, name)
        if codec is not None:
            codec.model.save_pretrained(out / name, safe_serialization=True)
    cfg = OmegaConf.create(OmegaConf.to_container(model._cfg, resolve=True))
    with open_dict(cfg):
        cfg.tokenizer = {"pretrained_path": str(out / "tokenizer"), "special_token_map": cfg.tokenizer.get("special_token_map")}
        cfg.backbone.pretrained_path = str(out / "backbone")
        if model.audio_encoder is not None:
            cfg.audio_encoder.pretrained_path = str(out / "audio_encoder")
            cfg.adapter.pretrained_path = str(out / "adapter.safetensors")
        for name in CODECS:
            if cfg.get(name) is not None:
                cfg[name].pretrained_path = str(out / name)
        for name in COMPONENTS:
            if cfg.get(name) is not None:
                cfg[name].pop("resolved_config", None)
        cfg.tokenizer.pop("artifacts", None)
    OmegaConf.save(cfg, out / "audex_config.yaml")
    (out / "README.txt").write_text("Audex model folder. Load with AudexModel.from_pretrained(folder).\n")
    return out


def read_pretrained_folder(folder: str | Path) -> tuple[DictConfig, Path | None]:
    """The model config of a pretrained folder, its paths re-anchored to where the folder is now, and the
    adapter weights file to load after building (None without an audio encoder)."""
    path = Path(folder)
    if not (path / "audex_config.yaml").exists():
        raise FileNotFoundError(f"{str(folder)!r} is not an Audex pretrained folder (no audex_config.yaml): give a "
                                "folder written by AudexModel.save_pretrained()")
    cfg = OmegaConf.load(path / "audex_config.yaml")
    with open_dict(cfg):
        cfg.tokenizer.pretrained_path = str(path / "tokenizer")
        cfg.backbone.pretrained_path = str(path / "backbone")
        for name in ("audio_encoder", *CODECS):
            if cfg.get(name) is not None:
                cfg[name].pretrained_path = str(path / name)
        adapter_file = None
        if cfg.get("adapter") is not None and cfg.adapter.pop("pretrained_path", None) is not None:
            adapter_file = path / "adapter.safetensors"
    return cfg, adapter_file
