"""Triton python model ``preprocessing`` of the GPU ensemble: request -> TensorRT-LLM inputs (see trtllm_steps)."""

from __future__ import annotations

import json

from audex.export.triton_models.trtllm_steps import EngineInputBuilder


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.builder = EngineInputBuilder(params["export_dir"], int(params["frames_per_window"]),
                                          float(params["window_seconds"]))

    def execute(self, requests):
        pb, responses = self.pb, []
        for request in requests:
            def get(name):
                t = pb.get_input_tensor_by_name(request, name)
                return None if t is None else t.as_numpy()

            try:
                text = get("text")
                tokens = get("max_new_tokens")
                seed = get("seed")
                inputs = self.builder.build(
                    get("task").reshape(-1)[0].decode("utf-8"),
                    text=None if text is None else text.reshape(-1)[0].decode("utf-8"),
                    audio=get("audio"), max_new_tokens=None if tokens is None else int(tokens.reshape(-1)[0]),
                    seed=0 if seed is None else int(seed.reshape(-1)[0]))
                responses.append(pb.InferenceResponse([pb.Tensor(k, v) for k, v in inputs.items()]))
            except (ValueError, KeyError) as e:
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(e))))
        return responses
