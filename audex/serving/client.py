"""A small ``tritonclient`` wrapper for the Audex Triton model (HTTP or gRPC): one call per task.

Example::

    >>> client = AudexTritonClient("127.0.0.1:8000", protocol="http")
    >>> client.asr(load_audio("speech.wav")).text
    >>> wav = client.tts("Hello there.", seed=0).audio          # numpy float32, 16 kHz
    >>> client.chat("What is the capital of France?").text
    >>> client.tts("Good evening.", voice=ref_wav, voice_text="He hoped there would be stew.")   # voice-prompted
    >>> client.chat("Weather in Paris?", tools=[weather_tool]).tool_calls  # [{"type": "function", ...}]

The same client talks to the GPU ensemble (``model_name="ensemble"``, outputs ``text_output`` / ``audio_output``)
and streams from its decoupled twin over gRPC::

    >>> client = AudexTritonClient("127.0.0.1:8001", protocol="grpc", model_name="ensemble")
    >>> for chunk in client.stream("tts", text="Hello there.", model_name="ensemble_stream"):
    ...     play(chunk.audio)                                   # about one second of 16 kHz audio per chunk

Errors the server returns (bad input) raise ``tritonclient.utils.InferenceServerException`` with the server's
message, e.g. ``unknown task 'x'; this server runs [...]``.
"""

from __future__ import annotations

import json
import queue
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass
class AudexReply:
    text: str
    audio: np.ndarray  # 16 kHz float32 waveform (empty for text tasks)
    finish_reason: str
    tool_calls: list | None = None  # a tool chat's parsed calls (CPU ``audex`` model)
    tool_call_error: str | None = None


