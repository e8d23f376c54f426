"""Decoding speed, side by side in one run: our KV-cached decoder vs transformers' ``generate()``, and the cost
of a paired-row CFG step vs a plain step.

For each backbone (the tiny model's, and a ~100M-parameter Llama) on the same prompts and batch:

* ``decode_vs_hf_generate``: greedy tokens/s of :class:`~audex.inference.decoding.AudexDecoder` divided by
  tokens/s of ``model.generate()`` (same prompts, left padding, exactly ``new_tokens`` tokens; goal >= 1.0);
* ``cfg_step_over_plain_step``: time of one decoding step of B CFG pairs (2B rows in one batch) over one step
  of B plain rows (goal <= 1.3); ``two_pass_step_over_plain_step`` is the same for running the
  conditional and unconditional prompts as two separate batches (the ~2x that pairing avoids).

A step's time is the slope between two generation lengths (prefill cancels out); every time is the best of
several interleaved rounds after a warm-up (the machine may be shared; see ``best_times``). The last line printed is a JSON object with both ratios per config and their worst case.

    python bench/decode.py                 # tiny + ~100M, CPU
    python bench/decode.py --device cuda --batch 8 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from audex.inference.decoding import AudexDecoder
from audex.inference.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]

# ~100M parameters: 12 x 6.3M (GQA attention + SwiGLU MLP) + 32,768 x 768 tied embeddings = 101M
LLAMA_100M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32768, max_position_embeddings=4096, tie_word_embeddings=True)


def build_backbones() -> dict[str, torch.nn.Module]:
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    from audex.vocab import AudexVocab

    tiny = yaml.safe_load((ROOT / "conf" / "model" / "tiny.yaml").read_text())
    tiny_cfg = dict(tiny["backbone"]["config"], vocab_size=AudexVocab(**tiny["vocab"]).size)
    torch.manual_seed(0)
    return {"tiny": LlamaForCausalLM(LlamaConfig(**tiny_cfg)).eval(),
            "llama_100m": LlamaForCausalLM(LlamaConfig(**LLAMA_100M)).eval()}


def make_prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [24 + 9 * i for i in range(batch)]  # different lengths: left padding is exercised
    return [torch.randint(10, vocab - 10, (n,), generator=g).tolist() for n in lengths]


def best_times(cases: dict, repeats: int, min_seconds: float) -> dict[str, float]:
    """Best of several rounds per case after a warm-up: at least ``repeats`` rounds, more (up to 50) until the
    rounds took ``min_seconds``. The cases run interleaved within each round, so a burst of load from other
    processes hits all of them alike; the minimum is the least noisy estimate on a shared machine."""
    t0 = time.perf_counter()
    for fn in cases.values():
        fn()
    round_time = time.perf_counter() - t0
    rounds = min(50, max(repeats, int(min_seconds / max(round_time, 1e-6)) + 1))
    best = {name: float("inf") for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def hf_generate(lm, prompts, new_tokens, pad_id):
    from transformers import GenerationConfig

    from audex.inference.decoding import left_pad

    ids, mask = left_pad(prompts, pad_id, lm.device)
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=pad_id, eos_token_id=None, bos_token_id=None)
    with torch.no_grad():
        return lm.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, ids.shape[1]:]


def bench_one(name, lm, batch, new_tokens, repeats, device, min_seconds):
    lm = lm.to(device)
    vocab = lm.config.vocab_size
    pad_id = 0
    prompts = make_prompts(batch, vocab)
    uncond = [[3] * len(p) for p in prompts]  # a twin of the same length, as the TTS/TTA pipelines build
    dec = AudexDecoder(lm, pad_token_id=pad_id, stop_token_ids=[-1])
    greedy = SamplingParams(max_new_tokens=new_tokens)

    ours = dec.generate(prompts, greedy).token_ids
    ref = hf_generate(lm, prompts, new_tokens, pad_id).tolist()
    same_tokens = ours == ref

    short, long_ = max(2, new_tokens // 4), new_tokens
    cfg = SamplingParams(guidance_scale=3.0)

    def plain(n):
        return lambda: dec.generate(prompts, greedy.replace(max_new_tokens=n))

    def paired(n):
        return lambda: dec.generate(prompts, cfg.replace(max_new_tokens=n), uncond_prompts=uncond)

    def two_pass(n):
        return lambda: (dec.generate(prompts, greedy.replace(max_new_tokens=n)),
                        dec.generate(uncond, greedy.replace(max_new_tokens=n)))

    t = best_times({"ours": plain(long_), "hf": lambda: hf_generate(lm, prompts, new_tokens, pad_id),
                    "plain_short": plain(short), "cfg_short": paired(short), "cfg_long": paired(long_),
                    "two_short": two_pass(short), "two_long": two_pass(long_)}, repeats, min_seconds)
    t_ours, t_hf = t["ours"], t["hf"]

    def per_step(t_short, t_long):  # the slope between two lengths: prefill cancels out
        return max(t_long - t_short, 1e-9) / (long_ - short)

    plain_step = per_step(t["plain_short"], t_ours)
    cfg_step = per_step(t["cfg_short"], t["cfg_long"])
    two_pass_step = per_step(t["two_short"], t["two_long"])
    n_params = sum(p.numel() for p in lm.parameters())
    row = {
        "params_M": round(n_params / 1e6, 1),
        "batch": batch,
        "new_tokens": new_tokens,
        "ours_tok_s": round(batch * new_tokens / t_ours, 1),
        "hf_generate_tok_s": round(batch * new_tokens / t_hf, 1),
        "decode_vs_hf_generate": round(t_hf / t_ours, 3),
        "same_tokens_as_hf": same_tokens,
        "plain_step_ms": round(plain_step * 1e3, 3),
        "cfg_step_ms": round(cfg_step * 1e3, 3),
        "cfg_step_over_plain_step": round(cfg_step / plain_step, 3),
        "two_pass_step_over_plain_step": round(two_pass_step / plain_step, 3),
    }
    print(f"{name:>11}: {row['params_M']:6.1f}M params | ours {row['ours_tok_s']:8.1f} tok/s, generate() "
          f"{row['hf_generate_tok_s']:8.1f} tok/s -> {row['decode_vs_hf_generate']:.2f}x (same tokens: {same_tokens}) | "
          f"step: plain {row['plain_step_ms']:.2f} ms, CFG pairs {row['cfg_step_ms']:.2f} ms "
          f"({row['cfg_step_over_plain_step']:.2f}x), two passes {row['two_pass_step_over_plain_step']:.2f}x",
          flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="at least this many timed rounds per config")
    ap.add_argument("--min-seconds", type=float, default=20.0, help="keep adding rounds (up to 50) until this long")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads; 1 keeps OpenMP from oversubscribing a shared CPU, which scrambles the timings")
    ap.add_argument("--configs", nargs="+", default=["tiny", "llama_100m"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbones = build_backbones()
    unknown = set(args.configs) - set(backbones)
    if unknown:
        ap.error(f"unknown configs {sorted(unknown)}; known: {sorted(backbones)}")
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} new_tokens={args.new_tokens} "
          f"rounds>={args.repeats} (best of, interleaved)", flush=True)
    rows = {name: bench_one(name, backbones[name], args.batch, args.new_tokens, args.repeats, args.device,
                            args.min_seconds)
            for name in args.configs}
    summary = {
        "decode_vs_hf_generate": min(r["decode_vs_hf_generate"] for r in rows.values()),
        "cfg_step_over_plain_step": max(r["cfg_step_over_plain_step"] for r in rows.values()),
        "device": args.device,
        "configs": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
