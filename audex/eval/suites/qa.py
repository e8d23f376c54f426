"""Audio question answering suites (Table 12): multiple choice, entailment, hallucination.

Prompts are appendix A.9's, built by the generation engine (:class:`audex.inference.pipelines.AudexPipeline`
with :mod:`audex.prompts`); decoding is the task's preset (top-p 0.9, T 0.7), seeded. Answers are read with :mod:`audex.eval.answers`; a response that commits to no valid answer is
scored wrong and flagged ``no_answer_extracted``.

* ``mcq`` (MMAU, MMAR, MMSU): fields ``question``, ``choices`` (list of option texts), ``answer`` (a letter or
  the option's text), optional ``category`` (e.g. MMAU's sound / music / speech) for a per-category table.
* ``entailment`` (Audio Entailment on Clotho v2 / AudioCaps): ``description`` (or ``hypothesis``) and
  ``answer`` in yes / no / maybe.
* ``hallucination`` (CMM): ``sound_event`` and ``answer`` in yes / no.

Accuracy is in percent. With ``benchmark`` set, the summary compares the overall accuracy with the paper's
``<benchmark>`` row, each category with ``<benchmark>/<category>``, and the mean over categories with
``<benchmark>/average`` (MMAU's "avg" is the mean of sound, music and speech).
"""

from __future__ import annotations

from collections import defaultdict

from audex.eval.answers import extract_choice, extract_label, resolve_gold_choice
from audex.eval.report import Comparison, SuiteSummary
from audex.eval.samples import INVALID_REFERENCE, MISSING_REFERENCE, NO_ANSWER, EvalSample, SampleError
from audex.eval.suites.base import Suite


class _QaSuite(Suite):
    supports_hypotheses = True

    def extract(self, response: str, reference: dict) -> str | None:
        raise NotImplementedError

    def score(self, sample: EvalSample, reference: dict, output) -> dict:
        response = "" if output is None else str(output)
        predicted = self.extract(response, reference)
        return {"reference": reference, "response": response, "predicted": predicted,
                "correct": predicted is not None and predicted == reference["answer"],
                "flags": [] if predicted is not None else [NO_ANSWER]}

    def summarize(self, records: list[dict], summary: SuiteSummary) -> None:
        scored = self.scored(records)
        summary.metrics["accuracy"] = 100.0 * sum(r["correct"] for r in scored) / len(scored)
        by_category: dict[str, list[dict]] = defaultdict(list)
        for r in scored:
            if r["reference"].get("category"):
                by_category[str(r["reference"]["category"])].append(r)
        per_category = {c: 100.0 * sum(r["correct"] for r in rs) / len(rs) for c, rs in sorted(by_category.items())}
        if per_category:
            summary.breakdowns["accuracy per category"] = {c: {"accuracy": a, "samples": len(by_category[c])}
                                                          for c, a in per_category.items()}
        predicted = defaultdict(int)
        for r in scored:
            predicted[r["predicted"] or "(none)"] += 1
        summary.breakdowns["predicted answers"] = {k: {"samples": v} for k, v in sorted(predicted.items())}

        benchmark = self.cfg.get("benchmark")
        if not benchmark:
            return
        if self.references.results(benchmark, "accuracy"):
            summary.comparisons.append(Comparison(benchmark, "accuracy", summary.metrics["accuracy"]))
        matched = {c: a for c, a in per_category.items() if self.references.results(f"{benchmark}/{c}", "accuracy")}
        for c, a in matched.items():
            summary.comparisons.append(Comparison(f"{benchmark}/{c}", "accuracy", a))
        if matched and self.references.results(f"{benchmark}/average", "accuracy"):
            summary.metrics["accuracy_category_average"] = sum(matched.values()) / len(matched)
            summary.comparisons.append(Comparison(f"{benchmark}/average", "accuracy", summary.metrics["accuracy_category_average"]))


class McqSuite(_QaSuite):
    """Multiple-choice audio QA (MMAU, MMAR, MMSU).

    Example::

        McqSuite({"benchmark": "mmau"}, engine=EvalEngine(model)).run(samples, "outputs/eval/mmau")
    """

    name = "mcq"

    def check(self, sample: EvalSample) -> dict:
        choices = sample.fields.get("choices")
        if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise SampleError(MISSING_REFERENCE if choices is None else INVALID_REFERENCE,
                              f"sample {sample.id!r} needs 'choices': a list of at least 2 option texts, got {choices!r}")
        question = sample.text_field("question")
        answer = sample.text_field("answer")
        try:
            gold = resolve_gold_choice(answer, choices)
        except ValueError as e:
            raise SampleError(INVALID_REFERENCE, str(e)) from None
        return {"question": question, "choices": list(choices), "answer": gold,
                "category": sample.fields.get("category")}

    def generate(self, inputs, references):
        return self.engine.mcq(inputs, [r["question"] for r in references], [r["choices"] for r in references])

    def extract(self, response: str, reference: dict) -> str | None:
        return extract_choice(response, reference["choices"])


class _ClosedSuite(_QaSuite):
    labels: tuple[str, ...] = ()

    def gold_label(self, sample: EvalSample) -> str:
        answer = sample.text_field("answer")
        gold = answer.strip().lower().rstrip(".!")
        if gold not in self.labels:
            raise SampleError(INVALID_REFERENCE, f"answer {answer!r} of sample {sample.id!r} is not one of {self.labels}")
        return gold

    def extract(self, response: str, reference: dict) -> str | None:
        return extract_label(response, self.labels)


class EntailmentSuite(_ClosedSuite):
    """Audio entailment: is a description true of the audio? yes / no / maybe."""

    name = "entailment"
    labels = ("yes", "no", "maybe")

    def check(self, sample: EvalSample) -> dict:
        description = sample.text_field("description", required=False) or sample.text_field("hypothesis", required=False)
        if description is None:
            raise SampleError(MISSING_REFERENCE, f"sample {sample.id!r} needs a 'description' (or 'hypothesis')")
        return {"description": description, "answer": self.gold_label(sample), "category": sample.fields.get("category")}

    def generate(self, inputs, references):
        return self.engine.entailment(inputs, [r["description"] for r in references])


class HallucinationSuite(_ClosedSuite):
    """Sound-event hallucination (CMM): did you hear X? yes / no."""

    name = "hallucination"
    labels = ("yes", "no")

    def check(self, sample: EvalSample) -> dict:
        return {"sound_event": sample.text_field("sound_event"), "answer": self.gold_label(sample),
                "category": sample.fields.get("category")}

    def generate(self, inputs, references):
        return self.engine.hallucination(inputs, [r["sound_event"] for r in references])
