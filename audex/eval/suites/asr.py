"""ASR suite: corpus WER with the Open ASR leaderboard's normalisation (Tables 8 and 10).

Prompt: appendix A.7, ``<sound>\\nTranscribe the speech in the input audio``, greedy. English benchmarks carry no
language id; for language-conditioned multilingual ASR (``language_in_prompt: true``, FLEURS in Table 10) the
prompt adds ``Language: {LANGUAGE_ID}`` and the engine teacher-forces the language field (appendix D).

Scoring: reference and hypothesis go through :func:`audex.eval.normalize.normalize_for_wer` with the sample's
language (English normaliser for English, basic normaliser otherwise), jiwer aligns them, and WER is total errors
over total reference words. Samples whose reference is empty after normalisation are dropped, as the leaderboard
does, and counted. Per-language WERs are printed and plotted when the manifest holds more than one language; the
"average" beside a per-language reference table is the mean of the per-language WERs, as the paper computes it.

Reference fields: ``text`` (the transcript), ``language`` (optional; ``default_language`` otherwise).
"""

from __future__ import annotations

from collections import defaultdict

from audex.eval.metrics import WordErrorCounts, corpus_wer, word_errors
from audex.eval.normalize import normalize_for_wer
from audex.eval.report import Comparison, SuiteSummary, plot_bars
from audex.eval.samples import EMPTY_HYPOTHESIS, EMPTY_REFERENCE, EvalSample, SampleError
from audex.eval.suites.base import Suite


def counts_of(record: dict) -> WordErrorCounts:
    return WordErrorCounts(**record["counts"])


class AsrSuite(Suite):
    """Word error rate of the model's transcriptions.

    Example::

        suite = AsrSuite({"benchmark": "openasr/librispeech_clean"}, engine=EvalEngine(model))
        summary = suite.run(samples, "outputs/eval/asr")
        summary.metrics["wer"]          # percent
    """

    name = "asr"
    supports_hypotheses = True

    def check(self, sample: EvalSample) -> dict:
        language = sample.fields.get("language") or self.cfg.get("default_language", "en")
        return {"text": sample.text_field("text"), "language": str(language)}

    def generate(self, inputs, references):
        languages = [r["language"] for r in references] if self.cfg.get("language_in_prompt") else None
        return self.engine.asr(inputs, languages=languages)

    def score(self, sample: EvalSample, reference: dict, output) -> dict:
        hypothesis = "" if output is None else str(output)
        remove = bool(self.cfg.get("remove_diacritics", False))
        ref_norm = normalize_for_wer(reference["text"], reference["language"], remove)
        hyp_norm = normalize_for_wer(hypothesis, reference["language"], remove)
        if not ref_norm:
            raise SampleError(EMPTY_REFERENCE, f"reference {reference['text']!r} is empty after normalisation "
                                               "(the Open ASR leaderboard drops such samples)")
        counts = word_errors(ref_norm, hyp_norm)
        return {"reference": reference, "hypothesis": hypothesis, "reference_normalized": ref_norm,
                "hypothesis_normalized": hyp_norm, "counts": counts.to_json(), "wer": round(100 * counts.wer, 3),
                "flags": [EMPTY_HYPOTHESIS] if not hyp_norm else []}

    def summarize(self, records: list[dict], summary: SuiteSummary) -> None:
        scored = self.scored(records)
        summary.metrics["wer"] = 100 * corpus_wer(counts_of(r) for r in scored)
        by_language: dict[str, list[dict]] = defaultdict(list)
        for r in scored:
            by_language[r["reference"]["language"]].append(r)
        per_language = {lang: 100 * corpus_wer(counts_of(r) for r in rs) for lang, rs in sorted(by_language.items())}
        summary.breakdowns["WER per language"] = {
            lang: {"wer": wer, "samples": len(by_language[lang]),
                   "reference_words": sum(counts_of(r).reference_words for r in by_language[lang])}
            for lang, wer in per_language.items()}
        self.compare(summary, per_language)

    def compare(self, summary: SuiteSummary, per_language: dict[str, float]) -> None:
        benchmark = self.cfg.get("benchmark")
        if not benchmark:
            return
        per_language_keys = {lang: f"{benchmark}/{lang}" for lang in per_language
                             if self.references.results(f"{benchmark}/{lang}", "wer")}
        if not per_language_keys:
            summary.comparisons.append(Comparison(benchmark, "wer", summary.metrics["wer"]))
            return
        for lang, key in per_language_keys.items():
            summary.comparisons.append(Comparison(key, "wer", per_language[lang]))
        if len(per_language) > 1:
            average = sum(per_language.values()) / len(per_language)
            summary.metrics["wer_language_average"] = average
            note = "" if len(per_language_keys) == 7 else (
                f"average over the {len(per_language)} languages of this run, the paper's over its 7 (DE ES FR IT PT RU KO)")
            summary.comparisons.append(Comparison(f"{benchmark}/average", "wer", average, note=note))
            if self.out_dir is not None:
                paper = {lang: self.references.value(key, "wer") for lang, key in per_language_keys.items()}
                path = plot_bars(per_language, self.out_dir / "wer_per_language.png", f"{self.name}: WER per language",
                                 "WER (%)", reference={k: v for k, v in paper.items() if v is not None},
                                 reference_label="Audex 30B-A3B (paper)")
                summary.plots.append(str(path))
