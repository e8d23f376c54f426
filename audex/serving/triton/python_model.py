"""The one Triton python-backend model of Audex: it hands every request to a handler, in process or in a worker.

Every python model of both repositories is this class with a different handler (:mod:`audex.serving.triton.handlers`):
the CPU repository's ``audex`` model (the local engine, all tasks) and the GPU ensemble's ``preprocessing``, LLM
(``tensorrt_llm``) and ``postprocessing`` steps. The generated ``1/model.py`` only names the handler. It runs

* **in process** (the default; TensorRT-LLM's Triton containers): the handler lives in the stub itself;
* **in a worker** (``parameters.handler_process: "worker"``, or ``AUDEX_TRITON_HANDLER_WORKER=1``, which
  :class:`~audex.serving.triton.launcher.TritonServer` sets when it gives the stub a NumPy 1.x overlay): the handler
  runs in :mod:`audex.serving.triton.worker` with the project's interpreter, and this model only moves tensors;
* **always in the stub** (``handler_process: "stub"``): a handler that makes BLS calls (``attach_triton``).

A handler with ``report_stats(report)`` gets a callable for its running totals, which this model exports as Triton
metrics (:mod:`audex.serving.triton.pairing_metrics`), from the stub or from the worker's ``{"stats": ...}``
messages alike.

Each batch Triton hands ``execute`` goes to the handler as one batch (the local engine decodes requests of one task
together). Requests are answered through their response senders (``execute`` returns None), so a handler may answer
later and from another thread: the LLM step answers when the executor has finished, a streaming (decoupled) model
sends one response per chunk and the final flag with the last. Every ``cancellation_check_ms`` the model asks Triton
which requests were cancelled by their clients and tells the handler. A request the handler refuses gets a
``TritonError`` naming the problem (``INVALID_ARG``, HTTP 400, for bad input); the model keeps serving.

This module runs inside the stub: standard library + NumPy only.
"""

from __future__ import annotations

import faulthandler
import itertools
import json
import os
import signal
import threading

import numpy as np

from audex.serving.triton.link import (
    WorkerProcess,
    config_parameters,
    error_response,
    from_wire,
    project_python,
    to_wire,
)
from audex.serving.triton.pairing_metrics import PairingMetrics
from audex.serving.triton.worker import load_handler, submit_batch


class AudexPythonModel:
    """Base of every Audex python model: the generated ``model.py`` sets :attr:`handler` (``"package.module:Class"``)."""

    handler: str = ""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        # SIGUSR1 writes this stub's Python stacks to the server log (TritonServer.wait_ready sends it when the server
        # is not ready in time): where a model's load stops, stub side, as the worker's own dump shows its side
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = config_parameters(config)
        params["decoupled"] = "true" if pb_utils.using_decoupled_model_transaction_policy(config) else "false"
        params["model_name"] = args.get("model_name", config.get("name", ""))
        if args.get("model_repository"):
            params["model_dir"] = os.path.join(args["model_repository"], str(args.get("model_version", "1")))
        self._senders: dict[int, object] = {}
        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self._running = True
        mode = params.get("handler_process", "auto")
        self.worker = None
        self.stats_metrics = None
        if mode == "worker" or (mode == "auto" and os.environ.get("AUDEX_TRITON_HANDLER_WORKER") == "1"):
            self.worker = WorkerProcess("audex.serving.triton.worker", ["--handler", self.handler, "--params",
                                                                     json.dumps(params)],
                                        project_python(params), float(params.get("startup_timeout_s", "600")))
            hello = self.worker.hello(float(params.get("startup_timeout_s", "600")))
            if not hello.get("ready"):
                self.worker.stop()
                raise RuntimeError(f"{params['model_name']}: the handler {self.handler} could not start: "
                                   f"{hello.get('error')}")
            if hello.get("reports_stats"):                  # the worker sends {"stats": ...}: exported from here
                self.stats_metrics = PairingMetrics(pb_utils, params["model_name"])
            self._send_lock = threading.Lock()
            self._reader = threading.Thread(target=self._read_worker, daemon=True)
            self._reader.start()
        else:
            self.step = load_handler(self.handler)(params)
            if hasattr(self.step, "attach_triton"):           # a handler that makes BLS calls
                self.step.attach_triton(pb_utils, params["model_name"])
            if hasattr(self.step, "report_stats"):            # custom metrics need the stub's pb_utils
                self.step.report_stats(PairingMetrics(pb_utils, params["model_name"]).update)
        self._period = float(params.get("cancellation_check_ms", "100")) / 1000.0
        self._canceller = threading.Thread(target=self._check_cancelled, daemon=True)
        self._canceller.start()

    # ---- requests in -------------------------------------------------------------------------
    def execute(self, requests):
        batch = []
        for request in requests:
            rid = next(self._rids)
            with self._lock:
                self._senders[rid] = request.get_response_sender()
            batch.append((rid, {t.name(): t.as_numpy() for t in request.inputs()}))
        if self.worker is not None:
            wire = [{"rid": rid, "inputs": {k: to_wire(v) for k, v in inputs.items()}} for rid, inputs in batch]
            with self._send_lock:
                self.worker.conn.send({"op": "submit", "batch": wire})
        else:
            submit_batch(self.step, batch, self._deliver)
        return None

    # ---- responses out -----------------------------------------------------------------------
    def _deliver(self, rid, outputs, error=None, final=True, invalid=False) -> None:
        pb = self.pb
        with self._lock:
            sender = self._senders.pop(rid, None) if final else self._senders.get(rid)
        if sender is None:
            return
        if error is not None:
            response = error_response(pb, error, invalid)
        else:
            response = pb.InferenceResponse([pb.Tensor(name, np.ascontiguousarray(value) if value.dtype != np.object_
                                                       else value) for name, value in outputs.items()])
        try:
            sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)
        except Exception as e:  # noqa: BLE001 - e.g. the client cancelled or went away: the other requests go on
            pb.Logger.log_warn(f"could not deliver the response of request {rid}: {e}")

    def _read_worker(self) -> None:
        while self._running:
            try:
                message = self.worker.conn.recv()
            except (EOFError, OSError):
                break
            if "stats" in message:
                try:
                    if self.stats_metrics is not None:
                        self.stats_metrics.update(message["stats"])
                except Exception as e:  # noqa: BLE001 - metrics must never stop the responses
                    self.pb.Logger.log_warn(f"could not export the handler's stats as metrics: {e}")
                continue
            outputs = message.get("outputs")
            self._deliver(message["rid"], None if outputs is None else {k: from_wire(v) for k, v in outputs.items()},
                          message.get("error"), message.get("final", True), message.get("invalid", False))
        with self._lock:                       # the worker died: nothing pending may hang
            pending = list(self._senders)
        for rid in pending:
            self._deliver(rid, None, "the Audex handler worker stopped; see the server log", True, False)

    def _check_cancelled(self) -> None:
        stop = threading.Event()
        while self._running:
            stop.wait(self._period)
            with self._lock:
                cancelled = [rid for rid, s in self._senders.items() if getattr(s, "is_cancelled", lambda: False)()]
            for rid in cancelled:
                if self.worker is not None:
                    with self._send_lock:
                        self.worker.conn.send({"op": "cancel", "rid": rid})
                elif hasattr(self.step, "cancel"):
                    self.step.cancel(rid)

    def finalize(self):
        self._running = False
        if self.worker is not None:
            with self._send_lock:
                self.worker.stop({"op": "stop"})
        elif hasattr(self.step, "close"):
            self.step.close()
