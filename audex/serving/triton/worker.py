"""The worker process behind a Triton step model: hosts one step handler with the project's own interpreter.

:mod:`audex.export.triton_models.step_model` starts it when its stub cannot import the project's stack (see
:mod:`audex.export.triton_models.worker_link`) as ``python -m audex.export.step_worker --handler MODULE:CLASS
--params JSON --address SOCKET`` (auth key on stdin). Messages, all plain Python values:

* worker -> model at start: ``{"ready": True}`` or ``{"ready": False, "error": "..."}``;
* model -> worker: ``{"op": "submit", "rid": N, "inputs": {name: wire}}``, ``{"op": "cancel", "rid": N}``,
  ``{"op": "stop"}`` (or the connection closing);
* worker -> model: ``{"rid": N, "outputs": {name: wire} | None, "error": str | None, "final": bool,
  "invalid": bool}``, one or more per request (several for a streaming model), the last with ``final``.

A handler is a class ``Handler(params: dict[str, str])`` with ``submit(rid, inputs, emit)``, optional
``cancel(rid)`` and ``close()``; ``emit(rid, outputs, error=None, final=True, invalid=False)`` may be called from any
thread, now or later. A handler that raises on one request answers that request with the error and goes on.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import threading
from multiprocessing.connection import Client

from audex.export.triton_models.worker_link import from_wire, to_wire

log = logging.getLogger(__name__)


def load_handler(path: str):
    """``"package.module:Class"`` -> the class."""
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"handler {path!r} must be written 'package.module:Class'")
    return getattr(importlib.import_module(module), name)


def submit_safely(handler, rid: int, inputs: dict, emit) -> None:
    """``handler.submit`` with one request's failure turned into that request's error response."""
    try:
        handler.submit(rid, inputs, emit)
    except ValueError as e:                      # the request is at fault: the client gets a 400
        emit(rid, None, str(e), True, True)
    except Exception as e:  # noqa: BLE001 - never die on one request
        log.exception("step handler failed on request %d", rid)
        emit(rid, None, f"{type(e).__name__}: {e}", True, False)


def serve(address: str, authkey: bytes, handler_path: str, params: dict) -> None:
    conn = Client(address, authkey=authkey)
    lock = threading.Lock()

    def send(message) -> None:
        with lock:
            conn.send(message)

    try:
        import torch

        # small per-request work in several processes on few cores: one thread each beats oversubscription
        torch.set_num_threads(int(params.get("num_threads", "1")))
        handler = load_handler(handler_path)(params)
    except Exception as e:  # report why loading failed, then exit: the model turns this into a load error
        send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        conn.close()
        return
    send({"ready": True})

    def emit(rid, outputs, error=None, final=True, invalid=False) -> None:
        wire = None if outputs is None else {k: to_wire(v) for k, v in outputs.items()}
        try:
            send({"rid": rid, "outputs": wire, "error": error, "final": final, "invalid": invalid})
        except OSError:
            pass                                      # the model went away; the loop below ends too

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        op = message.get("op")
        if op == "stop":
            break
        if op == "submit":
            submit_safely(handler, message["rid"], {k: from_wire(v) for k, v in message["inputs"].items()}, emit)
        elif op == "cancel" and hasattr(handler, "cancel"):
            handler.cancel(message["rid"])
    if hasattr(handler, "close"):
        handler.close()
    conn.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handler", required=True, help="package.module:Class")
    parser.add_argument("--params", required=True, help="JSON: the model's parameters")
    parser.add_argument("--address", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[audex step %(process)d] %(levelname)s %(message)s")
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    serve(args.address, authkey, args.handler, json.loads(args.params))


if __name__ == "__main__":
    main()
