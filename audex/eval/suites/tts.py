"""TTS suite: intelligibility WER and speaker similarity of generated speech (Table 6, Seed-TTS-Eval).

Each text is synthesised with the TTS preset (A.6 template; top-k 80, T 0.1, lambda 1.5), written to
``audio/<id>.wav``, transcribed by the judge ASR (``asr_model``: ``self`` = the model under test by default,
another Audex checkpoint, or ``hf:<folder>`` for a local Hugging Face ASR such as Whisper-large-v3, the judge
Seed-TTS-Eval uses for English) and scored with the English WER normalisation. Speaker similarity (SIM, cosine
x100) needs a local x-vector model (``speaker_model``) and a reference voice: the sample's own audio (the prompt
speaker) or one ``speaker_reference_audio`` for fixed-voice TTS; otherwise it is reported as not computed.

``mode: prompting`` (Table 6's "prompting" column, Seed-TTS-Eval's setting): every sample's audio is a voice
prompt and its ``voice_text`` field the prompt's transcript; the speech is generated from them
(:mod:`audex.voice_prompt`) and SIM compares it with that prompt. ``mode: fixed_voice`` (default) generates
from the text alone. ``compare_fixed_voice: true`` (prompting mode) also speaks every text in the fixed voice and
reports ``speaker_similarity_fixed_voice`` (its SIM to the same prompts) and ``prompting_sim_gain`` (prompted minus
fixed): the check of the release stage (:mod:`audex.data.voice_release`), after which the gain is near 0.

Reference fields: ``text`` (what to say), ``language`` (optional), audio (optional: the reference voice;
required with ``voice_text`` in prompting mode).
"""

from __future__ import annotations

from audex.audio import load_audio
from audex.eval.embeddings import SpeakerEmbedder
from audex.eval.metrics import NotComputed, corpus_wer, cosine_similarity, word_errors
from audex.eval.normalize import normalize_for_wer
from audex.eval.report import Comparison, SuiteSummary
from audex.eval.samples import EMPTY_HYPOTHESIS, EMPTY_REFERENCE, MISSING_AUDIO, EvalSample, SampleError
from audex.eval.suites.asr import counts_of
from audex.eval.suites.base import Suite, safe_name
from audex.inference.waveform import write_wav

NO_SPEAKER_REFERENCE = "speaker_reference_unavailable"


