"""Serve an Audex model with the Triton server of the nvidia-pytriton wheel, until SIGTERM / Ctrl-C.

    audex-serve model_path=tiny.nemo              # writes the CPU repository triton_repo/ (local engine), serves it
    audex-serve repo=triton_repo serve.http_port=8100
    audex-serve repo=gpu_repo                     # any written repository, e.g. the GPU ensemble of
                                                  # audex-triton-repo layout=gpu executor=torch

Then: ``audex-client task=chat text=Hello``. Needs no network: what the Triton python stub needs was installed by
``scripts/setup_env.sh`` (see :mod:`audex.serving.triton.launcher`). Config: ``serve.yaml`` (``triton_repo.yaml``:
``export.yaml`` + ``repo`` + ``layout``).
"""

import signal
import threading
from pathlib import Path

from nemo.core.config import hydra_runner
from omegaconf import DictConfig, OmegaConf

from audex import CONF_DIR
from audex.cli.triton_repo import write_repository
from audex.serving.triton.launcher import TritonServer


@hydra_runner(config_path=str(CONF_DIR), config_name="serve")
def main(cfg: DictConfig) -> None:
    repo = Path(cfg.repo)
    if not any(repo.glob("*/config.pbtxt")):
        if cfg.layout == "cpu" and OmegaConf.is_missing(cfg, "model_path"):
            raise SystemExit(f"{repo} holds no Audex repository: pass model_path=... to write one, or repo=...")
        write_repository(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = TritonServer(repo, host=cfg.serve.host, http_port=cfg.serve.http_port, grpc_port=cfg.serve.grpc_port,
                          metrics_port=cfg.serve.metrics_port)
    with server:
        print(f"Triton ready: HTTP {server.http_url}, gRPC {server.grpc_url} (log: {server.log_path})", flush=True)
        stop.wait()
        print("stopping Triton (SIGTERM)", flush=True)
