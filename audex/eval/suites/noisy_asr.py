"""Noisy-ASR suite: WER per SNR level and their average (Table 9).

Each clean utterance is scored once per level of ``snr_levels_db`` (-5, 0, 5, 10, 25, 50, 100 dB), mixed with a
noise clip chosen from the noise bank by ``(seed, utterance id)`` (:mod:`audex.eval.noise`). A scored sample's id
is ``<utterance id>@<snr>dB``, so resuming skips exactly the (utterance, level) pairs already done. The summary
gives the corpus WER of each level, their mean (Table 9's "Average"), a plot of WER against SNR beside the paper's
curves, and the achieved SNR range.

Options: ``noise`` (``folder``, ``manifest``, or ``synthetic: white|pink`` for smoke tests), ``seed``,
``snr_levels_db``, and everything of :class:`~audex.eval.suites.asr.AsrSuite`.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict

import torch

from audex.eval.metrics import corpus_wer
from audex.eval.noise import SNR_LEVELS_DB, NoiseBank
from audex.eval.report import Comparison, SuiteSummary, plot_curves
from audex.eval.samples import EvalSample
from audex.eval.suites.asr import AsrSuite, counts_of

PAPER_CURVES = ("Audex 30B-A3B", "Audex 2B", "Whisper-large-v3")


def build_noise_bank(cfg: dict) -> NoiseBank:
    if cfg.get("folder"):
        return NoiseBank.from_folder(cfg["folder"])
    if cfg.get("manifest"):
        return NoiseBank.from_manifest(cfg["manifest"])
    if cfg.get("synthetic"):
        return NoiseBank.synthetic(cfg["synthetic"], seed=int(cfg.get("seed", 0)))
    raise ValueError("the noisy_asr suite needs noise: set suite.noise.folder (e.g. MUSAN noise), suite.noise.manifest "
                     "(a Lhotse manifest), or suite.noise.synthetic=white|pink for a smoke test")


def _achieved_range(records: list[dict]) -> dict:
    achieved = [r["reference"]["achieved_snr_db"] for r in records if "achieved_snr_db" in r["reference"]]
    return {"achieved_snr_min": min(achieved), "achieved_snr_max": max(achieved)} if achieved else {}


class _CleanAudioCache:
    """The last few clean utterances, so the levels of one utterance load its file once."""

    def __init__(self, size: int = 16):
        self.size = size
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, sample: EvalSample) -> torch.Tensor:
        if sample.id not in self.items:
            self.items[sample.id] = sample.load_audio()
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return self.items[sample.id]


class NoisyAsrSuite(AsrSuite):
    name = "noisy_asr"
    supports_hypotheses = True

    def __init__(self, cfg=None, engine=None, hypotheses=None, references=None):
        super().__init__(cfg, engine, hypotheses, references)
        self.snr_levels = [float(s) for s in self.cfg.get("snr_levels_db", SNR_LEVELS_DB)]
        self.seed = int(self.cfg.get("seed", 0))
        self._bank: NoiseBank | None = None
        self._clean = _CleanAudioCache()

    @property
    def bank(self) -> NoiseBank:
        if self._bank is None:
            self._bank = build_noise_bank(dict(self.cfg.get("noise") or {}))
        return self._bank

    def expand(self, samples: list[EvalSample]) -> list[EvalSample]:
        out = []
        for s in samples:
            for snr in self.snr_levels:
                fields = dict(s.fields, snr_db=snr, clean_id=s.id)
                out.append(EvalSample(f"{s.id}@{snr:g}dB", fields, s.audio_source, s.audio_loader))
        return out

    def check(self, sample: EvalSample) -> dict:
        return {**super().check(sample), "snr_db": sample.fields["snr_db"]}

    def prepare(self, sample: EvalSample, reference: dict):
        if self.hypotheses is not None:
            return None
        clean_id = sample.fields["clean_id"]
        clean = self._clean.get(EvalSample(clean_id, sample.fields, sample.audio_source, sample.audio_loader))
        mixture, info = self.bank.mix(clean, clean_id, reference["snr_db"], seed=self.seed)
        reference.update(info)
        return mixture

    def summarize(self, records: list[dict], summary: SuiteSummary) -> None:
        scored = self.scored(records)
        by_level: dict[float, list[dict]] = defaultdict(list)
        for r in scored:
            by_level[float(r["reference"]["snr_db"])].append(r)
        levels = [snr for snr in self.snr_levels if by_level.get(snr)]
        per_level = {snr: 100 * corpus_wer(counts_of(r) for r in by_level[snr]) for snr in levels}
        summary.metrics["wer_average"] = sum(per_level.values()) / len(per_level)
        summary.metrics["wer_pooled"] = 100 * corpus_wer(counts_of(r) for r in scored)
        summary.breakdowns["WER per SNR level"] = {
            f"{snr:g} dB": {"wer": per_level[snr], "samples": len(by_level[snr]), **_achieved_range(by_level[snr])}
            for snr in levels}
        noise = "precomputed hypotheses (noise not mixed here)" if self.hypotheses is not None else self.bank.description
        summary.notes.append(f"noise: {noise}; selection seed {self.seed} (per utterance id); the average is the mean of "
                             "the per-level WERs, as in Table 9")
        benchmark = self.cfg.get("benchmark")
        if benchmark:
            for snr in levels:
                if self.references.results(f"{benchmark}/snr_{snr:g}", "wer"):
                    summary.comparisons.append(Comparison(f"{benchmark}/snr_{snr:g}", "wer", per_level[snr]))
            note = "" if len(levels) == 7 else f"average over this run's {len(levels)} levels, the paper's over 7"
            summary.comparisons.append(Comparison(f"{benchmark}/average", "wer", summary.metrics["wer_average"], note=note))
        if self.out_dir is not None:
            series = {"this run": [per_level[s] for s in levels]}
            if benchmark:
                for model in PAPER_CURVES:
                    series[f"{model} (paper)"] = [self.references.value(f"{benchmark}/snr_{s:g}", "wer", model) for s in levels]
            path = plot_curves(levels, series, self.out_dir / "wer_per_snr.png", "WER per SNR level", "SNR (dB)", "WER (%)")
            summary.plots.append(str(path))