class AudexTritonClient:
    """Talks to the ``audex`` model of a repository from :func:`audex.serving.triton.repository.write_cpu_repository`, or to
    the ``ensemble`` of :func:`~audex.serving.triton.repository.write_gpu_repository` (``model_name`` starting with
    ``ensemble``: TensorRT-LLM's ``*_output`` names, a UINT64 seed, no ``finish_reason``)."""

    def __init__(self, url: str, protocol: str = "http", model_name: str = "audex", timeout_s: float = 300.0):
        if protocol == "http":
            import tritonclient.http as module

            self.client = module.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        elif protocol == "grpc":
            import tritonclient.grpc as module

            self.client = module.InferenceServerClient(url)
        else:
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        self.module = module
        self.url = url
        self.protocol = protocol
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.ensemble = model_name.startswith("ensemble")

    def _input(self, name: str, array: np.ndarray, datatype: str):
        tensor = self.module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        return tensor

    def build_inputs(self, task: str, text: str | None = None, audio=None, sample_rate: int | None = None,
                     max_new_tokens: int | None = None, seed: int | None = None,
                     guidance_scale: float | None = None, voice=None, voice_sample_rate: int | None = None,
                     voice_text: str | None = None, tools: list | None = None, stream: bool | None = None) -> list:
        """The request's tensors; ``voice`` + ``voice_text`` (TTS voice prompt) and ``tools`` (a chat's tool
        definitions) are inputs of the CPU ``audex`` model; ``stream`` (TensorRT-LLM's name) one of the decoupled
        ensemble."""
        def text_input(name: str, value: str):
            return self._input(name, np.array([[value.encode("utf-8")]], dtype=np.object_), "BYTES")

        inputs = [text_input("task", task)]
        if stream is not None:
            inputs.append(self._input("stream", np.array([[bool(stream)]], dtype=np.bool_), "BOOL"))
        for name, value in (("text", text), ("voice_text", voice_text),
                            ("tools", None if tools is None else json.dumps(list(tools)))):
            if value is not None:
                inputs.append(text_input(name, value))
        for name, wav in (("audio", audio), ("voice", voice)):
            if wav is not None:
                inputs.append(self._input(name, np.asarray(wav, dtype=np.float32).reshape(1, -1), "FP32"))
        for name, value, dtype, np_dtype in (("sample_rate", sample_rate, "INT32", np.int32),
                                             ("voice_sample_rate", voice_sample_rate, "INT32", np.int32),
                                             ("max_new_tokens", max_new_tokens, "INT32", np.int32),
                                             ("seed", seed, *(("UINT64", np.uint64) if self.ensemble
                                                              else ("INT64", np.int64))),
                                             ("guidance_scale", guidance_scale, "FP32", np.float32)):
            if value is not None:
                inputs.append(self._input(name, np.array([[value]], dtype=np_dtype), dtype))
        return inputs

    def _reply(self, result) -> AudexReply:
        if self.ensemble:
            return AudexReply(text=result.as_numpy("text_output").reshape(-1)[0].decode("utf-8"),
                              audio=result.as_numpy("audio_output").reshape(-1), finish_reason="")
        calls = result.as_numpy("tool_calls")
        calls = json.loads(calls.reshape(-1)[0].decode("utf-8") or "{}") if calls is not None else {}
        return AudexReply(text=result.as_numpy("text").reshape(-1)[0].decode("utf-8"),
                          audio=result.as_numpy("audio").reshape(-1),
                          finish_reason=result.as_numpy("finish_reason").reshape(-1)[0].decode("utf-8"),
                          tool_calls=calls.get("tool_calls"), tool_call_error=calls.get("tool_call_error"))

    def infer_inputs(self, inputs: list) -> AudexReply:
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        return self._reply(self.client.infer(self.model_name, inputs, **kwargs))

    def stream(self, task: str, model_name: str = "ensemble_stream", **kwargs) -> Iterator[AudexReply]:
        """The chunks of a decoupled (streaming) model over gRPC, in order, until its final response (an ensemble
        gets ``stream=true``, TensorRT-LLM's input that turns streaming on)."""
        if self.protocol != "grpc":
            raise ValueError("streaming needs protocol='grpc' (Triton's HTTP endpoint answers once per request)")
        replies: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: replies.put((result, error)))
        try:
            if model_name.startswith("ensemble"):
                kwargs.setdefault("stream", True)
            self.client.async_stream_infer(model_name, self.build_inputs(task, **kwargs),
                                           enable_empty_final_response=True)
            while True:
                try:
                    result, error = replies.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise TimeoutError(f"no streamed response from {model_name!r} within {self.timeout_s:g} s") from None
                if error is not None:
                    raise error
                response = result.get_response()
                if response.outputs:
                    yield self._reply(result)
                if response.parameters["triton_final_response"].bool_param:
                    return
        finally:
            self.client.stop_stream()

    def infer(self, task: str, **kwargs) -> AudexReply:
        return self.infer_inputs(self.build_inputs(task, **kwargs))

    def asr(self, audio, sample_rate: int = 16000, **kw) -> AudexReply:
        return self.infer("asr", audio=audio, sample_rate=sample_rate, **kw)

    def audio_qa(self, audio, question: str, sample_rate: int = 16000, **kw) -> AudexReply:
        return self.infer("audio_qa", audio=audio, text=question, sample_rate=sample_rate, **kw)

    def tts(self, text: str, **kw) -> AudexReply:
        return self.infer("tts", text=text, **kw)

    def tta(self, caption: str, **kw) -> AudexReply:
        return self.infer("tta", text=caption, **kw)

    def chat(self, message: str, **kw) -> AudexReply:
        return self.infer("chat", text=message, **kw)

    def close(self) -> None:
        """Close the connection (an idle HTTP keep-alive connection delays the server's shutdown by its exit timeout)."""
        self.client.close()

    def __enter__(self) -> "AudexTritonClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def is_ready(self) -> bool:
        return bool(self.client.is_server_ready()) and bool(self.client.is_model_ready(self.model_name))

    def wait_until_ready(self, seconds: float) -> None:
        """Poll readiness for up to ``seconds`` (a server that is still loading its models refuses connections)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                if self.is_ready():
                    return
                problem = f"model {self.model_name!r} is not ready"
            except Exception as e:  # noqa: BLE001 - connection refused while the server starts
                problem = f"{type(e).__name__}: {e}"
            if time.monotonic() >= deadline:
                raise ConnectionError(f"no ready Audex server at {self.url} after {seconds:g} s ({problem}): start one "
                                      "with audex-serve, or check url= and protocol=")
            time.sleep(0.5)
