"""The work of the python steps around the LLM in the GPU ensemble: request -> LLM inputs, ids -> text or waveform.

:class:`LlmInputBuilder` (the ``preprocessing`` step) checks the request exactly as the local engine does
(:class:`~audex.serving.requests.RequestValidator`: unknown task, empty / NaN / over-long audio, missing text, prompt
over the context), writes the task's prompt with Audex's own prompt format (Figure 2 / appendix A), runs the ONNX
front end on the audio and applies the prompt-table convention of :mod:`audex.export.frontend_onnx`. For TTS and TTA
it also writes the unconditional twin prompt (the condition replaced by ``<pad>`` tokens, as in training) and the
guidance scale, which the LLM step (:mod:`audex.serving.guided_executor`) decodes as a CFG pair; sampling comes from
the paper's presets. :class:`LlmOutputDecoder` (the ``postprocessing`` step) turns generated ids into text, or
codec codes into a 16 kHz waveform with the codec decoders of the export folder (one chunk at a time when
streaming).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from audex.export.frontend_onnx import prompt_tuning_inputs
from audex.inference.waveform import audio_tokens_to_codes, speech_tokens_to_codes
from audex.modules.audio_encoder import encoder_frames
from audex.modules.codecs import AudioCodec, SpeechCodec
from audex.prompts import get_prompt_formatter
from audex.serving.requests import BadRequest, RequestValidator, ServeLimits, ServeRequest, serving_presets
from audex.tasks import SERVED_TASKS, TASKS
from audex.tokenizer import AudexTokenizer

#: what each served task generates: text, speech (X-Codec2 codes) or audio (X-Codec codes)
OUTPUT_OF = {name: TASKS[name].output for name in SERVED_TASKS}


class LlmInputBuilder:
    """Request -> the LLM step's inputs (``input_ids`` with fake ids for audio frames, the prompt table, the
    unconditional twin, the sampling preset).

    Args:
        export_dir: the export folder (``hf/`` tokenizer and ``audex_export.json``, ``frontend.onnx``).
        frames_per_window / window_seconds: the encoder's framing (750 frames per 30 s).
        presets_path: task presets (default: the package's ``infer/presets.yaml``).
        limits: :class:`~audex.serving.requests.ServeLimits` (default ones when None).
        max_context_tokens: prompt + generation budget (the engine's ``max_seq_len``).
        table_dtype: dtype of the prompt table handed to the LLM step (``float32``, or ``float16`` for TensorRT-LLM's
            C++ backend over a float16 engine).
    """

    def __init__(self, export_dir: str | Path, frames_per_window: int, window_seconds: float, presets_path=None,
                 limits=None, max_context_tokens: int | None = None, table_dtype: str = "float32"):
        export_dir = Path(export_dir)
        self.tokenizer = AudexTokenizer.load(export_dir / "hf")
        self.meta = json.loads((export_dir / "hf" / "audex_export.json").read_text())
        self.formatter = get_prompt_formatter("audex", self.tokenizer)
        self.limits = limits or ServeLimits()
        self.presets = serving_presets(self.tokenizer.vocab, self.limits, presets_path)
        self.table_dtype = np.dtype(table_dtype)           # float32 for Audex's LLM model (see triton_repo)
        self.frames_per_window = int(frames_per_window)
        self.window_samples = int(round(window_seconds * 16000))
        hf_config = json.loads((export_dir / "hf" / "config.json").read_text())
        context = int(self.limits.max_context_tokens or max_context_tokens or hf_config["max_position_embeddings"])
        self.validator = RequestValidator(self.tokenizer, self.prompt_ids, self.presets, self.limits, context,
                                          self.frames_for_samples, self.formatter.audio_content)
        self.session = None
        onnx = export_dir / "frontend.onnx"
        if onnx.exists():
            import onnxruntime  # optional heavy dependency: only an export with an audio encoder needs it

            self.session = onnxruntime.InferenceSession(str(onnx), providers=onnxruntime.get_available_providers())

    def frames_for_samples(self, num_samples: int) -> int:
        return encoder_frames(num_samples, self.window_samples, self.frames_per_window)

    def prompt_ids(self, content: str, thinking: bool) -> list[int]:
        return self.formatter.encode_dialog([{"role": "user", "content": content}], thinking=thinking)["input_ids"].tolist()

    def build(self, task: str, text: str | None = None, audio: np.ndarray | None = None, sample_rate: int = 16000,
              max_new_tokens: int | None = None, seed: int | None = None,
              guidance_scale: float | None = None) -> dict[str, np.ndarray]:
        """The LLM step's inputs for one request (each with the batch dimension 1); :class:`BadRequest` if refused."""
        wav_in = None if audio is None else torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32).reshape(-1))
        return self.build_request(ServeRequest(task=task, text=text, audio=wav_in, sample_rate=sample_rate,
                                               max_new_tokens=max_new_tokens, seed=seed, guidance_scale=guidance_scale))

    def build_request(self, request: ServeRequest) -> dict[str, np.ndarray]:
        """:meth:`build` of a :class:`ServeRequest`."""
        task, seed, guidance_scale = request.task, request.seed, request.guidance_scale
        text, wav, budget = self.validator.validate(request)
        embeds = []
        if wav is not None:
            if self.session is None:
                raise BadRequest("this export has no frontend.onnx (the model has no audio encoder): it cannot take audio")
            embeds = [torch.from_numpy(self.session.run(None, {"audio": wav.numpy().astype(np.float32)})[0])]
        n_frames = sum(int(e.shape[0]) for e in embeds)
        prompt, uncond = self.validator.prompts(task, text, n_frames)
        ids, table = prompt_tuning_inputs(prompt, self.tokenizer.so_embedding, int(self.meta["vocab_size"]), embeds)
        if not embeds:
            table = torch.zeros(1, int(self.meta["hidden_size"]))
        params = self.presets[task].sampling
        lam = float(params.guidance_scale if guidance_scale is None else guidance_scale) if uncond is not None else 1.0
        uncond = uncond if lam != 1.0 else []
        return {
            "input_ids": np.array([ids], np.int32),
            "input_lengths": np.array([[len(ids)]], np.int32),
            "request_output_len": np.array([[budget]], np.int32),
            "prompt_embedding_table": table.numpy().astype(self.table_dtype)[None],
            "prompt_vocab_size": np.array([[table.shape[0]]], np.int32),
            "end_id": np.array([[self.meta["end_id"]]], np.int32),
            "pad_id": np.array([[self.meta["pad_id"]]], np.int32),
            "runtime_top_k": np.array([[(params.top_k or 0) if params.do_sample else 1]], np.int32),
            "runtime_top_p": np.array([[(params.top_p or 0.0) if params.do_sample else 0.0]], np.float32),
            "temperature": np.array([[params.temperature]], np.float32),
            "random_seed": np.array([[0 if seed is None else seed]], np.uint64),
            "uncond_input_ids": np.array([uncond], np.int32).reshape(1, -1),
            "uncond_input_lengths": np.array([[len(uncond)]], np.int32),
            "guidance_scale": np.array([[lam]], np.float32),
            "output_kind": np.array([[OUTPUT_OF[task].encode()]], dtype=np.object_),
        }


