"""AST suite: X -> English speech translation, corpus BLEU (sacrebleu) and COMET (Table 11).

Prompt: appendix A.7, ``<sound>\\nTranslate the spoken content in the audio to English``, greedy, no source
language in the prompt; the model writes the source language, the transcript and the translation, and the
translation field is scored.

BLEU is sacrebleu's corpus BLEU (13a tokenisation) over the run and per source language; the paper's average is
the mean of the per-language scores. COMET (x100) uses unbabel-comet with a *local* checkpoint
(``comet_checkpoint``, the paper's ``Unbabel/wmt22-comet-da``) and needs the source transcript; without a
checkpoint the summary says "not computed" and why.

Reference fields: ``translation`` (English reference), ``text`` (source transcript; needed for COMET only),
``language`` (source language, for the per-language table).
"""

from __future__ import annotations

from collections import defaultdict

from audex.eval.metrics import NotComputed, comet_score, corpus_bleu, sentence_bleu
from audex.eval.report import Comparison, SuiteSummary, plot_bars
from audex.eval.samples import EMPTY_HYPOTHESIS, EvalSample
from audex.eval.suites.base import Suite


class AstSuite(Suite):
    """Speech translation quality.

    Example::

        suite = AstSuite({"benchmark": "fleurs_ast", "comet_checkpoint": "/models/wmt22-comet-da/checkpoints/model.ckpt"},
                         engine=EvalEngine(model))
        suite.run(samples, "outputs/eval/ast").metrics      # {"bleu": ..., "comet": ...}
    """

    name = "ast"
    supports_hypotheses = True

    def check(self, sample: EvalSample) -> dict:
        return {"translation": sample.text_field("translation"), "source": sample.text_field("text", required=False),
                "language": str(sample.fields.get("language") or "unknown")}

    def generate(self, inputs, references):
        return [out["translation"] for out in self.engine.ast(inputs)]

    def score(self, sample: EvalSample, reference: dict, output) -> dict:
        hypothesis = "" if output is None else str(output).strip()
        return {"reference": reference, "hypothesis": hypothesis,
                "sentence_bleu": round(sentence_bleu(hypothesis, reference["translation"]), 3),
                "flags": [] if hypothesis else [EMPTY_HYPOTHESIS]}

    def _comet(self, records: list[dict]) -> float | NotComputed:
        if not self.cfg.get("comet_checkpoint"):
            return comet_score([], [], [], None)
        if any(not r["reference"].get("source") for r in records):
            return NotComputed("some samples lack the source transcript ('text') that COMET needs")
        return comet_score([r["reference"]["source"] for r in records], [r["hypothesis"] for r in records],
                           [r["reference"]["translation"] for r in records], self.cfg["comet_checkpoint"],
                           batch_size=int(self.cfg.get("comet_batch_size", 16)), gpus=int(self.cfg.get("comet_gpus", 0)))

    def summarize(self, records: list[dict], summary: SuiteSummary) -> None:
        scored = self.scored(records)
        summary.metrics["bleu"] = corpus_bleu([r["hypothesis"] for r in scored], [r["reference"]["translation"] for r in scored])
        summary.metrics["comet"] = self._comet(scored)
        by_language: dict[str, list[dict]] = defaultdict(list)
        for r in scored:
            by_language[r["reference"]["language"]].append(r)
        table = {}
        for lang, rs in sorted(by_language.items()):
            comet = self._comet(rs) if len(by_language) > 1 else summary.metrics["comet"]
            table[lang] = {"bleu": corpus_bleu([r["hypothesis"] for r in rs], [r["reference"]["translation"] for r in rs]),
                           "comet": comet if not isinstance(comet, NotComputed) else None, "samples": len(rs)}
        summary.breakdowns["BLEU / COMET per source language"] = table
        if isinstance(summary.metrics["comet"], NotComputed):
            summary.notes.append(f"COMET {summary.metrics['comet']}")

        benchmark = self.cfg.get("benchmark")
        if not benchmark:
            return
        keys = {lang: f"{benchmark}/{lang}" for lang in table if self.references.results(f"{benchmark}/{lang}", "bleu")}
        if not keys:
            summary.comparisons.append(Comparison(benchmark, "bleu", summary.metrics["bleu"]))
            return
        for lang, key in keys.items():
            summary.comparisons.append(Comparison(key, "bleu", table[lang]["bleu"]))
        if len(table) > 1:
            average = sum(row["bleu"] for row in table.values()) / len(table)
            summary.metrics["bleu_language_average"] = average
            summary.comparisons.append(Comparison(f"{benchmark}/average", "bleu", average))
            comets = [row["comet"] for row in table.values()]
            if all(c is not None for c in comets):
                summary.metrics["comet_language_average"] = sum(comets) / len(comets)
                summary.comparisons.append(Comparison(f"{benchmark}/average", "comet", summary.metrics["comet_language_average"]))
            if self.out_dir is not None:
                paper = {lang: self.references.value(key, "bleu") for lang, key in keys.items()}
                path = plot_bars({k: v["bleu"] for k, v in table.items()}, self.out_dir / "bleu_per_language.png",
                                 "AST: BLEU per source language", "BLEU",
                                 reference={k: v for k, v in paper.items() if v is not None},
                                 reference_label="Audex 30B-A3B (paper)")
                summary.plots.append(str(path))
