"""Speech-to-speech suite: BigBenchAudio-style cascade accuracy (section 5.4, appendix A.8, Table 13).

Each spoken question goes through the cascade with the one model under test: ASR -> text reasoning with the
instruction "Conclude your response with the sentence 'The answer is \\boxed{{X}}.'" -> answer extraction ->
TTS of "The answer is {ANSWER}". Two accuracies are reported:

* ``accuracy``: the reasoning step's answer (``\\boxed{}`` content, else the final "The answer is ...",
  :func:`audex.eval.answers.extract_short_answer`) equals the reference after the English normaliser
  ("Seven." == "7");
* ``spoken_accuracy`` (``score_spoken: true``): the spoken reply, transcribed by the judge ASR (``asr_model``),
  says the reference answer — what a listener hears, which is what BigBenchAudio scores.

The spoken replies are written to ``audio/<id>.wav``.

Reference fields: ``answer`` (e.g. "valid", "True", "7"), audio (the spoken question), optional ``question``
(its text, kept in the record) and ``category``.
"""

from __future__ import annotations

from collections import defaultdict

from audex.eval.answers import extract_short_answer, short_answers_match
from audex.eval.report import Comparison, SuiteSummary
from audex.eval.samples import NO_ANSWER, EvalSample
from audex.eval.suites.base import Suite, safe_name
from audex.inference.waveform import write_wav


class SpeechToSpeechSuite(Suite):
    """Cascaded speech interaction accuracy.

    Example::

        SpeechToSpeechSuite({"benchmark": "bigbenchaudio"}, engine=EvalEngine(model)).run(samples, "outputs/eval/bba")
    """

    name = "s2s"

    def check(self, sample: EvalSample) -> dict:
        return {"answer": sample.text_field("answer"), "question": sample.fields.get("question"),
                "category": sample.fields.get("category")}

    def generate(self, inputs, references):
        outputs = self.engine.s2s(inputs)
        if self.cfg.get("score_spoken", True):
            heard = self.transcriber([o["speech"] for o in outputs])
            for o, text in zip(outputs, heard):
                o["heard"] = text
        return outputs

    def score(self, sample: EvalSample, reference: dict, output) -> dict:
        path = write_wav(self.out_dir / "audio" / f"{safe_name(sample.id)}.wav", output["speech"])
        answer = extract_short_answer(output["response"]) or extract_short_answer(output.get("thinking") or "")
        record = {"reference": reference, "transcript": output["transcript"], "response": output["response"],
                  "answer": answer, "pipeline_answer": output["pipeline_answer"], "spoken_text": output["spoken_text"],
                  "audio": str(path.relative_to(self.out_dir)),
                  "correct": short_answers_match(answer, reference["answer"]),
                  "flags": [] if answer is not None else [NO_ANSWER]}
        if "heard" in output:
            heard_answer = extract_short_answer(output["heard"])
            record.update(heard=output["heard"], heard_answer=heard_answer,
                          spoken_correct=short_answers_match(heard_answer, reference["answer"]))
        return record

    def summarize(self, records: list[dict], summary: SuiteSummary) -> None:
        scored = self.scored(records)
        summary.metrics["accuracy"] = 100.0 * sum(r["correct"] for r in scored) / len(scored)
        spoken = [r for r in scored if "spoken_correct" in r]
        if spoken:
            summary.metrics["spoken_accuracy"] = 100.0 * sum(r["spoken_correct"] for r in spoken) / len(spoken)
        by_category = defaultdict(list)
        for r in scored:
            if r["reference"].get("category"):
                by_category[r["reference"]["category"]].append(r)
        if by_category:
            summary.breakdowns["accuracy per category"] = {
                c: {"accuracy": 100.0 * sum(r["correct"] for r in rs) / len(rs), "samples": len(rs)}
                for c, rs in sorted(by_category.items())}
        judge = self.cfg.get("asr_model") or "self"
        summary.notes.append(f"cascade: ASR -> reasoning -> TTS with the model under test; spoken replies judged by {judge!r}")
        benchmark = self.cfg.get("benchmark")
        if benchmark:
            key = "spoken_accuracy" if spoken else "accuracy"
            summary.comparisons.append(Comparison(benchmark, "accuracy", summary.metrics[key],
                                                  note=f"this run's {key.replace('_', ' ')}"))
