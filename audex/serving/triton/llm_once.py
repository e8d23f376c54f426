"""The non-streaming LLM step of the GPU ensemble: a BLS front of the one, decoupled, LLM model.

Triton marks an ensemble decoupled as soon as one of its steps is (``ValidateEnsembleConfig`` in Triton core's
``ensemble_scheduler/ensemble_utils.cc``), and a decoupled model answers neither HTTP ``infer`` nor gRPC
``ModelInfer``. TensorRT-LLM's own layout serves streaming and non-streaming requests from one decoupled
``tensorrt_llm`` model with a ``streaming`` input; so does Audex, and the plain ``ensemble`` reaches that model
through this handler (model ``tensorrt_llm_once``, not decoupled): it forwards each request's tensors with
``streaming=false`` (``InferenceRequest.exec(decoupled=True)``, the python backend's BLS call to a decoupled model)
and answers with the one response that model then sends. The engine is loaded once, by ``tensorrt_llm``.

It needs the stub's ``triton_python_backend_utils`` (:meth:`LlmOnceHandler.attach_triton`), so it always runs in
the stub (``handler_process: stub``): standard library + NumPy only. Triton 2.51's BLS response iterator cannot
cancel the inner request, so a client that gives up on a non-streaming request does not stop its decoding.
"""

from __future__ import annotations

import threading

import numpy as np


class LlmOnceHandler:
    """Forwards a request to ``parameters.llm_model`` with ``streaming=false`` and answers with its one response.

    Parameters: ``llm_model`` (default ``tensorrt_llm``), ``llm_outputs`` (comma-separated output names to request).
    """

    def __init__(self, params: dict):
        self.llm = params.get("llm_model") or "tensorrt_llm"
        self.outputs = [n for n in (params.get("llm_outputs") or "output_ids,sequence_length").split(",") if n]
        self.pb = None

    def attach_triton(self, pb_utils, model_name: str) -> None:
        self.pb = pb_utils

    def submit(self, rid, inputs: dict, emit) -> None:
        if self.pb is None:
            raise RuntimeError("tensorrt_llm_once makes BLS calls, which only the Triton stub can: run it with "
                               "parameters.handler_process = stub")
        if "streaming" in inputs:
            raise ValueError("tensorrt_llm_once answers once; send streaming requests to the decoupled ensemble_stream")
        # exec() blocks until the LLM model has answered: one thread per request keeps execute() free
        threading.Thread(target=self._forward, args=(rid, inputs, emit), daemon=True).start()

    def _forward(self, rid, inputs: dict, emit) -> None:
        pb = self.pb
        tensors = [pb.Tensor(name, value) for name, value in inputs.items()]
        tensors.append(pb.Tensor("streaming", np.zeros((1, 1), np.bool_)))
        request = pb.InferenceRequest(model_name=self.llm, inputs=tensors, requested_output_names=self.outputs)
        answer = None
        try:
            for response in request.exec(decoupled=True):
                if response.has_error():
                    error = response.error()
                    invalid = getattr(pb.TritonError, "INVALID_ARG", None)
                    code = error.code() if hasattr(error, "code") else None
                    emit(rid, None, error.message(), True, invalid is not None and code == invalid)
                    return
                outputs = {}
                for name in self.outputs:
                    tensor = pb.get_output_tensor_by_name(response, name)
                    if tensor is not None:
                        outputs[name] = tensor.as_numpy()
                if outputs:
                    answer = outputs
        except Exception as e:  # noqa: BLE001 - the BLS call itself failed: this request's error, the model goes on
            emit(rid, None, f"the call to {self.llm!r} failed: {type(e).__name__}: {e}", True, False)
            return
        if answer is None:
            emit(rid, None, f"{self.llm!r} answered without output tensors", True, False)
        else:
            emit(rid, answer)
