"""Audex evaluation harness: the paper's benchmarks (section 5, appendix A) as runnable suites.

* :mod:`audex.eval.metrics` — WER (jiwer), BLEU (sacrebleu), COMET (unbabel-comet, local checkpoint), Fréchet
  distance, speaker similarity;
* :mod:`audex.eval.normalize` — the Open ASR leaderboard's text normalisation (whisper-normalizer);
* :mod:`audex.eval.answers` — answer extraction for multiple choice, yes/no/maybe and ``\\boxed{}``;
* :mod:`audex.eval.noise` — noisy speech at a requested SNR;
* :mod:`audex.eval.reference` — the paper's published numbers (Tables 1, 6-13) as data;
* :mod:`audex.eval.samples`, :mod:`audex.eval.engine`, :mod:`audex.eval.suites`, :mod:`audex.eval.report` —
  inputs, the generation engine adapter, the suites and their summaries.

Command line: ``python examples/audex_eval.py model=audex.nemo suite=asr manifest=test_clean.jsonl.gz``.
"""
