"""Triton python-backend model ``audex``: every Audex task on the CPU with the project's PyTorch engine.

The repository file ``audex/1/model.py`` written by :mod:`audex.export.triton_repo` only re-exports
:class:`TritonPythonModel` from here. This class runs inside the python-backend stub, which needs NumPy 1.x, so it
imports nothing heavy: it starts :mod:`audex.export.engine_worker` with the project's interpreter, hands it every
batch Triton gives this instance (requests as plain data), and turns the results into responses. The worker runs
:class:`~audex.export.serving.AudexServingEngine` (validation, batching by task, the paper's presets, CFG for
TTS/TTA). A refused request gets a ``TritonError`` naming the problem; the instance keeps serving.

Inputs (each with Triton's batch dimension, one item per request): ``task`` (BYTES), ``text`` (BYTES, optional),
``audio`` (FP32 ``[-1]``, optional), ``sample_rate`` (INT32), ``max_new_tokens`` (INT32), ``seed`` (INT64),
``guidance_scale`` (FP32), all but ``task`` optional. Outputs: ``text`` (BYTES), ``audio`` (FP32 ``[-1]``, 16 kHz;
empty for text tasks), ``finish_reason`` (BYTES).

Model-config parameters (strings): ``model_path`` (``.nemo``, pretrained folder or model YAML), ``python`` (the
project's interpreter), ``num_threads``, ``presets``, ``startup_timeout_s`` and the
:class:`~audex.export.serving.ServeLimits` fields.
"""

from __future__ import annotations

import json
import os

import numpy as np

from audex.export.triton_models.model_params import (
    config_parameters,
    error_response,
    limit_values,
    model_file,
    one_request,
    one_value,
)
from audex.export.triton_models.worker_link import WorkerProcess, from_wire, project_python, to_wire


class TritonPythonModel:
    """The ``audex`` model of the CPU repository (see the module docstring)."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = config_parameters(config)
        model_path = params.get("model_path")
        if not model_path:
            raise ValueError("the audex model needs parameters.model_path (.nemo, pretrained folder or model YAML)")
        presets = model_file(params.get("presets"), os.path.join(args["model_repository"], args["model_version"]))
        limits = limit_values(params)
        worker_config = {"model_path": model_path, "presets": presets, "limits": limits,
                         "num_threads": int(params.get("num_threads", "1"))}
        self.worker = WorkerProcess("audex.export.engine_worker", ["--config", json.dumps(worker_config)],
                                    project_python(params), float(params.get("startup_timeout_s", "600")))
        self.conn = self.worker.conn
        hello = self.conn.recv()
        if not hello.get("ready"):
            self.worker.stop()
            raise RuntimeError(f"the Audex engine could not load {model_path!r}: {hello.get('error')}")

    # ---- tensors <-> plain requests -----------------------------------------------------------
    def _input(self, request, name):
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _to_wire(self, request) -> dict:
        one_request(self._input(request, "task"), "task")

        def scalar(name, cast):
            return one_value(self._input(request, name), name, cast)

        audio = self._input(request, "audio")
        return {"task": scalar("task", str), "text": scalar("text", str),
                "audio": None if audio is None else to_wire(audio.reshape(-1).astype(np.float32)),
                "sample_rate": scalar("sample_rate", int) or 16000, "max_new_tokens": scalar("max_new_tokens", int),
                "seed": scalar("seed", int), "guidance_scale": scalar("guidance_scale", float)}

    def _error(self, message: str):
        return error_response(self.pb, message)

    def _response(self, result: dict):
        if result.get("error"):
            return self._error(result["error"])
        audio = from_wire(result["audio"]).reshape(1, -1)
        return self.pb.InferenceResponse(output_tensors=[
            self.pb.Tensor("text", np.array([[result["text"].encode("utf-8")]], dtype=np.object_)),
            self.pb.Tensor("audio", np.ascontiguousarray(audio, dtype=np.float32)),
            self.pb.Tensor("finish_reason", np.array([[result["finish_reason"].encode("utf-8")]], dtype=np.object_)),
        ])

    def execute(self, requests):
        wires, errors = [], {}
        for i, request in enumerate(requests):
            try:
                wires.append(self._to_wire(request))
            except (ValueError, UnicodeDecodeError) as e:
                errors[i] = str(e)
        results = []
        if wires:
            self.conn.send({"op": "run", "requests": wires})
            results = self.conn.recv()["results"]
        out, it = [], iter(results)
        for i in range(len(requests)):
            out.append(self._error(errors[i]) if i in errors else self._response(next(it)))
        return out

    def finalize(self):
        self.worker.stop({"op": "stop"})
