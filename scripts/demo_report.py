#!/usr/bin/env python
"""What the demo chain learned, on data it never trained on (the ``test`` manifests of make_demo_data.py).

* **ASR**: word error rate of greedy transcripts of the held-out espeak-ng sentences (word combinations absent
  from training), jiwer after Whisper's English normalisation -- and the same model given silence instead of
  the speech, which is what knowing the grammar alone buys.
* **TTS / TTA**: codec-token accuracy of the speech / audio codes, with the transcript or caption (conditional)
  and with it replaced by padding as in CFG training (unconditional): the gap is what the model takes from the
  text. Teacher-forced accuracy (next token given the true past), and greedy free-running generation: TTS --
  share of speech tokens equal to the reference; TTA -- share of generated clips whose tokens are classified
  as the captioned sound kind (a per-position code-frequency classifier built from the training clips; eight
  kinds, so 1/8 is chance).
* **audio QA**: exact-match accuracy of greedy answers about the held-out synthetic sounds.
* **text**: each stage's text-regression report (start and end text loss and token accuracy, ``text_gate.json``;
  the gate is on the loss, see :mod:`audex.training.text_gate` for what each measures).

Every number is also given for the untrained starting model (``--baseline``). The last line is a JSON object.

    python scripts/demo_report.py --data demo_data --runs runs/demo --model runs/demo/stage3/stage3.nemo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from lhotse import CutSet

from audex.data.cfg_uncond import make_uncond_copy
from audex.data.collate import collate_padded
from audex.data.schema import get_audio_codes
from audex.data.sequence import IGNORE_INDEX, SequenceBuilder, load_cut_audio
from audex.eval.metrics import corpus_wer, word_errors
from audex.eval.normalize import normalize_for_wer
from audex.inference.constraints import CodecConstraint
from audex.inference.decoding import AudexDecoder
from audex.inference.pipelines import AudexPipeline
from audex.inference.sampling import SamplingParams
from audex.models.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]


def asr_wer(model, cuts, silence: bool = False) -> tuple[float, list[tuple[str, str]]]:
    wavs = [load_cut_audio(c) for c in cuts]
    if silence:
        wavs = [torch.zeros_like(w) for w in wavs]
    with torch.no_grad():
        results = AudexPipeline(model).asr(wavs, max_new_tokens=48)
    refs = [c.supervisions[0].text for c in cuts]
    hyps = [(r.fields or {}).get("transcription") or "" for r in results]
    counts = [word_errors(normalize_for_wer(r), normalize_for_wer(h)) for r, h in zip(refs, hyps)]
    return corpus_wer(counts), list(zip(refs, hyps))


@torch.no_grad()
def codec_token_accuracy(model, cuts, builder: SequenceBuilder, unconditional: bool, batch_size: int = 8) -> float:
    """Teacher-forced next-token accuracy on the codec tokens of the answers (speech or audio codes)."""
    vocab = model.vocab
    correct = total = 0
    for start in range(0, len(cuts), batch_size):
        part = cuts[start:start + batch_size]
        if unconditional:
            part = [make_uncond_copy(c, num_pads=_condition_tokens(model, c)) for c in part]
        batch = collate_padded([builder(c) for c in part], pad_id=model.tokenizer.pad_id)
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, sample_ids=batch.sample_ids).logits
        targets = batch.labels[:, 1:]
        is_codec = (targets != IGNORE_INDEX) & (vocab.is_speech(targets) | vocab.is_audio(targets))
        correct += int(((logits[:, :-1].argmax(-1) == targets) & is_codec).sum())
        total += int(is_codec.sum())
    return correct / max(total, 1)


@torch.no_grad()
def generate_codec_tokens(model, cuts, builder: SequenceBuilder, unconditional: bool, output: str,
                          audio_seconds: float = 2.0) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy free-running generation from the prompt (up to ``<speechgen_start>``/``<audiogen_start>``).
    Returns the generated codec ids and the reference codec ids of every cut."""
    vocab = model.vocab
    prompts, references = [], []
    for cut in cuts:
        if unconditional:
            cut = make_uncond_copy(cut, num_pads=_condition_tokens(model, cut))
        seq = builder(cut)
        start = int((seq.labels != IGNORE_INDEX).nonzero()[0])  # the <speechgen_start>/<audiogen_start> token
        prompts.append(seq.input_ids[:start + 1].tolist())
        answer = seq.input_ids[start + 1:]
        references.append(answer[vocab.is_speech(answer) | vocab.is_audio(answer)].tolist())
    longest = max(len(r) for r in references)
    constraint = CodecConstraint.for_task(model.tokenizer, output, audio_seconds=audio_seconds)
    out = AudexDecoder.for_model(model).generate(prompts, SamplingParams(do_sample=False, max_new_tokens=longest + 2),
                                                 constraint=constraint)
    generated = [[t for t in ids if vocab.is_speech(torch.tensor(t)) or vocab.is_audio(torch.tensor(t))]
                 for ids in out.token_ids]
    return generated, references


