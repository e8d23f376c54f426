"""The suites' view of the generation engine: batched task calls on one model, seeded, plain outputs.

:class:`EvalEngine` wraps :class:`audex.inference.pipelines.AudexPipeline` (prompts of appendix A, presets of
``conf/infer/presets.yaml``, CFG, constrained codec decoding) and returns what the suites score: transcripts,
translations, responses, waveforms. Per-task sampling overrides (``generation: {asr: {max_new_tokens: 64}}``) and
preset overrides (``preset_overrides: ["tta.audio_seconds=1"]``) come from the eval config; every call passes the
run's seed, so sampled presets (audio QA, TTS, TTA) are reproducible.

:func:`load_model` opens a ``.nemo`` archive, a pretrained folder (``AudexModel.save_pretrained``) or, for smoke
tests only, a model YAML (random weights). :func:`build_transcriber` gives the ASR that judges TTS
intelligibility: the model under test ("self"), another Audex checkpoint, or a local Hugging Face ASR folder
(``hf:/models/whisper-large-v3``, the usual Seed-TTS-Eval judge for English).

Example::

    engine = EvalEngine(load_model("audex_2b.nemo"), seed=0)
    engine.asr([wav])                    # ['he hoped there would be stew for dinner']
    engine.tts(["Hello there."])[0]      # Tensor[T] at 16 kHz
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch
from transformers import pipeline as hf_pipeline

from audex.inference.pipelines import AudexPipeline
from audex.inference.presets import load_presets
from audex.models.checkpoint import load_model
from audex.tasks import task

log = logging.getLogger(__name__)


class EvalEngine:
    """Batched task calls for the suites.

    Args:
        model: an AudexModel in eval mode.
        seed: passed to every decoding call.
        generation: per-preset sampling overrides, ``{"asr": {"max_new_tokens": 64}, "tts": {...}}``.
        preset_overrides: dotlist overrides of ``conf/infer/presets.yaml`` (``["tta.audio_seconds=1"]``).
        presets_path: another presets YAML.
    """

    def __init__(self, model, seed: int = 0, generation: Mapping[str, Mapping] | None = None,
                 preset_overrides: Sequence[str] = (), presets_path: str | None = None):
        self.model = model
        self.seed = int(seed)
        self.generation = {k: dict(v or {}) for k, v in dict(generation or {}).items()}
        self.pipeline = AudexPipeline(model, presets=load_presets(presets_path, overrides=list(preset_overrides)))
        self.settings = {"seed": self.seed, "generation": self.generation, "preset_overrides": list(preset_overrides),
                         "presets_path": presets_path}

    def overrides(self, preset: str) -> dict:
        return {"seed": self.seed, **self.generation.get(preset, {})}

    def run(self, name: str, preset: str | None = None, **columns) -> list:
        """Task ``name`` of :mod:`audex.tasks` over columns of equal length (``audio=[...]``, ``question=[...]``),
        with the run's seed and the overrides of ``preset`` (default: the task's own preset)."""
        spec = task(name)
        n = len(next(iter(columns.values())))
        records = [{k: v[i] for k, v in columns.items()} for i in range(n)]
        return spec.run(self.pipeline, records, **self.overrides(preset or spec.preset))

    # ---- understanding -------------------------------------------------------------------------
    def asr(self, audios: Sequence[torch.Tensor], languages: Sequence[str] | None = None) -> list[str]:
        """Transcripts (the answer's ``Transcription:`` field; the whole answer if the model ignored the format)."""
        preset = "asr" if languages is None else "asr_multilingual"
        results = self.run("asr", preset, audio=list(audios), language=list(languages or [None] * len(audios)))
        return [(r.fields or {}).get("transcription") or "" for r in results]

    def ast(self, audios: Sequence[torch.Tensor]) -> list[dict]:
        """``{"language", "transcription", "translation", "raw"}`` per audio."""
        results = self.run("ast", audio=list(audios))
        return [{**(r.fields or {}), "translation": (r.fields or {}).get("translation") or "", "raw": r.text} for r in results]

    def mcq(self, audios, questions: Sequence[str], choices: Sequence[Sequence[str]]) -> list[str]:
        return [r.text for r in self.run("mcq", audio=list(audios), question=list(questions), choices=list(choices))]

    def entailment(self, audios, descriptions: Sequence[str]) -> list[str]:
        return [r.text for r in self.run("entailment", audio=list(audios), description=list(descriptions))]

    def hallucination(self, audios, sound_events: Sequence[str]) -> list[str]:
        return [r.text for r in self.run("hallucination", audio=list(audios), sound_event=list(sound_events))]

    def chat(self, messages: Sequence[str], thinking: bool | None = None, preset: str = "chat") -> list[str]:
        """Final answers of text chats (reasoning dropped in thinking mode)."""
        return [r.text for r in self.pipeline.chat(list(messages), thinking=thinking, preset=preset, **self.overrides(preset))]

    @torch.no_grad()
    def nll(self, conversations: Sequence[Sequence[dict]], thinking: bool = False) -> list[tuple[float, int]]:
        """Teacher-forced negative log-likelihood (nats, summed) and number of the trainable tokens — the
        assistant answer and its ``<|im_end|>``, as training scores them — of each chat, in one padded batch.
        Only the logits at those positions are computed (``logits_to_keep``), so a 205K-row vocabulary fits."""
        formatter = self.pipeline.formatter
        encoded = [formatter.encode_dialog(list(c), thinking=thinking) for c in conversations]
        for i, enc in enumerate(encoded):
            if "mask" not in enc or not bool(enc["mask"].any()):
                raise ValueError(f"conversation {i} has no assistant answer to score: end it with an assistant turn")
        width = max(len(e["input_ids"]) for e in encoded)
        device = next(self.model.parameters()).device
        ids = torch.full((len(encoded), width), self.model.tokenizer.pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        trainable = torch.zeros_like(ids, dtype=torch.bool)
        for row, enc in enumerate(encoded):
            n = len(enc["input_ids"])
            ids[row, :n], attention[row, :n], trainable[row, :n] = enc["input_ids"], 1, enc["mask"]
        # the logit at position t predicts token t + 1
        predicts = torch.zeros_like(trainable)
        predicts[:, :-1] = trainable[:, 1:]
        keep = predicts.any(0).nonzero().reshape(-1)
        logits = self.model(input_ids=ids.to(device), attention_mask=attention.to(device),
                            logits_to_keep=keep.to(device)).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        targets = ids[:, keep + 1].to(device)
        token_nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * predicts[:, keep].to(device)
        counts = predicts.sum(1)
        return [(float(token_nll[row].sum()), int(counts[row])) for row in range(len(encoded))]

    # ---- generation ----------------------------------------------------------------------------
    def tts(self, texts: Sequence[str], voices: Sequence[torch.Tensor] | None = None,
            voice_texts: Sequence[str] | None = None) -> list[torch.Tensor]:
        """Waveforms; with ``voices`` and ``voice_texts`` (one reference clip and its transcript per text) the
        voice-prompted form (:mod:`audex.voice_prompt`)."""
        if voices is None:
            return [r.waveform for r in self.run("tts", text=list(texts))]
        return [r.waveform for r in self.run("tts", text=list(texts), voice=list(voices), voice_text=list(voice_texts))]

    def tta(self, captions: Sequence[str]) -> list[torch.Tensor]:
        return [r.waveform for r in self.run("tta", text=list(captions))]

    def s2s(self, audios: Sequence[torch.Tensor]) -> list[dict]:
        """The A.8 cascade: ``{"transcript", "response", "thinking", "pipeline_answer", "spoken_text", "speech"}``;
        the steps use the overrides of the ``asr``, ``chat`` and ``tts`` presets."""
        presets = self.pipeline.presets.s2s
        steps = (presets.transcribe, presets.reason, presets.speak) if presets is not None else ("asr", "chat", "tts")
        results = self.pipeline.s2s(list(audios), transcribe=self.overrides(steps[0]), reason=self.overrides(steps[1]),
                                    speak=self.overrides(steps[2]))
        return [{"transcript": r.transcript, "response": r.reasoning.text, "thinking": r.reasoning.thinking,
                 "pipeline_answer": r.answer, "spoken_text": r.spoken_text, "speech": r.speech.waveform} for r in results]


class HfAsrTranscriber:
    """A local Hugging Face ASR model (e.g. Whisper) as the judge of TTS intelligibility."""

    def __init__(self, folder: str, device: torch.device | str = "cpu", batch_size: int = 8):
        if not (Path(folder) / "config.json").exists():
            raise FileNotFoundError(f"ASR model folder {folder!r} has no config.json: give a local Hugging Face ASR folder")
        self.asr = hf_pipeline("automatic-speech-recognition", model=folder, device=torch.device(device),
                            model_kwargs={"local_files_only": True})
        self.batch_size = batch_size
        self.name = f"hf:{folder}"

    def __call__(self, wavs: Sequence[torch.Tensor], languages: Sequence[str] | None = None) -> list[str]:
        inputs = [{"raw": w.detach().cpu().numpy(), "sampling_rate": 16000} for w in wavs]
        return [out["text"] for out in self.asr(inputs, batch_size=self.batch_size)]


class AudexTranscriber:
    """An Audex engine's ASR as a transcriber (the model under test, or another checkpoint)."""

    def __init__(self, engine: EvalEngine, name: str):
        self.engine = engine
        self.name = name

    def __call__(self, wavs: Sequence[torch.Tensor], languages: Sequence[str] | None = None) -> list[str]:
        return self.engine.asr(list(wavs))


def build_transcriber(spec: str | None, engine: EvalEngine | None, device: torch.device | str = "cpu"):
    """``"self"`` (default: the model under test), a ``.nemo``/pretrained folder, or ``"hf:<folder>"``."""
    spec = spec or "self"
    if spec == "self":
        if engine is None:
            raise ValueError("asr_model=self needs the model under test")
        return AudexTranscriber(engine, "self (the model under test)")
    if spec.startswith("hf:"):
        return HfAsrTranscriber(spec[3:], device)
    other = EvalEngine(load_model(spec, device), seed=engine.seed if engine else 0,
                       generation=engine.generation if engine else None)
    return AudexTranscriber(other, spec)