class LlmOutputDecoder:
    """Generated ids -> text, or codec codes -> 16 kHz waveform (codec decoders from the export folder)."""

    def __init__(self, export_dir: str | Path):
        self.export_dir = Path(export_dir)
        self.tokenizer = AudexTokenizer.load(self.export_dir / "hf")
        self.vocab = self.tokenizer.vocab
        self._codecs: dict = {}

    def _codec(self, name: str):
        if name not in self._codecs:
            folder = self.export_dir / name
            if not folder.is_dir():
                raise ValueError(f"the export folder has no {name}/: this model cannot decode that output")
            self._codecs[name] = (SpeechCodec(pretrained_path=str(folder)) if name == "speech_codec"
                                  else AudioCodec(pretrained_path=str(folder), n_q=self.vocab.audio_rvq_used))
        return self._codecs[name]

    def kind_of(self, ids) -> str:
        """The output kind read off generated ids (when the LLM step does not say it): codec ids mean audio."""
        v = self.vocab
        ids = [int(t) for t in ids]
        if v.speechgen_end in ids or any(t in v.speech_range for t in ids):
            return "speech"
        if v.audiogen_end in ids or any(t in v.audio_range for t in ids):
            return "audio"
        return "text"

    def decode(self, kind: str, ids, partial: bool = False) -> tuple[str, np.ndarray]:
        """``(text, audio)`` of one answer; ``kind`` is text / speech / audio (or a task name); ``partial`` = one
        streamed chunk (a chunk without codes gives no audio)."""
        ids = [int(t) for t in ids if int(t) != self.tokenizer.im_end]
        kind = OUTPUT_OF.get(kind, kind)
        if kind not in ("text", "speech", "audio"):
            raise ValueError(f"unknown output kind {kind!r}: use text, speech or audio (or a task of {sorted(OUTPUT_OF)})")
        if kind == "text":
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if "</think>" in text and not partial:
                text = text.split("</think>", 1)[1]
            return (text if partial else text.strip()), np.zeros(0, np.float32)
        v = self.vocab
        codec_ids = v.speech_range if kind == "speech" else v.audio_range
        if partial and not any(t in codec_ids for t in ids):
            return "", np.zeros(0, np.float32)
        if kind == "speech":
            wav = self._codec("speech_codec").decode(speech_tokens_to_codes(v, ids))
        else:
            whole = ids if v.audiogen_end in ids else ids[: len(ids) - len(ids) % v.audio_rvq_used]
            wav = self._codec("audio_codec").decode(audio_tokens_to_codes(v, whole))
        return "", wav.numpy().astype(np.float32)
