"""The worker process behind the Triton python model: hosts one handler with the project's own interpreter.

:class:`~audex.serving.triton.python_model.AudexPythonModel` starts it when its stub cannot import the project's
stack (see :mod:`audex.serving.triton.link`) as ``python -m audex.serving.triton.worker --handler MODULE:CLASS
--params JSON --address SOCKET`` (auth key on stdin). The one wire protocol, all plain Python values:

* worker -> model at start: ``{"ready": True, "reports_stats": bool}`` or ``{"ready": False, "error": "..."}``;
* model -> worker: ``{"op": "submit", "batch": [{"rid": N, "inputs": {name: wire}}, ...]}`` (one Triton batch),
  ``{"op": "cancel", "rid": N}``, ``{"op": "stop"}`` (or the connection closing);
* worker -> model: ``{"rid": N, "outputs": {name: wire} | None, "error": str | None, "final": bool,
  "invalid": bool}``, one or more per request (several for a streaming model), the last with ``final``; and
  ``{"stats": {name: total}}`` from a handler with ``report_stats`` (exported by the model as Triton metrics).

A handler is a class ``Handler(params: dict[str, str])`` with ``submit(rid, inputs, emit)`` or
``submit_batch([(rid, inputs), ...], emit)``, optional ``cancel(rid)`` and ``close()``; ``emit(rid, outputs,
error=None, final=True, invalid=False)`` may be called from any thread, now or later. A handler that raises on one
request answers that request with the error and goes on. Standard library + NumPy only: the in-process model
imports this module inside the stub.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import logging
import os
import signal
import sys
import threading
from multiprocessing.connection import Client

from audex.serving.triton.link import from_wire, to_wire

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
        log.exception("handler failed on request %d", rid)
        emit(rid, None, f"{type(e).__name__}: {e}", True, False)


def run_one(handler, inputs: dict, timeout: float | None = None) -> dict:
    """One request through ``handler.submit`` in this process, waiting for its final reply: a handler used
    without Triton (benchmarks, tests). Raises ``RuntimeError`` with the handler's error, ``TimeoutError`` when no
    final reply comes within ``timeout`` seconds."""
    done, box = threading.Event(), {}

    def emit(rid, outputs, error=None, final=True, invalid=False):
        box.update(outputs=outputs, error=error)
        if final:
            done.set()
    handler.submit(0, inputs, emit)
    if not done.wait(timeout):
        raise TimeoutError(f"{type(handler).__name__} gave no final reply within {timeout} s")
    if box["error"]:
        raise RuntimeError(box["error"])
    return box["outputs"]


def submit_batch(handler, batch: list, emit) -> None:
    """One Triton batch ``[(rid, inputs), ...]``: to ``handler.submit_batch`` when it has one (the local engine
    decodes a batch together), else request by request; a failure answers the requests it hit and goes on."""
    if not hasattr(handler, "submit_batch"):
        for rid, inputs in batch:
            submit_safely(handler, rid, inputs, emit)
        return
    try:
        handler.submit_batch(batch, emit)
    except Exception as e:  # noqa: BLE001 - never die on one batch (a request already answered ignores this)
        log.exception("handler failed on a batch of %d", len(batch))
        for rid, _ in batch:
            emit(rid, None, f"{type(e).__name__}: {e}", True, False)


def serve(address: str, authkey: bytes, handler_path: str, params: dict) -> None:
    conn = Client(address, authkey=authkey)
    lock = threading.Lock()

    def send(message) -> None:
        with lock:
            conn.send(message)

    try:
        handler = load_handler(handler_path)(params)
    except Exception as e:  # report why loading failed, then exit: the model turns this into a load error
        send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        conn.close()
        return
    reports = hasattr(handler, "report_stats")
    if reports:                                       # metrics live in the stub: running totals go there
        handler.report_stats(lambda stats: send({"stats": dict(stats)}))
    send({"ready": True, "reports_stats": reports})

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
            batch = [(item["rid"], {k: from_wire(v) for k, v in item["inputs"].items()}) for item in message["batch"]]
            submit_batch(handler, batch, emit)
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
    # SIGUSR1 writes every thread's stack to the server log: the model sends it to a worker stuck while loading,
    # TritonServer to every worker of a server that is not ready in time
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(level=logging.INFO, format="[audex worker %(process)d] %(levelname)s %(message)s")
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    serve(args.address, authkey, args.handler, json.loads(args.params))
    # the handler is closed and the model told: end now, as multiprocessing's children do, instead of an interpreter
    # teardown of torch / NeMo that takes seconds on a loaded host and counts against the server's exit timeout
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
