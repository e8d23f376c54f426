"""Text-retention suite: the same text evaluation set on two checkpoints, side by side (Table 1's claim).

The paper's central claim is that adding audio costs the backbone no text ability (Table 1: Audex 30B-A3B vs
Nemotron-Cascade-2-30B-A3B). This suite measures it for any pair of checkpoints — typically the text backbone
(or the checkpoint before an audio stage) as ``baseline_model`` and the checkpoint after it as ``model``:

* ``loss`` mode (samples with ``messages``, a chat ending with an assistant turn, the schema of
  :mod:`audex.data.schema`): teacher-forced negative log-likelihood of the assistant tokens, token-weighted over
  the set; reported per checkpoint with the difference and the perplexity ratio;
* ``accuracy`` mode (samples with ``question``, ``choices``, ``answer``): the model answers the multiple-choice
  question (the A.9 option format, instruct mode unless ``thinking: true``) and the letter is extracted with
  :func:`audex.eval.answers.extract_choice`; reported per checkpoint with the difference in points.

``mode: auto`` picks per sample by its fields. The summary also lists the paper's own retention numbers (Table 1,
backbone vs Audex) for context and, with ``benchmark`` set (e.g. ``mmlu_redux``), compares the candidate's
accuracy with that row.
"""

from __future__ import annotations

import math

from audex.data.schema import validate_messages
from audex.eval.answers import extract_choice, resolve_gold_choice
from audex.eval.report import Comparison, SuiteSummary
from audex.eval.samples import INVALID_REFERENCE, MISSING_REFERENCE, NO_ANSWER, EvalSample, SampleError
from audex.eval.suites.base import Suite
from audex.prompts import mcq_question

BACKBONE = "Nemotron-Cascade-2-30B-A3B"
AUDEX = "Audex 30B-A3B"
TABLE1_TEXT_BENCHMARKS = ("aime2025", "aime2026", "hmmt_feb25", "imo_answerbench", "livecodebench_v6", "scicode",
                          "mmlu_redux", "mmlu_pro", "gpqa_diamond", "arenahard_v2", "ifbench", "aa_lcr",
                          "longbench_v2", "niah_256k", "niah_1m", "tau2_bench", "terminal_bench_2", "swe_verified")


