"""Write a Triton model repository for an Audex model (config.pbtxt files generated and validated).

CPU layout (runs here, PyTorch engine in a python-backend model)::

    python scripts/make_triton_repo.py model_path=tiny.nemo repo=triton_repo

GPU layout (TensorRT-LLM ensemble over an export folder from scripts/export_trtllm.py)::

    python scripts/make_triton_repo.py model_path=audex_2b.nemo repo=triton_repo layout=gpu export_dir=audex_export

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
        from audex.export.loading import load_audex_model

        summary = ModelSummary.of(load_audex_model(cfg.model_path))
        repo = write_gpu_repository(cfg.repo, cfg.export_dir, summary, max_batch_size=cfg.trtllm.build.max_batch_size)
    else:
        raise SystemExit(f"layout must be 'cpu' or 'gpu', got {cfg.layout!r}")
    print(f"wrote {repo}: models {validate_repository(repo)}")


if __name__ == "__main__":
    main()
