"""Export an Audex model for TensorRT-LLM + Triton: the export folder of :mod:`audex.export.bundle`.

    audex-export model_path=audex_2b.nemo export_dir=audex_export trtllm.tp_size=2
    python examples/audex_export.py model_path=audex_2b.nemo export_dir=audex_export

Writes hf/, trtllm_ckpt/, frontend.onnx, the codec folders and manifest.json; builds the TensorRT-LLM engine when
tensorrt_llm is importable, otherwise prints the trtllm-build command for a GPU host. Config: ``export.yaml``.
"""

from nemo.core.config import hydra_runner
from omegaconf import DictConfig, OmegaConf

from audex import CONF_DIR
from audex.export.bundle import export_bundle
from audex.models.checkpoint import load_model


@hydra_runner(config_path=str(CONF_DIR), config_name="export")
def main(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "model_path"):
        raise SystemExit("give model_path=<.nemo | pretrained folder | model YAML> (and export_dir=...)")
    manifest = export_bundle(load_model(cfg.model_path, device="cpu"), cfg.export_dir, cfg)
    for key in ("hf", "trtllm_checkpoint", "frontend_onnx", "speech_codec", "audio_codec"):
        if manifest.get(key):
            print(f"wrote {key}: {manifest[key]}")
    print(manifest["engine"])
    return manifest
