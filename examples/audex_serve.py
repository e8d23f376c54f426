"""Serve an Audex model with the Triton server of the nvidia-pytriton wheel (CPU, PyTorch engine).

    python scripts/serve_triton.py model_path=tiny.nemo            # writes triton_repo/, serves until Ctrl-C
    python scripts/serve_triton.py repo=triton_repo serve.http_port=8100
    python scripts/serve_triton.py repo=gpu_repo      # any written repository, e.g. the GPU ensemble of
                                                      # scripts/make_triton_repo.py layout=gpu executor=torch

Then: ``python examples/triton_client.py --url 127.0.0.1:8000 chat "Hello"``. Stops cleanly on SIGTERM/Ctrl-C.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from omegaconf import OmegaConf

from audex.export.serve import TritonServer
from audex.export.serving import ServeLimits
from audex.export.triton_repo import write_cpu_repository

CONF = Path(__file__).resolve().parents[1] / "conf" / "export.yaml"


def main(argv=None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    cfg = OmegaConf.merge(OmegaConf.load(CONF), {"repo": "triton_repo"}, OmegaConf.from_dotlist(args))
    OmegaConf.set_struct(cfg, False)
    repo = Path(cfg.repo)
    if not any(repo.glob("*/config.pbtxt")):
        if OmegaConf.is_missing(cfg, "model_path"):
            raise SystemExit(f"{repo} holds no Audex repository: pass model_path=... to write one, or repo=...")
        s = cfg.serve
        write_cpu_repository(repo, cfg.model_path, limits=ServeLimits.from_config(s), max_batch_size=s.max_batch_size,
                             max_queue_delay_us=s.max_queue_delay_us, instances=s.instances, num_threads=s.num_threads)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = TritonServer(repo, host=cfg.serve.host, http_port=cfg.serve.http_port, grpc_port=cfg.serve.grpc_port,
                          metrics_port=cfg.serve.metrics_port)
    with server:
        print(f"Triton ready: HTTP {server.http_url}, gRPC {server.grpc_url} (log: {server.log_path})", flush=True)
        stop.wait()
        print("stopping Triton (SIGTERM)", flush=True)


if __name__ == "__main__":
    main()
