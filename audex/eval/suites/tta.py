"""TTA suite: Fréchet distance between generated and reference clips (Table 7, AudioCaps / SongDescriber).

Each caption is rendered with the TTA preset (A.10 template; top-k 80, T 1.0, lambda 3; a fixed 10 s = 2,000
codec tokens) and written to ``audio/<id>.wav``. Generated clips and the references (the sample's audio, cut or
zero-padded to ``clip_seconds``, the paper's 10 s segments) are embedded frame by frame with the configured
embedding model (:mod:`audex.eval.embeddings`); the frame embeddings of each side are pooled over all clips and
the Fréchet distance of the two Gaussians is the score. Embeddings are stored per sample under ``embeddings/``,
so a resumed run computes the same distance.

The paper's number is FD_openl3; with the ``logmel`` fallback embedding the summary says so and does not rank
the result among the paper's.

Reference fields: ``caption``; audio (the reference clip; samples without one still add a generated clip and are
flagged).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from audex.eval.embeddings import AudioEmbedder, build_audio_embedder
from audex.eval.metrics import NotComputed, frechet_distance_between
from audex.eval.report import Comparison, SuiteSummary
from audex.eval.samples import EvalSample, SampleError
from audex.eval.suites.base import Suite, safe_name
from audex.inference.waveform import write_wav

NO_REFERENCE_AUDIO = "reference_audio_unavailable"


def fit_to_seconds(wav, seconds: float, sample_rate: int = 16000):
    """Cut or zero-pad a waveform to exactly ``seconds``."""
    n = int(round(seconds * sample_rate))
    return wav[:n] if wav.numel() >= n else torch.nn.functional.pad(wav, (0, n - wav.numel()))


class TtaSuite(Suite):
    """Text-to-audio quality as a distance between distributions.

    Example::

        suite = TtaSuite({"benchmark": "audiocaps", "embedding": {"kind": "openl3", "content_type": "env"}},
                         engine=EvalEngine(model))
        suite.run(samples, "outputs/eval/audiocaps").metrics     # {"fd_openl3": ...}
    """

    name = "tta"
    needs_audio = False

    def __init__(self, cfg=None, engine=None, hypotheses=None, references=None, embedder: AudioEmbedder | None = None):
        super().__init__(cfg, engine, hypotheses, references)
        self._embedder = embedder

    @property
    def embedder(self) -> AudioEmbedder:
        if self._embedder is None:
            self._embedder = build_audio_embedder(dict(self.cfg.get("embedding") or {}))
        return self._embedder

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "embedder": self.embedder.name}

    def check(self, sample: EvalSample) -> dict:
        return {"caption": sample.text_field("caption")}

    def prepare(self, sample: EvalSample, reference: dict):
        seconds = float(self.cfg.get("clip_seconds", 10.0))
        if not sample.has_audio:
            return reference["caption"], None, "the sample has no reference audio"
        try:
            return reference["caption"], fit_to_seconds(sample.load_audio(), seconds), None
        except SampleError as e:
            return reference["caption"], None, e.detail

    def generate(self, inputs, references):
        wavs = self.engine.tta([caption for caption, _, _ in inputs])
        return [{"wav": w, "reference": ref, "problem": problem} for w, (_, ref, problem) in zip(wavs, inputs)]

    def _save(self, kind: str, sample_id: str, frames: np.ndarray) -> str:
        path = self.out_dir / "embeddings" / kind / f"{safe_name(sample_id)}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, frames.astype(np.float32))
        return str(path.relative_to(self.out_dir))

    def score(self, sample: EvalSample, reference: dict, output) -> dict:
        wav_path = write_wav(self.out_dir / "audio" / f"{safe_name(sample.id)}.wav", output["wav"])
        record = {"reference": reference, "audio": str(wav_path.relative_to(self.out_dir)),
                  "seconds": round(output["wav"].numel() / 16000, 3),
                  "generated_embedding": self._save("generated", sample.id, self.embedder.embed(output["wav"])),
                  "reference_embedding": None, "flags": []}
        if output["reference"] is not None:
            record["reference_embedding"] = self._save("reference", sample.id, self.embedder.embed(output["reference"]))
        else:
            record["flags"].append(NO_REFERENCE_AUDIO)
            record["reference_problem"] = output["problem"]
        return record

    def summarize(self, records: list[dict], summary: SuiteSummary) -> None:
        scored = self.scored(records)
        root = Path(self.out_dir)
        generated = [np.load(root / r["generated_embedding"]) for r in scored]
        reference = [np.load(root / r["reference_embedding"]) for r in scored if r.get("reference_embedding")]
        metric = self.embedder.metric
        gen_frames = np.concatenate(generated) if generated else np.zeros((0, 1))
        ref_frames = np.concatenate(reference) if reference else np.zeros((0, 1))
        if len(gen_frames) < 2 or len(ref_frames) < 2:
            summary.metrics[metric] = NotComputed(f"needs at least 2 frame embeddings per side, got {len(gen_frames)} "
                                                  f"generated and {len(ref_frames)} reference")
        else:
            summary.metrics[metric] = frechet_distance_between(gen_frames, ref_frames)
        summary.breakdowns["embedding sets"] = {
            "generated": {"clips": len(generated), "frames": int(len(gen_frames))},
            "reference": {"clips": len(reference), "frames": int(len(ref_frames))}}
        summary.notes.append(f"embedding model: {self.embedder.description}")
        if self.embedder.is_fallback:
            summary.notes.append(f"{metric} is measured with the FALLBACK embedding, not OpenL3: it is not comparable with "
                                 "the paper's FD_openl3 (install openl3 for that)")
        dims = gen_frames.shape[1] if gen_frames.ndim == 2 else 0
        if 2 <= len(gen_frames) <= dims:
            summary.notes.append(f"only {len(gen_frames)} generated frames for {dims}-d embeddings: the covariance is "
                                 "rank-deficient and the distance is indicative only")
        benchmark = self.cfg.get("benchmark")
        value = summary.metrics[metric]
        if benchmark:
            summary.comparisons.append(Comparison(
                benchmark, "fd_openl3", value if isinstance(value, float) else None,
                comparable=not self.embedder.is_fallback, our_metric=f"{metric} ({self.embedder.name})",
                note="" if not self.embedder.is_fallback else "this run used the fallback embedding"))
