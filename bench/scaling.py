#!/usr/bin/env python
"""Scale-out throughput of engine ``hf``: 2-process TP and FSDP2 against 1 process (CPU), or MFU on one GPU.

**CPU (default)**: one training step = forward + eq.-free token-mean loss + backward + AdamW on a small Llama
(``--hidden``/``--layers``; rows of ``--length`` tokens). The same work -- ``--rows`` rows per step -- runs

* in 1 process with ``torch`` using ``--world`` threads (the whole CPU budget),
* with TP=2 (transformers' Llama plan, :func:`audex.parallel.hf_engine.load_tensor_parallel`): both ranks on
  all rows, 1 thread each,
* with FSDP2 over 2 data-parallel ranks (:func:`audex.parallel.hf_engine.fully_shard_backbone`): half the rows
  each, 1 thread each (gloo all-gathers and reduce-scatters over loopback TCP).

and prints tokens/s of each and the ratios. On a CPU, the ratios say what the sharding machinery costs when
there is no fast interconnect and no spare compute: TP splits the matmuls but adds two all-reduces per layer;
FSDP adds a gather and a reduce-scatter of every weight. They are not a prediction of GPU scaling.
The last line is JSON: ``{"tp2_over_1proc": ..., "fsdp2_over_1proc": ...}``.

**GPU** (``--gpu``, needs CUDA; not run on the project's CPU machines): MFU of one training step of the
2B-shaped backbone (``conf/model/audex_2b.yaml``: 28 layers, d=2048, GQA 16/4, vocab 205,312) in BF16 on rows of
``--gpu-length`` tokens, FLOPs counted as 6·N·tokens (matmul weights, lm-head included) + causal attention
12·layers·d_attn·s²/2 per row, against ``--peak-tflops`` (H100 SXM dense BF16: 989). Last line JSON with ``mfu``.

    python bench/scaling.py                       # CPU, ~1 minute
    python bench/scaling.py --gpu --steps 20      # one H100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoConfig, AutoModelForCausalLM

from audex.models.sizing import build_on_meta
from audex.parallel.config import ParallelismConfig
from audex.parallel.hf_engine import fully_shard_backbone, load_tensor_parallel

ROOT = Path(__file__).resolve().parents[1]


def llama_config(args):
    return AutoConfig.for_model("llama", vocab_size=args.vocab, hidden_size=args.hidden,
                                intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=args.length)


def batch(args, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab, (rows, args.length), generator=g)


def train_steps(lm, ids, steps: int) -> float:
    """Seconds per step (median of ``steps`` after one warm-up step)."""
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-4)
    lm.train()
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = lm(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dist.is_initialized():
            dist.barrier()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def worker(rank: int, world: int, tmp: str, mode: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous_{mode}", rank=rank, world_size=world)
    try:
        if mode == "tp":
            lm = load_tensor_parallel(f"{tmp}/llama", ParallelismConfig(world_size=world, tensor=world))
            ids = batch(args, args.rows)
        else:
            lm = AutoModelForCausalLM.from_pretrained(f"{tmp}/llama", local_files_only=True)
            fully_shard_backbone(lm, init_device_mesh("cpu", (world,)))
            ids = batch(args, args.rows)[rank::world]              # disjoint halves: data parallel
        seconds = train_steps(lm, ids, args.steps)
        if rank == 0:
            Path(tmp, f"{mode}.json").write_text(json.dumps({"seconds": seconds}))
    finally:
        dist.destroy_process_group()


def cpu_bench(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(llama_config(args)).save_pretrained(f"{tmp}/llama")
        torch.set_num_threads(args.world)
        one = train_steps(AutoModelForCausalLM.from_pretrained(f"{tmp}/llama", local_files_only=True),
                          batch(args, args.rows), args.steps)
        out = {"1proc": one}
        for mode in ("tp", "fsdp"):
            mp.spawn(worker, args=(args.world, tmp, mode, args), nprocs=args.world, join=True)
            out[mode] = json.loads(Path(tmp, f"{mode}.json").read_text())["seconds"]
    tokens = args.rows * args.length
    result = {f"{k}_tokens_per_s": round(tokens / v, 1) for k, v in out.items()}
    result |= {"tp2_over_1proc": round(out["1proc"] / out["tp"], 3),
               "fsdp2_over_1proc": round(out["1proc"] / out["fsdp"], 3)}
    return result


def gpu_bench(args) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device (this machine has none): run it on a GPU node")
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "audex_2b.yaml")
    vocab = build_on_meta(cfg)[0]
    hf_cfg = AutoConfig.for_model("llama", **{**OmegaConf.to_container(cfg.backbone.config), "vocab_size": vocab.size})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        lm = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    if args.compile:
        lm = torch.compile(lm)
    n_params = sum(p.numel() for p in lm.parameters())
    ids = torch.randint(0, vocab.size, (args.gpu_rows, args.gpu_length), device="cuda")
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-5, fused=True)
    positions = torch.arange(args.gpu_length, device="cuda").expand_as(ids)
    times = []
    for i in range(args.steps + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        lm(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    c = hf_cfg
    tokens = args.gpu_rows * args.gpu_length
    attn = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * args.gpu_length ** 2 / 2 * args.gpu_rows
    flops = 6 * n_params * tokens + attn      # tied embedding: the lookup is free, the head matmul is counted once
    mfu = flops / seconds / (args.peak_tflops * 1e12)
    return {"params": n_params, "tokens_per_step": tokens, "seconds_per_step": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds), "mfu": round(mfu, 4), "gpu": torch.cuda.get_device_name(),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="MFU of a 2B-shaped step on one CUDA GPU")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gpu-length", type=int, default=4096)
    ap.add_argument("--gpu-rows", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "0" if args.compile else "1")
    result = gpu_bench(args) if args.gpu else cpu_bench(args)
    for key, value in result.items():
        print(f"{key:>24}: {value}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
