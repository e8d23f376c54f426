"""The engine process behind the Triton ``audex`` model: loads Audex once and answers batches over a local socket.

Why a separate process: the python-backend stub of the ``nvidia-pytriton`` wheel only works with NumPy 1.x (see
:mod:`audex.export.serve`), while the project's scientific stack (pandas 3, pyarrow, ...) is built for NumPy 2.
So the stub runs a thin proxy (:mod:`audex.export.triton_models.audex_engine`, NumPy 1.26, no torch) and this
worker runs the real engine with the project's own interpreter and NumPy 2 -- the layout PyTriton itself uses.

Messages are pickled dicts of plain Python values (arrays travel as ``(bytes, dtype, shape)``, so neither side
unpickles the other NumPy's objects) over ``multiprocessing.connection`` on a Unix socket with a random auth key:

* worker -> proxy at start: ``{"ready": True}`` or ``{"ready": False, "error": "..."}``
* proxy -> worker: ``{"op": "run", "requests": [request dict, ...]}``; reply ``{"results": [result dict, ...]}``
* proxy -> worker: ``{"op": "stop"}`` (or the connection closing) ends the worker.

Run by the proxy as ``python -m audex.export.engine_worker --address SOCKET --config JSON`` (auth key on stdin).
"""

from __future__ import annotations

import argparse
import json
import sys
from multiprocessing.connection import Client

import torch

from audex.export.triton_models.worker_link import from_wire, to_wire


def request_from_wire(item: dict):
    from audex.export.serving import ServeRequest

    item = dict(item)
    audio = item.pop("audio", None)
    return ServeRequest(audio=None if audio is None else torch.from_numpy(from_wire(audio)), **item)


def result_to_wire(result) -> dict:
    return {"text": result.text, "finish_reason": result.finish_reason, "error": result.error,
            "audio": to_wire(result.audio.detach().float().cpu().numpy())}


def build_engine(config: dict):
    from audex.export.loading import load_audex_model
    from audex.export.serving import AudexServingEngine, ServeLimits

    torch.set_num_threads(int(config.get("num_threads", 1)))  # small matmuls: one thread beats oversubscription
    limits = ServeLimits(**config.get("limits", {}))
    return AudexServingEngine(load_audex_model(config["model_path"]), limits, presets_path=config.get("presets"))


def serve(address: str, authkey: bytes, config: dict) -> None:
    conn = Client(address, authkey=authkey)
    try:
        engine = build_engine(config)
    except Exception as e:  # report why loading failed, then exit: the proxy turns this into a load error
        conn.send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        conn.close()
        return
    conn.send({"ready": True})
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message.get("op") == "stop":
            break
        try:
            requests = [request_from_wire(item) for item in message["requests"]]
            conn.send({"results": [result_to_wire(r) for r in engine.run(requests)]})
        except Exception as e:  # never die on one batch: every request of it gets the error
            conn.send({"results": [{"error": f"{type(e).__name__}: {e}"} for _ in message.get("requests", [])]})
    conn.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--config", required=True, help="JSON: model_path, limits, presets, num_threads")
    args = parser.parse_args(argv)
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    serve(args.address, authkey, json.loads(args.config))


if __name__ == "__main__":
    main()
