"""Write a Triton model repository for an Audex model (config.pbtxt files generated and validated).

CPU layout (runs here, PyTorch engine in a python-backend model)::

    python scripts/make_triton_repo.py model_path=tiny.nemo repo=triton_repo

GPU layout (TensorRT-LLM ensemble over an export folder from scripts/export_trtllm.py; CFG pairs for TTS/TTA)::

    python scripts/make_triton_repo.py repo=triton_repo layout=gpu export_dir=audex_export

The same ensemble on a CPU machine, with the PyTorch reference executor in place of TensorRT-LLM's::

    python scripts/make_triton_repo.py repo=triton_repo layout=gpu export_dir=audex_export executor=torch

``llm_backend=tensorrtllm`` writes TensorRT-LLM's C++ backend for the LLM step instead (no CFG for TTS/TTA).

Keys come from conf/export.yaml (``serve.*``); any of them is overridable as ``key=value``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from audex.export.serving import ServeLimits
from audex.export.triton_repo import ModelSummary, validate_repository, write_cpu_repository, write_gpu_repository

CONF = Path(__file__).resolve().parents[1] / "conf" / "export.yaml"


def main(argv=None) -> None:
    cfg = OmegaConf.merge(OmegaConf.load(CONF), {"repo": "triton_repo", "layout": "cpu"},
                          OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv)))
    serve = cfg.serve
    limits = ServeLimits.from_config(serve)
    if cfg.layout == "cpu":
        repo = write_cpu_repository(cfg.repo, cfg.model_path, limits=limits, max_batch_size=serve.max_batch_size,
                                    max_queue_delay_us=serve.max_queue_delay_us, instances=serve.instances,
                                    num_threads=serve.num_threads)
    elif cfg.layout == "gpu":
        summary = ModelSummary.from_export(cfg.export_dir)
        repo = write_gpu_repository(cfg.repo, cfg.export_dir, summary, max_batch_size=cfg.trtllm.build.max_batch_size,
                                    llm_backend=cfg.llm_backend, executor=cfg.executor, limits=limits,
                                    prompt_table_dtype=cfg.trtllm.dtype,
                                    build=OmegaConf.to_container(cfg.trtllm.build, resolve=True),
                                    kv_cache_reuse=bool(cfg.trtllm.get("kv_cache_reuse", False)))
    else:
        raise SystemExit(f"layout must be 'cpu' or 'gpu', got {cfg.layout!r}")
    print(f"wrote {repo}: models {validate_repository(repo)}")


if __name__ == "__main__":
    main()
