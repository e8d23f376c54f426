"""Evaluation throughput: one suite batched through the generation engine vs one sample at a time.

Runs the same suite on the same samples with the tiny model twice, side by side in one process — with
``batch_size`` samples per engine call, then with one — and prints samples/s of each. Each run starts from an
empty output folder (no resume), after a warm-up run. The model has random weights, so every sample decodes
exactly ``--max-new-tokens`` tokens in both runs.

    python bench/eval_throughput.py                       # asr suite, 32 clips, batch 16, 128 new tokens
    python bench/eval_throughput.py --suite mcq --batch-size 8 --max-new-tokens 32

The gain grows with the batch and the decode length (the encoder and the prefill scale with the batch, the
per-step overhead of decoding does not); measured here on a shared 2-core CPU: batch 8 / 32 tokens ~1.8x,
batch 32 / 64 tokens ~3.0x, batch 16 / 128 tokens ~3.6x.

Last line: a JSON object with ``batched_over_single`` (goal >= 3), the two rates and the settings.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_samples(suite: str, n: int, seconds: float):
    from audex.eval.samples import EvalSample

    samples = []
    for i in range(n):
        t = torch.arange(int(seconds * 16000)) / 16000
        wav = (0.2 * torch.sin(2 * math.pi * (150 + 37 * i) * t) * (1 + torch.sin(2 * math.pi * 3 * t))).float()
        fields = {"text": f"sample number {i} says hello", "question": "What do you hear?",
                  "choices": ["a tone", "speech", "music", "silence"], "answer": "A"}
        samples.append(EvalSample(f"s{i:03d}", fields, None, lambda wav=wav: wav))
    return samples


def timed_run(suite_cls, engine, samples, batch_size: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        suite_cls({}, engine=engine).run(samples, out, "tiny", batch_size=batch_size, resume=False, progress=False)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="asr", choices=["asr", "ast", "mcq", "entailment", "hallucination"])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each generated clip")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="decoded tokens per sample (a transcript of ~40 words in the tiny BPE)")
    parser.add_argument("--model", default=str(ROOT / "conf" / "model" / "tiny.yaml"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: stable numbers on a shared machine; oversubscribed threads make "
                             "batched matmuls spin and the comparison meaningless)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from audex.eval.engine import EvalEngine
    from audex.eval.suites import suite_class
    from audex.models.checkpoint import load_model

    torch.manual_seed(0)
    model = load_model(args.model, args.device)
    preset = {"asr": "asr", "ast": "ast"}.get(args.suite, args.suite)
    engine = EvalEngine(model, seed=0, generation={preset: {"max_new_tokens": args.max_new_tokens}})
    cls = suite_class(args.suite)
    samples = make_samples(args.suite, args.samples, args.seconds)

    timed_run(cls, engine, samples[: args.batch_size], args.batch_size)  # warm-up (allocator, kernels, lazy imports)
    single_s = timed_run(cls, engine, samples, 1)
    batched_s = timed_run(cls, engine, samples, args.batch_size)
    single, batched = args.samples / single_s, args.samples / batched_s

    print(f"suite {args.suite}, {args.samples} samples of {args.seconds:g} s, {args.max_new_tokens} new tokens each, "
          f"device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'mode':<22}{'seconds':>10}{'samples/s':>12}")
    print(f"{'one at a time':<22}{single_s:>10.2f}{single:>12.2f}")
    print(f"{f'batched ({args.batch_size})':<22}{batched_s:>10.2f}{batched:>12.2f}")
    print(f"batched / one at a time: {batched / single:.2f}x (goal >= 3x)")
    print(json.dumps({"batched_over_single": round(batched / single, 3), "samples_per_s_batched": round(batched, 3),
                      "samples_per_s_single": round(single, 3), "suite": args.suite, "samples": args.samples,
                      "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "device": args.device}))


if __name__ == "__main__":
    main()