class TextRetentionSuite(Suite):
    """Candidate vs baseline checkpoint on a text set.

    Example::

        suite = TextRetentionSuite({"mode": "loss"}, engine=EvalEngine(after_stage1),
                                   baseline_engine=EvalEngine(text_backbone))
        suite.run(samples, "outputs/eval/text").metrics   # {"loss_candidate": ..., "loss_baseline": ..., "loss_delta": ...}
    """

    name = "text"
    needs_audio = False

    def __init__(self, cfg=None, engine=None, hypotheses=None, references=None, baseline_engine=None):
        super().__init__(cfg, engine, hypotheses, references)
        if baseline_engine is None:
            raise ValueError("the text suite compares two checkpoints: give baseline_model (e.g. the text backbone, or "
                             "the checkpoint before the audio stage) besides model")
        self.baseline_engine = baseline_engine
        self.thinking = bool(self.cfg.get("thinking", False))

    def check(self, sample: EvalSample) -> dict:
        mode = self.cfg.get("mode", "auto")
        if mode == "auto":
            mode = "loss" if "messages" in sample.fields else "accuracy"
        if mode == "loss":
            messages = sample.fields.get("messages")
            if messages is None:
                raise SampleError(MISSING_REFERENCE, f"sample {sample.id!r} has no 'messages' for loss mode")
            try:
                messages = validate_messages(messages, self.thinking, sample.id, error=ValueError)
            except ValueError as e:
                raise SampleError(INVALID_REFERENCE, str(e)) from None
            return {"mode": "loss", "messages": messages}
        if mode != "accuracy":
            raise ValueError(f"text suite mode must be auto, loss or accuracy, got {mode!r}")
        choices = sample.fields.get("choices")
        if not isinstance(choices, (list, tuple)) or len(choices) < 2:
            raise SampleError(MISSING_REFERENCE, f"sample {sample.id!r} needs 'choices' (a list of >= 2 options)")
        try:
            gold = resolve_gold_choice(sample.text_field("answer"), choices)
        except ValueError as e:
            raise SampleError(INVALID_REFERENCE, str(e)) from None
        return {"mode": "accuracy", "question": sample.text_field("question"), "choices": list(choices), "answer": gold}

    def prepare(self, sample: EvalSample, reference: dict):
        return None

    def _run_both(self, references: list[dict]) -> list[dict]:
        outputs = [{} for _ in references]
        loss_rows = [i for i, r in enumerate(references) if r["mode"] == "loss"]
        acc_rows = [i for i, r in enumerate(references) if r["mode"] == "accuracy"]
        for side, engine in (("candidate", self.engine), ("baseline", self.baseline_engine)):
            if loss_rows:
                for i, (nll, n) in zip(loss_rows, engine.nll([references[i]["messages"] for i in loss_rows], self.thinking)):
                    outputs[i][side] = {"nll": nll, "tokens": n}
            if acc_rows:
                prompts = [mcq_question(references[i]["question"], references[i]["choices"]) for i in acc_rows]
                for i, response in zip(acc_rows, engine.chat(prompts, thinking=self.thinking)):
                    outputs[i][side] = {"response": response}
        return outputs

    def generate(self, inputs, references):
        return self._run_both(references)

    def score(self, sample: EvalSample, reference: dict, output) -> dict:
        record = {"reference": reference, "flags": []}
        for side in ("candidate", "baseline"):
            result = dict(output[side])
            if reference["mode"] == "accuracy":
                result["predicted"] = extract_choice(result["response"], reference["choices"])
                result["correct"] = result["predicted"] == reference["answer"]
                if result["predicted"] is None:
                    record["flags"].append(f"{NO_ANSWER}_{side}")
            else:
                result["loss"] = result["nll"] / result["tokens"]
            record[side] = result
        return record

    def summarize(self, records: list[dict], summary: SuiteSummary) -> None:
        scored = self.scored(records)
        loss = [r for r in scored if r["reference"]["mode"] == "loss"]
        acc = [r for r in scored if r["reference"]["mode"] == "accuracy"]
        if loss:
            per_side = {}
            for side in ("candidate", "baseline"):
                tokens = sum(r[side]["tokens"] for r in loss)
                per_side[side] = sum(r[side]["nll"] for r in loss) / tokens
                summary.metrics[f"loss_{side}"] = per_side[side]
            summary.metrics["loss_delta"] = per_side["candidate"] - per_side["baseline"]
            summary.metrics["perplexity_ratio"] = math.exp(summary.metrics["loss_delta"])
            summary.breakdowns["loss (nats per assistant token)"] = {
                side: {"loss": per_side[side], "perplexity": math.exp(per_side[side]),
                       "tokens": sum(r[side]["tokens"] for r in loss), "samples": len(loss)} for side in per_side}
        if acc:
            for side in ("candidate", "baseline"):
                summary.metrics[f"accuracy_{side}"] = 100.0 * sum(r[side]["correct"] for r in acc) / len(acc)
            summary.metrics["accuracy_delta"] = summary.metrics["accuracy_candidate"] - summary.metrics["accuracy_baseline"]
            both = sum(r["candidate"]["correct"] and r["baseline"]["correct"] for r in acc)
            lost = sum(r["baseline"]["correct"] and not r["candidate"]["correct"] for r in acc)
            gained = sum(r["candidate"]["correct"] and not r["baseline"]["correct"] for r in acc)
            summary.breakdowns["answers (accuracy mode)"] = {
                "both correct": {"samples": both}, "lost (baseline right, candidate wrong)": {"samples": lost},
                "gained (candidate right, baseline wrong)": {"samples": gained}}
        summary.breakdowns[f"paper: text retention, {AUDEX} vs its backbone (Table 1)"] = self.paper_retention()
        summary.notes.append(f"candidate: {self.cfg.get('model_label', 'model')}; baseline: "
                             f"{self.cfg.get('baseline_label', 'baseline_model')}")
        benchmark = self.cfg.get("benchmark")
        if benchmark and acc:
            summary.comparisons.append(Comparison(benchmark, "accuracy", summary.metrics["accuracy_candidate"]))

    def paper_retention(self) -> dict:
        rows = {}
        for bench in TABLE1_TEXT_BENCHMARKS:
            backbone = self.references.value(bench, "accuracy", BACKBONE)
            audex = self.references.value(bench, "accuracy", AUDEX)
            if backbone is not None and audex is not None:
                rows[self.references.benchmark_labels.get(bench, bench)] = {
                    "backbone": backbone, "audex": audex, "delta": round(audex - backbone, 2)}
        return rows
