#!/usr/bin/env python
"""Training throughput of the tiny model: packed rows vs padded batches of the same samples, side by side.

Both modes train on exactly the same samples, in the same order, with the same token budget per micro-batch:

* **padded** -- one sample per row, rows padded to the longest in the batch (Lhotse's ``TokenConstraint``
  counting padded tokens: a batch grows while ``rows x longest <= budget``), no bucketing;
* **packed** -- the online balanced-greedy packer of :mod:`audex.data.packing` fills rows of ``--max-length``
  tokens; samples never attend across their boundaries (``sample_ids``).

One micro-batch is forward + square-averaged loss + backward on the stage3 trainable set (adapter + LLM). The figure of merit is *real* tokens per second (tokens that belong to a sample, padding excluded).
Samples follow the paper's length mix (``--mix paper``, the default: Table 2's task shares; TTS 2-20 s of speech
codes, TTA 2,000 codes, 2-30 s of input audio, text chats log-uniform up to 16K tokens in rows of 16,384 --
the paper's 32K chats in rows of 262,144, scaled to a CPU) or come from the demo manifests (``--mix demo``: narrow lengths, so less padding to save).
The last line is JSON.

    python bench/train_throughput.py                 # the paper's length mix, rows of 16,384 tokens (~80 s)
    python bench/train_throughput.py --mix demo      # the demo's samples, rows of 1,024
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from lhotse import CutSet, Recording

from audex.data import schema
from audex.data.collate import collate_padded
from audex.data.packing import OnlinePacker
from audex.data.sequence import SequenceBuilder
from audex.models.checkpoint import load_model
from audex.training.stages import apply_stage

ROOT = Path(__file__).resolve().parents[1]

TASKS = ("text", "asr", "audio_qa", "tts", "tta")


def demo_cuts(data: Path, per_task: int, rng: random.Random):
    cuts = []
    for task in TASKS:
        path = data / "manifests" / f"{task}_train.jsonl.gz"
        if not path.exists():
            return None
        items = list(CutSet.from_file(path))
        rng.shuffle(items)
        cuts += items[:per_task]
    return cuts


# Table 2 of the paper: examples per task (millions); AST and audio understanding read as ASR-like audio input
PAPER_SHARES = {"tts": 147, "tta": 12, "audio_in": 95 + 58 + 49, "text": 33}


def paper_mix_cuts(num_samples: int, rng: random.Random, vocab, audio_dir: Path, max_text_tokens: int):
    """The paper's length mix (section 4, Table 2 shares), scaled to a CPU: TTS 2-20 s of speech at 50 tokens/s,
    TTA 2,000 tokens (10 s), audio-input tasks on 2-30 s of audio (25 frames/s), text chats log-uniform from 200
    to ``max_text_tokens`` tokens (the paper: 32K)."""
    words = "the red fox finds three keys near a quiet river while birds sing in tall green trees".split()
    np_rng = np.random.default_rng(rng.randrange(2**31))
    total = sum(PAPER_SHARES.values())
    counts = {k: max(1, round(num_samples * v / total)) for k, v in PAPER_SHARES.items()}
    cuts = []
    for i in range(counts["text"]):
        n_words = int(math.exp(rng.uniform(math.log(200), math.log(max_text_tokens)))) // 2
        cuts.append(schema.make_text_cut(f"text{i}", [
            {"role": "user", "content": " ".join(rng.choice(words) for _ in range(12))},
            {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(n_words))}]))
    for i in range(counts["tts"]):
        seconds = rng.uniform(2, 20)
        text = " ".join(rng.choice(words) for _ in range(int(seconds * 2.5)))
        cuts.append(schema.make_tts_cut(text, speech_codes=np_rng.integers(0, vocab.speech_codebook_size,
                                                                          int(seconds * 50)), cut_id=f"tts{i}"))
    for i in range(counts["tta"]):
        cuts.append(schema.make_tta_cut(" ".join(rng.choice(words) for _ in range(8)), cut_id=f"tta{i}",
                                        audio_codes=np_rng.integers(0, vocab.audio_codebook_size, (4, 500))))
    for i in range(counts["audio_in"]):
        path = audio_dir / f"a{i}.wav"
        sf.write(path, (0.1 * np_rng.standard_normal(int(rng.uniform(2, 30) * 16000))).astype(np.float32), 16000)
        cuts.append(schema.make_asr_cut(Recording.from_file(path), " ".join(rng.choice(words) for _ in range(20)),
                                        "en", cut_id=f"asr{i}"))
    return cuts


def padded_batches(sequences, budget: int, pad_id: int):
    """Dynamic batches by padded tokens (rows x longest <= budget), in stream order: no bucketing."""
    batch, longest = [], 0
    for seq in sequences:
        new_longest = max(longest, len(seq))
        if batch and new_longest * (len(batch) + 1) > budget:
            yield collate_padded(batch, pad_id)
            batch, new_longest = [], len(seq)
        batch.append(seq)
        longest = new_longest
    if batch:
        yield collate_padded(batch, pad_id)


def run(model, batches, warmup: int) -> tuple[float, int, int, float]:
    """Forward + loss + backward on every batch (the optimizer step is a per-step constant, the same for both
    modes, and is left out); returns (seconds after warm-up, real tokens after warm-up, micro-batches, fill)."""
    apply_stage(model, {"name": "bench", "trainable": ["adapter", "llm"]})
    model.train()
    seconds, real, positions = 0.0, 0, 0
    for i, batch in enumerate(batches):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss, _ = model.compute_loss(batch)
        loss.backward()
        if i >= warmup:
            seconds += time.perf_counter() - start
            real += batch.num_real_tokens
            positions += batch.input_ids.numel()
    return seconds, real, len(batches), real / max(positions, 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mix", choices=("paper", "demo"), default="paper",
                        help="paper: the paper's length mix (synthetic); demo: samples of demo_data/ manifests")
    parser.add_argument("--data", type=Path, default=ROOT / "demo_data")
    parser.add_argument("--model", type=Path, default=ROOT / "demo_data" / "tiny_init.nemo",
                        help="a .nemo to benchmark (default: the demo's initial model, when it exists)")
    parser.add_argument("--model-config", type=Path, default=ROOT / "conf" / "model" / "tiny.yaml",
                        help="model YAML used when --model does not exist")
    parser.add_argument("--samples", type=int, default=160, help="samples in the stream")
    parser.add_argument("--max-length", type=int, default=None,
                        help="packed row length = padded token budget per micro-batch (paper mix: 16,384; demo: 1,024)")
    parser.add_argument("--tta-num-frames", type=int, default=None,
                        help="TTA answer frames (paper mix: 500 = 10 s; demo: 50, as the demo trains)")
    parser.add_argument("--attention", choices=("varlen", "dense"), default="varlen",
                        help="varlen: attention per sample (training's default); dense: one masked [L, L] per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    max_length = args.max_length or (16384 if args.mix == "paper" else 1024)
    tta_frames = args.tta_num_frames or (500 if args.mix == "paper" else 50)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    model = load_model(args.model if args.model.exists() else args.model_config, device="cpu").train()
    builder = SequenceBuilder(model.tokenizer, model.frames_for_samples, max_length=max_length,
                              tta_num_frames=tta_frames)
    tmp = tempfile.TemporaryDirectory()
    if args.mix == "demo":
        cuts = demo_cuts(args.data, max(1, args.samples // len(TASKS)), rng)
        if cuts is None:
            raise SystemExit(f"no demo manifests under {args.data}: run scripts/make_demo_data.py or use --mix paper")
        source = f"demo data ({args.data})"
    else:
        cuts = paper_mix_cuts(args.samples, rng, model.vocab, Path(tmp.name), max_text_tokens=max_length - 300)
        source = "paper's length mix (Table 2 shares; text chats up to %d tokens)" % (max_length - 300)
    sequences = [builder(c) for c in cuts]
    rng.shuffle(sequences)
    pad_id = model.tokenizer.pad_id
    packed = list(OnlinePacker(max_length, pad_id, buffer_size=len(sequences), rows_per_batch=1,
                               pad_to_multiple_of=8)(sequences))
    padded = list(padded_batches(sequences, max_length, pad_id))
    assert sum(b.num_samples for b in packed) == sum(b.num_samples for b in padded) == len(sequences)

    if args.attention == "varlen":
        model.use_packed_attention("varlen")  # what training uses (model.packed_attention: varlen)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for name, batches in (("padded", padded), ("packed", packed)):
        model.load_state_dict(initial)  # both modes start from the same weights
        seconds, real, n, fill = run(model, batches, args.warmup)
        results[name] = {"real_tokens_per_s": real / seconds, "micro_batches": n, "real_token_share": fill,
                         "seconds": seconds}

    lengths = [len(s) for s in sequences]
    print(f"tiny model, {len(sequences)} samples from the {source}: lengths {min(lengths)}-{max(lengths)} tokens, "
          f"mean {sum(lengths) / len(lengths):.0f}; token budget per micro-batch {max_length}; "
          f"{args.attention} attention; {torch.get_num_threads()} threads")
    print(f"{'mode':<8}{'micro-batches':>15}{'real-token share':>18}{'real tokens/s':>16}")
    for name in ("padded", "packed"):
        r = results[name]
        print(f"{name:<8}{r['micro_batches']:>15}{r['real_token_share']:>18.1%}{r['real_tokens_per_s']:>16.0f}")
    ratio = results["packed"]["real_tokens_per_s"] / results["padded"]["real_tokens_per_s"]
    print(f"packed / padded: {ratio:.2f}x (goal >= 1.5x)")
    summary = {"packed_tokens_per_s": round(results["packed"]["real_tokens_per_s"], 1),
               "padded_tokens_per_s": round(results["padded"]["real_tokens_per_s"], 1),
               "packed_real_token_share": round(results["packed"]["real_token_share"], 4),
               "padded_real_token_share": round(results["padded"]["real_token_share"], 4),
               "packed_over_padded": round(ratio, 3)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
