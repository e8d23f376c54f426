"""Real-token share of padded, bucketed and packed batches on the paper's length mix, side by side in one run,
and the throughput of the whole data pipeline.

**Length mix** (section 4 of the paper; example shares of Table 2's sample counts: TTS 147M, TTA 12M, audio
understanding 49M, ASR 95M, AST 58M, text 33M):

* TTS: 2-20 s of speech at 50 codec tokens/s + its transcript (~3.5 tokens/s) + the chat template;
* TTA: 2,000 codec tokens (10 s x 50 Hz x 4 RVQ layers) + a caption;
* ASR / AST / audio understanding: 2-30 s of audio at 25 encoder frames/s + transcript (AST: and translation;
  understanding: a question and an answer);
* text chats: 200-32K tokens (log-uniform).

**Batching** (the same stream of ``--samples`` examples each time):

* (a) padded, no bucketing: Lhotse ``DynamicCutSampler`` under a ``TokenConstraint`` of ``max_length`` padded
  tokens per batch (the memory of one packed row), each batch padded to its longest example;
* (b) padded, bucketed: Lhotse ``DynamicBucketingSampler`` (30 buckets, NeMo's default), same constraint;
* (c) packed: :class:`~audex.data.packing.OnlinePacker` (balanced greedy knapsack, 8,192-sample buffer) into
  rows padded to exactly ``max_length`` (static shapes; the conservative count);
* (d) the same with ``extra_bins`` = Megatron-LM's ``delta`` (``--extra-bins``, 20 is Megatron's default): the
  share and the spread of the row fills (min and 1st percentile of real tokens per row).

Share = real tokens / all positions of the batch tensors, over the whole stream.

**Throughput**: the whole training loader, ``build_dataloader`` with ``--workers`` dataloader processes (2 cores):
the paper's filters, the exact length of every example, the sampler, the sequence builder (tiny BPE tokenizer,
base64 codec codes, WAV files decoded by Lhotse, the paper's 750 encoder frames per started 30 s window), online
packing and the ``PackedBatch`` tensors, on ``--pipeline-samples`` cuts of the same mix written to a manifest.
(The encoder's 30 s windows make every clip of <= 30 s cost 750 frames, so the pipeline's rows hold fewer,
longer ASR samples than the 25 frames/s of the share measurement.)

    python bench/packing.py                # ~20 s on 2 cores

The last line is a JSON object: ``real_token_share_padded``, ``real_token_share_bucketed``,
``real_token_share_packed``, ``real_token_share_packed_extra_bins`` (per delta), ``samples_per_s``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from lhotse import CutSet, MonoCut, Recording
from lhotse.dataset import DynamicBucketingSampler, DynamicCutSampler
from lhotse.dataset.sampling.base import TokenConstraint

from audex.data import schema
from audex.data.loader import build_dataloader
from audex.data.packing import PAPER_CONTEXT_LENGTH, PAPER_PACKING_BUFFER, OnlinePacker
from audex.modules.audio_encoder import WindowedFrames
from audex.tokenizer import AudexTokenizer

ROOT = Path(__file__).resolve().parents[1]

# Table 2: samples per task (millions)
TASK_SAMPLES_M = {"tts": 147, "tta": 12, "audio_qa": 49, "asr": 95, "ast": 58, "text": 33}
TEMPLATE_TOKENS = 30  # system + user + assistant markers of the chat template
TEXT_TOKENS_PER_S = 3.5


def sample_task_lengths(rng: np.random.Generator, n: int) -> tuple[list[str], list[int]]:
    """``n`` (task, token length) pairs of the paper's mix."""
    names = list(TASK_SAMPLES_M)
    p = np.array([TASK_SAMPLES_M[t] for t in names], dtype=float)
    tasks = rng.choice(names, size=n, p=p / p.sum())
    lengths = []
    for task in tasks:
        if task == "tts":
            d = rng.uniform(2, 20)
            n_tok = 50 * d + TEXT_TOKENS_PER_S * d + 2
        elif task == "tta":
            n_tok = 2000 + rng.integers(8, 30) + 2
        elif task in ("asr", "ast"):
            d = rng.uniform(2, 30)
            n_tok = 25 * d + 2 + TEXT_TOKENS_PER_S * d * (2 if task == "ast" else 1)
        elif task == "audio_qa":
            d = rng.uniform(2, 30)
            n_tok = 25 * d + 2 + rng.integers(20, 200)
        else:
            n_tok = math.exp(rng.uniform(math.log(200), math.log(32000)))
        lengths.append(int(n_tok) + TEMPLATE_TOKENS)
    return [str(t) for t in tasks], lengths