class TtsSuite(Suite):
    """Generated speech, judged by an ASR and a speaker-embedding model.

    Example::

        suite = TtsSuite({"benchmark": "seed_tts_eval/en", "speaker_model": "/models/wavlm-base-plus-sv"},
                         engine=EvalEngine(model))
        suite.run(samples, "outputs/eval/tts").metrics     # {"wer": ..., "speaker_similarity": ...}
    """

    name = "tts"
    needs_audio = False

    def __init__(self, cfg=None, engine=None, hypotheses=None, references=None, transcriber=None):
        super().__init__(cfg, engine, hypotheses, references, transcriber)
        self._speaker = None
        self._reference_voice = None

    @property
    def speaker(self) -> SpeakerEmbedder | None:
        if self._speaker is None and self.cfg.get("speaker_model"):
            self._speaker = SpeakerEmbedder(self.cfg["speaker_model"])
        return self._speaker

    @property
    def prompting(self) -> bool:
        mode = self.cfg.get("mode", "fixed_voice")
        if mode not in ("fixed_voice", "prompting"):
            raise ValueError(f"tts suite mode must be fixed_voice or prompting, got {mode!r}")
        return mode == "prompting"

    def check(self, sample: EvalSample) -> dict:
        ref = {"text": sample.text_field("text"), "language": str(sample.fields.get("language") or "en")}
        if self.prompting:
            ref["voice_text"] = sample.text_field("voice_text")
            if not sample.has_audio:
                raise SampleError(MISSING_AUDIO, "prompting mode needs the sample's audio (the voice prompt)")
        return ref

    def prepare(self, sample: EvalSample, reference: dict):
        voice, problem = None, None
        if self.prompting:  # the prompt is the generation's input and SIM's reference
            return reference["text"], sample.load_audio(), None
        if self.speaker is not None:
            try:
                if sample.has_audio:
                    voice = sample.load_audio()
                elif self.cfg.get("speaker_reference_audio"):
                    if self._reference_voice is None:
                        self._reference_voice = load_audio(self.cfg["speaker_reference_audio"])
                    voice = self._reference_voice
                else:
                    problem = "no reference voice (sample audio or speaker_reference_audio)"
            except (SampleError, ValueError, OSError) as e:
                problem = str(e)
        return reference["text"], voice, problem

    def generate(self, inputs, references):
        fixed_sims: list[float | None] = [None] * len(inputs)
        if self.prompting:
            wavs = self.engine.tts([text for text, _, _ in inputs], voices=[voice for _, voice, _ in inputs],
                                   voice_texts=[r["voice_text"] for r in references])
            if self.cfg.get("compare_fixed_voice") and self.speaker is not None:
                fixed = self.speaker.embed_batch(self.engine.tts([text for text, _, _ in inputs]))
                prompts = self.speaker.embed_batch([voice for _, voice, _ in inputs])
                fixed_sims = [100.0 * cosine_similarity(f, p) for f, p in zip(fixed, prompts)]
        else:
            wavs = self.engine.tts([text for text, _, _ in inputs])
        transcripts = self.transcriber(wavs, [r["language"] for r in references])
        sims: list[float | None] = [None] * len(inputs)
        with_voice = [i for i, (_, voice, _) in enumerate(inputs) if voice is not None]
        if self.speaker is not None and with_voice:
            generated = self.speaker.embed_batch([wavs[i] for i in with_voice])
            voices = self.speaker.embed_batch([inputs[i][1] for i in with_voice])
            for k, i in enumerate(with_voice):
                sims[i] = 100.0 * cosine_similarity(generated[k], voices[k])
        return [{"wav": w, "transcript": t, "sim": s, "sim_fixed_voice": f, "voice_problem": inp[2]}
                for w, t, s, f, inp in zip(wavs, transcripts, sims, fixed_sims, inputs)]

    def score(self, sample: EvalSample, reference: dict, output) -> dict:
        path = write_wav(self.out_dir / "audio" / f"{safe_name(sample.id)}.wav", output["wav"])
        ref_norm = normalize_for_wer(reference["text"], reference["language"])
        hyp_norm = normalize_for_wer(output["transcript"], reference["language"])
        if not ref_norm:
            raise SampleError(EMPTY_REFERENCE, f"text {reference['text']!r} is empty after normalisation")
        counts = word_errors(ref_norm, hyp_norm)
        flags = [] if hyp_norm else [EMPTY_HYPOTHESIS]
        if self.speaker is not None and output["sim"] is None:
            flags.append(NO_SPEAKER_REFERENCE)
        return {"reference": reference, "audio": str(path.relative_to(self.out_dir)),
                "seconds": round(output["wav"].numel() / 16000, 3), "transcript": output["transcript"],
                "hypothesis_normalized": hyp_norm, "reference_normalized": ref_norm, "counts": counts.to_json(),
                "wer": round(100 * counts.wer, 3), "speaker_similarity": output["sim"],
                "speaker_similarity_fixed_voice": output["sim_fixed_voice"],
                "speaker_reference_problem": output["voice_problem"], "flags": flags}

    def summarize(self, records: list[dict], summary: SuiteSummary) -> None:
        scored = self.scored(records)
        summary.metrics["wer"] = 100 * corpus_wer(counts_of(r) for r in scored)
        sims = [r["speaker_similarity"] for r in scored if r.get("speaker_similarity") is not None]
        if sims:
            summary.metrics["speaker_similarity"] = sum(sims) / len(sims)
            fixed = [r["speaker_similarity_fixed_voice"] for r in scored if r.get("speaker_similarity_fixed_voice") is not None]
            if fixed:
                summary.metrics["speaker_similarity_fixed_voice"] = sum(fixed) / len(fixed)
                summary.metrics["prompting_sim_gain"] = summary.metrics["speaker_similarity"] - sum(fixed) / len(fixed)
        else:
            reason = ("no speaker_model configured (a local x-vector model folder)" if not self.cfg.get("speaker_model")
                      else "no sample had a usable reference voice")
            summary.metrics["speaker_similarity"] = NotComputed(reason)
        summary.breakdowns["generated audio"] = {"seconds": {
            "total": sum(r["seconds"] for r in scored), "mean": sum(r["seconds"] for r in scored) / len(scored)}}
        judge = self.cfg.get("asr_model") or "self"
        summary.notes.append(f"intelligibility judged by the ASR {judge!r}; Seed-TTS-Eval (Table 6) transcribes English "
                             "with Whisper-large-v3, so numbers are comparable only with that judge")
        benchmark = self.cfg.get("benchmark")
        if benchmark:
            mode = self.cfg.get("mode", "fixed_voice")
            summary.comparisons.append(Comparison(benchmark, f"wer_{mode}", summary.metrics["wer"],
                                                  comparable=judge.startswith("hf:"), our_metric=f"WER judged by {judge}"))
            if sims:
                summary.comparisons.append(Comparison(benchmark, "speaker_similarity", summary.metrics["speaker_similarity"]))
