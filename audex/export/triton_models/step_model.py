"""A Triton python-backend model that hands each request to an Audex step handler, in process or in a worker.

The three python steps of the GPU ensemble (``preprocessing``, the LLM model ``tensorrt_llm``, ``postprocessing``)
are written once, as handlers (:mod:`audex.export.triton_models.trtllm_handlers`), and run by this class:

* **in process** (the default; TensorRT-LLM's Triton containers): the handler lives in the stub itself;
* **in a worker** (``parameters.step_process: "worker"``, or ``AUDEX_TRITON_STEP_WORKER=1``, which
  :class:`~audex.export.serve.TritonServer` sets when it had to give the stub a NumPy 1.x overlay): the handler runs
  in :mod:`audex.export.step_worker` with the project's interpreter, and this model only moves tensors.

Requests are answered through their response senders (``execute`` returns None), so a handler may answer later and
from another thread: the LLM step answers when the executor has finished, a streaming (decoupled) model sends one
response per chunk and the final flag with the last. Every ``cancellation_check_ms`` the model asks Triton which
requests were cancelled by their clients and tells the handler. A request the handler refuses gets a
``TritonError`` naming the problem (``INVALID_ARG``, HTTP 400, for bad input); the model keeps serving.
"""

from __future__ import annotations

import itertools
import json
import os
import threading

import numpy as np

from audex.export.triton_models.model_params import config_parameters, error_response
from audex.export.triton_models.worker_link import WorkerProcess, from_wire, project_python, to_wire


class StepModel:
    """Base of the step models: subclasses set :attr:`handler` (``"package.module:Class"``)."""

    handler: str = ""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

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
        mode = params.get("step_process", "auto")
        self.worker = None
        if mode == "worker" or (mode == "auto" and os.environ.get("AUDEX_TRITON_STEP_WORKER") == "1"):
            self.worker = WorkerProcess("audex.export.step_worker", ["--handler", self.handler, "--params",
                                                                     json.dumps(params)],
                                        project_python(params), float(params.get("startup_timeout_s", "600")))
            hello = self.worker.conn.recv()
            if not hello.get("ready"):
                self.worker.stop()
                raise RuntimeError(f"{params['model_name']}: the step handler {self.handler} could not start: "
                                   f"{hello.get('error')}")
            self._send_lock = threading.Lock()
            self._reader = threading.Thread(target=self._read_worker, daemon=True)
            self._reader.start()
        else:
            from audex.export.step_worker import load_handler, submit_safely

            self._submit_safely = submit_safely
            self.step = load_handler(self.handler)(params)
            if hasattr(self.step, "attach_metrics"):          # custom metrics need the stub's pb_utils
                self.step.attach_metrics(pb_utils, params["model_name"])
        self._period = float(params.get("cancellation_check_ms", "100")) / 1000.0
        self._canceller = threading.Thread(target=self._check_cancelled, daemon=True)
        self._canceller.start()

    # ---- requests in -------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            rid = next(self._rids)
            with self._lock:
                self._senders[rid] = request.get_response_sender()
            inputs = {t.name(): t.as_numpy() for t in request.inputs()}
            if self.worker is not None:
                with self._send_lock:
                    self.worker.conn.send({"op": "submit", "rid": rid, "inputs": {k: to_wire(v) for k, v in inputs.items()}})
            else:
                self._submit_safely(self.step, rid, inputs, self._deliver)
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
            outputs = message.get("outputs")
            self._deliver(message["rid"], None if outputs is None else {k: from_wire(v) for k, v in outputs.items()},
                          message.get("error"), message.get("final", True), message.get("invalid", False))
        with self._lock:                       # the worker died: nothing pending may hang
            pending = list(self._senders)
        for rid in pending:
            self._deliver(rid, None, "the Audex step worker stopped; see the server log", True, False)

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
