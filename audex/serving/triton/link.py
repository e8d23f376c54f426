"""What the Triton python model needs inside the stub (standard library + NumPy only): its ``config.pbtxt``
parameters, the error response, and the link to its worker process.

The python-backend stub of the ``nvidia-pytriton`` wheel runs with NumPy 1.x (see
:mod:`audex.serving.triton.launcher`); the project's stack needs NumPy 2. A model that must run that stack inside
such a stub therefore runs its handler in a worker (:mod:`audex.serving.triton.worker`) started with the project's
interpreter, and talks to it over ``multiprocessing.connection`` on a Unix socket with a random auth key (handed
over on the worker's stdin). Both sides exchange plain Python values only: arrays travel as :func:`to_wire` tuples,
so neither side unpickles the other NumPy's objects.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from multiprocessing.connection import Listener

import numpy as np


def config_parameters(model_config: dict) -> dict[str, str]:
    """``parameters`` of a model config (the JSON Triton hands ``initialize``) as plain strings."""
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def error_response(pb_utils, message: str, invalid: bool = True):
    """An error response; ``invalid`` = the client sent something the server refuses (INVALID_ARG, HTTP 400)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid else None
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def to_wire(array) -> tuple:
    """An array as ``(kind, payload, dtype, shape)``: raw bytes for numbers, a list of ``bytes`` for strings."""
    a = np.asarray(array)
    if a.dtype == np.object_ or a.dtype.kind in ("S", "U"):
        items = [x if isinstance(x, bytes) else str(x).encode("utf-8") for x in a.reshape(-1).tolist()]
        return ("bytes", items, "|O", tuple(a.shape))
    a = np.ascontiguousarray(a)
    return ("raw", a.tobytes(), a.dtype.str, tuple(a.shape))


def from_wire(wire) -> np.ndarray:
    kind, payload, dtype, shape = wire
    if kind == "bytes":
        out = np.empty(len(payload), dtype=np.object_)
        out[:] = payload
        return out.reshape(shape)
    return np.frombuffer(payload, dtype=np.dtype(dtype)).reshape(shape).copy()


class WorkerProcess:
    """A worker started as ``python -m MODULE ARGS... --address SOCKET`` that connects back with the auth key.

    Args:
        module: the worker's module (run with ``-m``).
        args: its other command-line arguments.
        python: the project's interpreter.
        startup_timeout: seconds to wait for the worker to connect (model loading happens after it connected).
    """

    def __init__(self, module: str, args: list[str], python: str, startup_timeout: float = 600.0):
        self._dir = tempfile.mkdtemp(prefix="audex_worker_")
        address = os.path.join(self._dir, "worker.sock")
        authkey = secrets.token_bytes(32)
        self.listener = Listener(address, family="AF_UNIX", authkey=authkey)
        env = dict(os.environ)
        # the worker runs the project's own interpreter and NumPy, not the stub's overlay
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "triton-stub-env" not in p)
        self.python = python
        self.proc = subprocess.Popen([python, "-m", module, *args, "--address", address], stdin=subprocess.PIPE, env=env)
        self.proc.stdin.write((authkey.hex() + "\n").encode())
        self.proc.stdin.close()
        accepted: dict = {}
        waiter = threading.Thread(target=lambda: accepted.update(conn=self.listener.accept()), daemon=True)
        waiter.start()
        deadline = time.monotonic() + startup_timeout
        while waiter.is_alive() and time.monotonic() < deadline:
            waiter.join(0.5)
            if self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"the Audex worker ({module}) exited with code {self.proc.returncode} before it "
                                   f"connected; is {python!r} the project's interpreter? (see the server log)")
        if "conn" not in accepted:
            self.proc.kill()
            self.close()
            raise RuntimeError(f"the Audex worker ({module}) did not connect within {startup_timeout:g} s")
        self.conn = accepted["conn"]

    def hello(self, timeout: float) -> dict:
        """The worker's first message (``{"ready": ...}``), waited for at most ``timeout`` seconds while the worker
        lives: a worker that stays silent (stuck loading its handler) is an error, never a hang of the model's load;
        it first writes every thread's Python stack to the server log (``faulthandler`` on SIGUSR1)."""
        deadline = time.monotonic() + timeout
        while not self.conn.poll(1.0):
            if time.monotonic() > deadline:
                self.proc.send_signal(signal.SIGUSR1)
                time.sleep(2.0)
                self.proc.kill()
                self.close()
                raise RuntimeError(f"the Audex worker (pid {self.proc.pid}) did not load its handler within {timeout:g} s; "
                                   "its thread stacks are in the server log")
        return self.conn.recv()                  # a worker that exited: EOFError, the model's load error

    def stop(self, message=None, timeout: float = 30.0) -> None:
        """Send ``message`` (the worker's stop request), wait for the exit, kill it if it does not."""
        try:
            if message is not None:
                self.conn.send(message)
            self.proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.close()

    def close(self) -> None:
        self.listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def project_python(params: dict) -> str:
    """The project's interpreter: the model's ``python`` parameter, else ``AUDEX_PROJECT_PYTHON``, else python3."""
    return params.get("python") or os.environ.get("AUDEX_PROJECT_PYTHON") or "python3"