def length_cuts(lengths: list[int]) -> CutSet:
    """Metadata-only cuts that carry their token length (what Lhotse's TokenConstraint reads)."""
    return CutSet.from_cuts(MonoCut(id=f"s{i}", start=0.0, duration=0.0, channel=0, recording=None,
                                    custom={"num_tokens": n}) for i, n in enumerate(lengths))


def padded_share(sampler) -> tuple[float, int]:
    real = positions = batches = 0
    for batch in sampler:
        lens = [c.num_tokens for c in batch]
        real += sum(lens)
        positions += len(lens) * max(lens)
        batches += 1
    return real / positions, batches


@dataclass
class _Length:
    """A stand-in for a built sequence: packing only looks at its length."""

    n: int
    cut_id: str

    def __len__(self) -> int:
        return self.n


def packed_fills(lengths: list[int], max_length: int, buffer_size: int, extra_bins: int = 0) -> list[int]:
    """Real tokens of every packed row."""
    packer = OnlinePacker(max_length, pad_id=0, buffer_size=buffer_size, extra_bins=extra_bins)
    fills = [sum(len(s) for s in row)
             for batch_rows in packer.pack_rows(_Length(n, f"s{i}") for i, n in enumerate(lengths))
             for row in batch_rows]
    assert sum(fills) == sum(lengths), "packing lost samples"
    return fills


def packed_share(lengths: list[int], max_length: int, buffer_size: int, extra_bins: int = 0) -> tuple[float, int]:
    fills = packed_fills(lengths, max_length, buffer_size, extra_bins)
    return sum(fills) / (len(fills) * max_length), len(fills)


# ---- the real pipeline ---------------------------------------------------------------------------
WORDS = "the red fox finds three keys under a blue stone while two birds sing near the old river".split()


