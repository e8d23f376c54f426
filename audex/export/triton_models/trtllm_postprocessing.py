"""Triton python model ``postprocessing`` of the GPU ensemble: output_ids -> text or 16 kHz audio (see trtllm_steps)."""

from __future__ import annotations

import json

import numpy as np

from audex.export.triton_models.trtllm_steps import EngineOutputDecoder


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.decoder = EngineOutputDecoder(params["export_dir"])

    def execute(self, requests):
        pb, responses = self.pb, []
        for request in requests:
            try:
                task = pb.get_input_tensor_by_name(request, "task").as_numpy().reshape(-1)[0].decode("utf-8")
                ids = pb.get_input_tensor_by_name(request, "output_ids").as_numpy()[0, 0]
                length = int(pb.get_input_tensor_by_name(request, "sequence_length").as_numpy().reshape(-1)[0])
                text, audio = self.decoder.decode(task, ids[:length])
                responses.append(pb.InferenceResponse([
                    pb.Tensor("text", np.array([[text.encode("utf-8")]], dtype=np.object_)),
                    pb.Tensor("audio", audio.reshape(1, -1))]))
            except (ValueError, KeyError) as e:
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(e))))
        return responses