def position_accuracy(generated: list[list[int]], references: list[list[int]]) -> float:
    """Share of reference positions that the generated sequence reproduces (missing positions count as wrong)."""
    return sum(sum(g == r for g, r in zip(gen, ref)) for gen, ref in zip(generated, references)) / \
        sum(len(r) for r in references)


class SoundKindClassifier:
    """Which demo sound kind a TTA code sequence is: per kind and position, how often each code occurs in the
    training clips; a sequence goes to the kind under which its codes are most likely (smoothed). Its accuracy on
    the real test clips (:func:`reference_kind_accuracy`, reported) is the ceiling of the TTA metric."""

    def __init__(self, train_cuts, num_frames: int):
        by_kind: dict[str, list[torch.Tensor]] = {}
        for cut in train_cuts:
            if (cut.custom or {}).get("cfg_uncond_pads") is None:
                by_kind.setdefault(cut.custom["sound_kind"], []).append(get_audio_codes(cut)[:, :num_frames])
        self.templates = {k: torch.stack(v) for k, v in by_kind.items()}  # kind -> [clips, n_q, frames]
        self.num_frames = num_frames

    def __call__(self, codes: torch.Tensor) -> str | None:
        if codes.shape[-1] < self.num_frames:
            return None
        codes = codes[:, :self.num_frames]
        scores = {k: float(torch.log((t == codes).float().mean(0) * 0.9 + 0.1 / 64).sum())
                  for k, t in self.templates.items()}
        return max(scores, key=scores.get)


def reference_kind_accuracy(cuts, classifier: SoundKindClassifier) -> float:
    """How often the classifier names the kind of the real test clips: the ceiling of the TTA metric."""
    return sum(classifier(get_audio_codes(c)) == c.custom["sound_kind"] for c in cuts) / len(cuts)


