"""The python steps around the TensorRT-LLM engine in the GPU ensemble: request -> engine inputs, tokens -> result.

:class:`EngineInputBuilder` (the ``preprocessing`` model) writes the task's prompt with Audex's own prompt format
(Figure 2 / appendix A), runs the ONNX front end on the audio and applies the prompt-table convention of
:mod:`audex.export.frontend_onnx`; the sampling inputs come from the paper's presets. :class:`EngineOutputDecoder`
(the ``postprocessing`` model) turns generated ids into text, or codec codes into a 16 kHz waveform with the codec
decoders of the export folder. CFG pairs (TTS/TTA with lambda != 1) need the pairing post-processor of
:mod:`audex.export.cfg_pairing` in the engine's executor; this ensemble sends conditional requests only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

OUTPUT_OF = {"asr": "text", "ast": "text", "audio_qa": "text", "chat": "text", "tts": "speech", "tta": "audio"}


class EngineInputBuilder:
    """Request -> the TensorRT-LLM backend's inputs (``input_ids`` with fake ids for audio frames, the prompt table)."""

    def __init__(self, export_dir: str | Path, frames_per_window: int, window_seconds: float, presets_path=None):
        from audex.data.prompts import get_prompt_formatter
        from audex.inference.presets import load_presets
        from audex.tokenizer import AudexTokenizer

        export_dir = Path(export_dir)
        self.tokenizer = AudexTokenizer.load(export_dir / "hf")
        self.meta = json.loads((export_dir / "hf" / "audex_export.json").read_text())
        self.formatter = get_prompt_formatter("audex", self.tokenizer)
        self.presets = load_presets(presets_path)
        self.frames_per_window = int(frames_per_window)
        self.window_samples = int(round(window_seconds * 16000))
        self.session = None
        onnx = export_dir / "frontend.onnx"
        if onnx.exists():
            import onnxruntime

            self.session = onnxruntime.InferenceSession(str(onnx), providers=onnxruntime.get_available_providers())

    def prompt(self, task: str, text: str | None, n_frames: int) -> list[int]:
        from audex.data.prompts import AST_PROMPT, asr_question, tta_user_content, tts_user_content

        tok, vocab_meta = self.tokenizer, self.meta
        preset = self.presets[task]
        if task in ("asr", "ast", "audio_qa"):
            question = {"asr": asr_question(), "ast": AST_PROMPT}.get(task, text)
            ids = self.formatter.encode_dialog([{"role": "user", "content": self.formatter.audio_content(question)}],
                                               thinking=preset.thinking)["input_ids"].tolist()
            at = ids.index(tok.sound)
            return ids[:at] + [tok.so_start] + [tok.so_embedding] * n_frames + [tok.so_end] + ids[at + 1:]
        if task == "chat":
            content = text
        else:
            content = tts_user_content(text) if task == "tts" else tta_user_content(text)
        ids = self.formatter.encode_dialog([{"role": "user", "content": content}], thinking=preset.thinking)["input_ids"].tolist()
        if task in ("tts", "tta"):
            ids.append(vocab_meta["speechgen_start"] if task == "tts" else vocab_meta["audiogen_start"])
        return ids

    def build(self, task: str, text: str | None = None, audio: np.ndarray | None = None,
              max_new_tokens: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        from audex.export.frontend_onnx import prompt_tuning_inputs

        if task not in OUTPUT_OF:
            raise ValueError(f"unknown task {task!r}; the ensemble runs {sorted(OUTPUT_OF)}")
        embeds = []
        if task in ("asr", "ast", "audio_qa"):
            if audio is None or audio.size == 0 or not np.isfinite(audio).all():
                raise ValueError(f"task {task!r} needs a finite, non-empty 'audio' input")
            if self.session is None:
                raise ValueError("this export has no frontend.onnx: it cannot take audio")
            embeds = [torch.from_numpy(self.session.run(None, {"audio": audio.astype(np.float32).reshape(-1)})[0])]
        n_frames = sum(int(e.shape[0]) for e in embeds)
        ids, table = prompt_tuning_inputs(self.prompt(task, text, n_frames), self.tokenizer.so_embedding,
                                          int(self.meta["vocab_size"]), embeds)
        if not embeds:
            table = torch.zeros(1, int(self.meta["hidden_size"]))
        params = self.presets[task].sampling
        return {
            "input_ids": np.array([ids], np.int32),
            "input_lengths": np.array([[len(ids)]], np.int32),
            "request_output_len": np.array([[max_new_tokens or params.max_new_tokens]], np.int32),
            "prompt_embedding_table": table.numpy().astype(np.float16)[None],
            "prompt_vocab_size": np.array([[table.shape[0]]], np.int32),
            "end_id": np.array([[self.meta["end_id"]]], np.int32),
            "pad_id": np.array([[self.meta["pad_id"]]], np.int32),
            "runtime_top_k": np.array([[(params.top_k or 0) if params.do_sample else 1]], np.int32),
            "runtime_top_p": np.array([[(params.top_p or 0.0) if params.do_sample else 0.0]], np.float32),
            "temperature": np.array([[params.temperature]], np.float32),
            "random_seed": np.array([[seed]], np.uint64),
        }


class EngineOutputDecoder:
    """Generated ids -> text, or codec codes -> 16 kHz waveform (codec decoders from the export folder)."""

    def __init__(self, export_dir: str | Path):
        from audex.tokenizer import AudexTokenizer

        self.export_dir = Path(export_dir)
        self.tokenizer = AudexTokenizer.load(self.export_dir / "hf")
        self.vocab = self.tokenizer.vocab
        self._codecs: dict = {}

    def _codec(self, name: str):
        if name not in self._codecs:
            from audex.modules.codecs import AudioCodec, SpeechCodec

            folder = self.export_dir / name
            self._codecs[name] = (SpeechCodec(pretrained_path=str(folder)) if name == "speech_codec"
                                  else AudioCodec(pretrained_path=str(folder), n_q=self.vocab.audio_rvq_used))
        return self._codecs[name]

    def decode(self, task: str, ids) -> tuple[str, np.ndarray]:
        from audex.inference.waveform import audio_tokens_to_codes, speech_tokens_to_codes

        ids = [int(t) for t in ids if int(t) != self.tokenizer.im_end]
        kind = OUTPUT_OF.get(task)
        if kind == "text":
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if "</think>" in text:
                text = text.split("</think>", 1)[1]
            return text.strip(), np.zeros(0, np.float32)
        if kind == "speech":
            wav = self._codec("speech_codec").decode(speech_tokens_to_codes(self.vocab, ids))
        elif kind == "audio":
            codes = audio_tokens_to_codes(self.vocab, ids[: len(ids) - len(ids) % self.vocab.audio_rvq_used]
                                          if self.vocab.audiogen_end not in ids else ids)
            wav = self._codec("audio_codec").decode(codes)
        else:
            raise ValueError(f"unknown task {task!r}")
        return "", wav.numpy().astype(np.float32)


def frames_for(num_samples: int, window_samples: int, frames_per_window: int) -> int:
    return math.ceil(num_samples / window_samples) * frames_per_window