def pipeline_cuts(rng: np.random.Generator, n: int, audio_dir: Path) -> list:
    """``n`` real cuts of the mix: chats, base64 codec codes, WAV files on disk."""
    sr = schema.SAMPLE_RATE
    clips = []
    for k, seconds in enumerate([2, 5, 9, 14, 20, 26, 30]):
        path = audio_dir / f"clip{k}.wav"
        sf.write(path, (0.1 * rng.standard_normal(seconds * sr)).astype(np.float32), sr)
        clips.append(Recording.from_file(path))
    tasks, lengths = sample_task_lengths(rng, n)
    cuts = []
    for i, (task, n_tok) in enumerate(zip(tasks, lengths)):
        words = lambda k: " ".join(rng.choice(WORDS, size=max(1, int(k))))  # noqa: E731
        cid = f"{task}-{i}"
        if task == "text":
            half = max(1, (n_tok - TEMPLATE_TOKENS) // 2)
            cuts.append(schema.make_text_cut(cid, [{"role": "user", "content": words(half / 1.5)},
                                                   {"role": "assistant", "content": words(half / 1.5)}]))
        elif task == "tts":
            frames = int((n_tok - TEMPLATE_TOKENS) / 53.5 * 50)
            cuts.append(schema.make_tts_cut(words(frames / 50 * 2.5), speech_codes=rng.integers(0, 256, frames),
                                            cut_id=cid))
        elif task == "tta":
            cuts.append(schema.make_tta_cut(words(8), audio_codes=rng.integers(0, 64, (4, 500)), cut_id=cid))
        else:
            rec = clips[int(rng.integers(len(clips)))]
            if task == "asr":
                cuts.append(schema.make_asr_cut(rec, words(rec.duration * 2.5), "en", cut_id=cid))
            elif task == "ast":
                cuts.append(schema.make_ast_cut(rec, words(rec.duration * 2.5), "de", words(rec.duration * 2.5),
                                                cut_id=cid))
            else:
                cuts.append(schema.make_audio_qa_cut(rec, "What do you hear?", words(20), cut_id=cid))
    return cuts


def pipeline_throughput(cuts: list, tmp: Path, max_length: int, buffer_size: int, workers: int) -> tuple[float, int, float]:
    """Samples/s of ``build_dataloader`` (online packing; ``workers`` dataloader processes) over ``cuts``."""
    CutSet.from_cuts(cuts).to_file(tmp / "mix.jsonl.gz")
    cfg = {"manifest_dir": str(tmp), "max_length": max_length, "blend_epochs": {"mix": 1.0},
           "packing": {"buffer_size": buffer_size}, "max_skip_rate": 0.0,
           "train_ds": {"input_cfg": [{"type": "lhotse", "cuts_path": "mix.jsonl.gz", "blend": "mix"}],
                        "use_multimodal_sampling": True, "batch_size": 64, "shuffle": True, "seed": 0,
                        "num_workers": workers}}
    loader = build_dataloader(cfg, AudexTokenizer.build_tiny(), WindowedFrames(), "train")
    start = time.perf_counter()
    samples = real = positions = 0
    for batch in loader:
        samples += batch.num_samples
        real += batch.num_real_tokens
        positions += batch.num_rows * max_length
    elapsed = time.perf_counter() - start
    return samples / elapsed, samples, real / positions


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4 * PAPER_PACKING_BUFFER, help="examples in the share measurement")
    ap.add_argument("--max-length", type=int, default=PAPER_CONTEXT_LENGTH, help="row length (the paper's context)")
    ap.add_argument("--buffer", type=int, default=PAPER_PACKING_BUFFER, help="packing buffer (samples)")
    ap.add_argument("--pipeline-samples", type=int, default=600, help="cuts run through the real pipeline")
    ap.add_argument("--workers", type=int, default=2, help="dataloader processes of the pipeline (one per core)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra-bins", default="0,5,20", help="Megatron's delta values to compare (comma-separated)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="You are using Dynamic")  # eager length-only CutSets are intended here
    rng = np.random.default_rng(args.seed)

    tasks, lengths = sample_task_lengths(rng, args.samples)
    print(f"length mix: {args.samples} examples, mean {np.mean(lengths):.0f} tokens, max {max(lengths)}; "
          f"rows of {args.max_length} tokens, packing buffer {args.buffer}", flush=True)
    constraint = TokenConstraint(max_tokens=args.max_length)
    t0 = time.perf_counter()
    share_padded, n_padded = padded_share(DynamicCutSampler(length_cuts(lengths), constraint=constraint))
    t1 = time.perf_counter()
    share_bucketed, n_bucketed = padded_share(DynamicBucketingSampler(
        length_cuts(lengths), constraint=TokenConstraint(max_tokens=args.max_length), num_buckets=30,
        shuffle=True, seed=args.seed, num_cuts_for_bins_estimate=args.samples, buffer_size=args.samples))
    t2 = time.perf_counter()
    share_packed, n_rows = packed_share(lengths, args.max_length, args.buffer)
    t3 = time.perf_counter()
    print(f"{'batching':32s} {'real-token share':>17s} {'batches/rows':>13s} {'time':>8s}")
    print(f"{'(a) padded, no bucketing':32s} {share_padded:17.4f} {n_padded:13d} {t1 - t0:7.2f}s")
    print(f"{'(b) padded, bucketed (30)':32s} {share_bucketed:17.4f} {n_bucketed:13d} {t2 - t1:7.2f}s")
    print(f"{'(c) packed, balanced greedy':32s} {share_packed:17.4f} {n_rows:13d} {t3 - t2:7.2f}s")
    print(f"packed / padded = {share_packed / share_padded:.2f}x, packed / bucketed = "
          f"{share_packed / share_bucketed:.2f}x; goal (c) >= 0.98: {'met' if share_packed >= 0.98 else 'MISSED'}",
          flush=True)
    extra_shares = {}
    print(f"{'(d) extra bins (delta)':32s} {'real-token share':>17s} {'rows':>13s} {'min fill':>9s} {'p1 fill':>8s}")
    for delta in (int(x) for x in args.extra_bins.split(",") if x.strip()):
        fills = packed_fills(lengths, args.max_length, args.buffer, delta)
        extra_shares[delta] = round(sum(fills) / (len(fills) * args.max_length), 4)
        print(f"{'    delta = ' + str(delta):32s} {extra_shares[delta]:17.4f} {len(fills):13d} "
              f"{min(fills) / args.max_length:9.3f} {np.percentile(fills, 1) / args.max_length:8.3f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        cuts = pipeline_cuts(rng, args.pipeline_samples, Path(tmp))
        samples_per_s, n, pipe_share = pipeline_throughput(cuts, Path(tmp), args.max_length, args.buffer, args.workers)
    print(f"pipeline (build_dataloader: filters, length measure, sampler, sequence builder, online packing, tensors; "
          f"{args.workers} worker processes build, the main process packs): {n} samples at {samples_per_s:.1f} samples/s; its rows hold "
          f"{pipe_share:.4f} real tokens (a short stream: its last rows are flushed part-full)")
    print(json.dumps({"real_token_share_padded": round(share_padded, 4),
                      "real_token_share_bucketed": round(share_bucketed, 4),
                      "real_token_share_packed": round(share_packed, 4),
                      "real_token_share_packed_extra_bins": extra_shares,
                      "samples_per_s": round(samples_per_s, 1),
                      "max_length": args.max_length, "packing_buffer": args.buffer, "samples": args.samples}))


if __name__ == "__main__":
    main()