def tta_kind_accuracy(model, cuts, builder, classifier: SoundKindClassifier, unconditional: bool,
                      audio_seconds: float) -> float:
    generated, _ = generate_codec_tokens(model, cuts, builder, unconditional, "audio", audio_seconds)
    n_q = model.vocab.audio_rvq_used
    kinds = [classifier(model.vocab.ids_to_audio_codes(g[: len(g) // n_q * n_q])) if len(g) >= n_q else None
             for g in generated]
    return sum(k == c.custom["sound_kind"] for k, c in zip(kinds, cuts)) / len(cuts)


def _condition_tokens(model, cut) -> int:
    """Length of the transcript/caption in tokens: the unconditional copy gets as many pads."""
    custom = cut.custom or {}
    text = custom.get("caption") if custom.get("task") == "tta" else cut.supervisions[0].text
    return max(1, len(model.tokenizer.encode(" " + text)))


def audio_qa_accuracy(model, cuts) -> float:
    wavs = [load_cut_audio(c) for c in cuts]
    with torch.no_grad():
        results = AudexPipeline(model).audio_qa(wavs, [c.custom["question"] for c in cuts], do_sample=False,
                                                max_new_tokens=24)
    return sum(r.text.strip() == c.custom["answer"].strip() for r, c in zip(results, cuts)) / len(cuts)


def evaluate(model, data: Path, tta_num_frames: int) -> dict:
    man = data / "manifests"
    asr = list(CutSet.from_file(man / "asr_test.jsonl.gz"))
    tts = list(CutSet.from_file(man / "tts_test.jsonl.gz"))
    tta = list(CutSet.from_file(man / "tta_test.jsonl.gz"))
    qa = list(CutSet.from_file(man / "audio_qa_test.jsonl.gz"))
    builder = SequenceBuilder(model.tokenizer, model.frames_for_samples, max_length=None, tta_num_frames=tta_num_frames)
    kinds = SoundKindClassifier(CutSet.from_file(man / "tta_train.jsonl.gz"), tta_num_frames)
    wer, pairs = asr_wer(model, asr)
    wer_silence, _ = asr_wer(model, asr, silence=True)
    return {
        "asr_wer": wer, "asr_wer_given_silence": wer_silence, "asr_examples": pairs[:3],
        "tts_token_acc_cond": codec_token_accuracy(model, tts, builder, unconditional=False),
        "tts_token_acc_uncond": codec_token_accuracy(model, tts, builder, unconditional=True),
        "tta_token_acc_cond": codec_token_accuracy(model, tta, builder, unconditional=False),
        "tta_token_acc_uncond": codec_token_accuracy(model, tta, builder, unconditional=True),
        "tts_gen_acc_cond": position_accuracy(*generate_codec_tokens(model, tts, builder, False, "speech")),
        "tts_gen_acc_uncond": position_accuracy(*generate_codec_tokens(model, tts, builder, True, "speech")),
        "tta_gen_kind_acc_cond": tta_kind_accuracy(model, tta, builder, kinds, False, tta_num_frames / 50),
        "tta_gen_kind_acc_uncond": tta_kind_accuracy(model, tta, builder, kinds, True, tta_num_frames / 50),
        "audio_qa_exact_match": audio_qa_accuracy(model, qa),
        "tta_reference_kind_acc": reference_kind_accuracy(tta, kinds),
    }


def text_gate_reports(runs: Path, stages: list[str]) -> list[dict]:
    reports = []
    for stage in stages:
        path = runs / stage / "text_gate.json"
        if path.exists():
            reports.append(json.loads(path.read_text()))
    return reports


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "demo_data")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--model", type=Path, default=None, help="trained .nemo (default: the last stage's)")
    parser.add_argument("--baseline", type=Path, default=None, help="untrained .nemo (default: DATA/tiny_init.nemo)")
    parser.add_argument("--stages", nargs="+", default=["stage0_text", "stage1", "stage2", "stage3"])
    parser.add_argument("--tta-num-frames", type=int, default=50, help="TTA answer frames the demo trained on")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model_path = args.model or args.runs / args.stages[-1] / f"{args.stages[-1]}.nemo"
    baseline_path = args.baseline or args.data / "tiny_init.nemo"
    trained = evaluate(load_model(model_path, device="cpu"), args.data, args.tta_num_frames)
    untrained = evaluate(load_model(baseline_path, device="cpu"), args.data, args.tta_num_frames)

    print("\n=== Audex demo: what the tiny model learned (held-out test data) ===")
    print(f"{'metric':<44}{'untrained':>12}{'trained':>12}")
    rows = [("ASR WER, held-out sentences (lower is better)", "asr_wer"),
            ("ASR WER when given silence (grammar only)", "asr_wer_given_silence"),
            ("TTS speech-token accuracy, with transcript", "tts_token_acc_cond"),
            ("TTS speech-token accuracy, unconditional", "tts_token_acc_uncond"),
            ("TTA audio-token accuracy, with caption", "tta_token_acc_cond"),
            ("TTA audio-token accuracy, unconditional", "tta_token_acc_uncond"),
            ("TTS generated speech tokens = reference", "tts_gen_acc_cond"),
            ("  same, unconditional", "tts_gen_acc_uncond"),
            ("TTA generated audio is the captioned kind", "tta_gen_kind_acc_cond"),
            ("  same, unconditional (chance 1/8)", "tta_gen_kind_acc_uncond"),
            ("  (real test clips: the classifier's ceiling)", "tta_reference_kind_acc"),
            ("audio QA exact match", "audio_qa_exact_match")]
    for label, key in rows:
        print(f"{label:<44}{untrained[key]:>12.3f}{trained[key]:>12.3f}")
    for ref, hyp in trained["asr_examples"]:
        print(f"  ASR  ref: {ref!r}\n       hyp: {hyp!r}")
    gates = text_gate_reports(args.runs, args.stages)
    print("\n=== text-regression gate (held-out text chats; loss in nats/token, gated; top-1 token accuracy) ===")
    print(f"{'stage':<14}{'loss start':>11}{'loss end':>10}{'change':>10}{'acc start':>11}{'acc end':>9}  verdict")
    for g in gates:
        s, e = g["start"].get(g["text_task"]), g["end"].get(g["text_task"])
        if s and e:
            verdict = "REGRESSED" if g["regressed"] else "ok"
            print(f"{g['stage']:<14}{s['loss']:>11.4f}{e['loss']:>10.4f}{g['text_relative_change']:>+10.2%}"
                  f"{s['token_accuracy']:>11.3f}{e['token_accuracy']:>9.3f}  {verdict}")
    summary = {"trained": {k: v for k, v in trained.items() if k != "asr_examples"},
               "untrained": {k: v for k, v in untrained.items() if k != "asr_examples"},
               "text_gate": {g["stage"]: g["text_relative_change"] for g in gates},
               "text_gate_token_accuracy": {g["stage"]: [g["start"][g["text_task"]]["token_accuracy"],
                                                         g["end"][g["text_task"]]["token_accuracy"]]
                                            for g in gates if g["text_task"] in g["start"] and g["text_task"] in g["end"]}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
