"""Write a Triton model repository for an Audex model (``config.pbtxt`` files generated and validated).

CPU layout (one python model running the local engine)::

    audex-triton-repo model_path=tiny.nemo repo=triton_repo

GPU layout (the TensorRT-LLM ensemble over an export folder of ``audex-export``; CFG pairs for TTS/TTA)::

    audex-triton-repo repo=triton_repo layout=gpu export_dir=audex_export

The same ensemble on a CPU machine, with the reference executor in place of TensorRT-LLM's: add ``executor=torch``.
``llm_backend=tensorrtllm`` writes TensorRT-LLM's C++ backend for the LLM step instead (no CFG for TTS/TTA).
Config: ``triton_repo.yaml`` (``export.yaml`` plus ``repo`` and ``layout``; limits under ``serve.*``).
"""

from pathlib import Path

from nemo.core.config import hydra_runner
from omegaconf import DictConfig, OmegaConf

from audex import CONF_DIR
from audex.serving.requests import ServeLimits
from audex.serving.triton.repository import ModelSummary, write_cpu_repository, write_gpu_repository
from audex.serving.triton.repository_check import validate_repository

LAYOUTS = ("cpu", "gpu")


def write_repository(cfg: DictConfig) -> Path:
    """The repository ``cfg`` describes (``layout``, ``repo``, ``model_path`` or ``export_dir``, ``serve.*``)."""
    serve = cfg.serve
    limits = ServeLimits.from_config(serve)
    if cfg.layout == "cpu":
        if OmegaConf.is_missing(cfg, "model_path"):
            raise SystemExit("layout=cpu needs model_path=<.nemo | pretrained folder | model YAML>")
        return write_cpu_repository(cfg.repo, cfg.model_path, limits=limits, max_batch_size=serve.max_batch_size,
                                    max_queue_delay_us=serve.max_queue_delay_us, instances=serve.instances,
                                    num_threads=serve.num_threads)
    if cfg.layout == "gpu":
        return write_gpu_repository(cfg.repo, cfg.export_dir, ModelSummary.from_export(cfg.export_dir),
                                    max_batch_size=cfg.trtllm.build.max_batch_size, llm_backend=cfg.llm_backend,
                                    executor=cfg.executor, limits=limits, prompt_table_dtype=cfg.trtllm.dtype,
                                    build=OmegaConf.to_container(cfg.trtllm.build, resolve=True),
                                    kv_cache_reuse=bool(cfg.trtllm.get("kv_cache_reuse", False)),
                                    kv_cache_max_tokens=cfg.trtllm.get("kv_cache_max_tokens"),
                                    runtime=cfg.trtllm.get("runtime", "engine"))
    raise SystemExit(f"layout must be one of {LAYOUTS}, got {cfg.layout!r}")


@hydra_runner(config_path=str(CONF_DIR), config_name="triton_repo")
def main(cfg: DictConfig) -> Path:
    repo = write_repository(cfg)
    print(f"wrote {repo}: models {validate_repository(repo)}")
    return repo
