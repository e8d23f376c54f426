"""Triton endpoint vs direct in-process calls of the same Audex local engine, on the same mixed requests.

Both sides run :class:`~audex.serving.local_engine.LocalEngine` on the same weights with one torch thread: through
the real Triton server (python backend, handler worker, dynamic batching) from ``--concurrency`` client threads over
HTTP/gRPC, and in this process from the same number of threads (one engine call at a time, as one model instance
serves). Prints requests/s and p50/p95 latency side by side; the last line is JSON with ``triton_overhead``
(direct req/s over Triton req/s, minus 1), ``p50_ms``/``p95_ms`` (Triton) and ``failures``.

    python bench/serve.py --requests 200 --concurrency 8

``--layout gpu`` measures the GPU ensemble instead (preprocessing -> LLM with CFG pairs -> postprocessing) against
the same three step handlers chained in this process, built from the very ``config.pbtxt`` parameters the server
reads, and against PyTorch eager: :class:`~audex.serving.local_engine.LocalEngine` (Audex's own KV-cached generation)
on the same device, ``--concurrency`` requests per call (``eager_rps``, ``speedup_vs_eager`` = Triton req/s over eager
req/s; the issue's goal is >= 3 on a GPU). ``--executor torch`` (default) runs the LLM step on the CPU references;
``--executor tensorrt_llm --runtime pytorch`` runs TensorRT-LLM's LLM API (PyTorch backend) on a GPU:

    python bench/serve.py --layout gpu --runtime pytorch --executor tensorrt_llm --requests 256 --concurrency 64

That GPU command is written and was never run (no GPU was lent to the session that wrote it); only the CPU
references have been measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from audex import config_path
from audex.export.bundle import export_bundle
from audex.models.checkpoint import load_model
from audex.serving.client import AudexTritonClient
from audex.serving.local_engine import LocalEngine
from audex.serving.requests import ServeLimits, ServeRequest
from audex.serving.triton.handlers import LlmHandler, PostprocessingHandler, PreprocessingHandler
from audex.serving.triton.launcher import TritonServer
from audex.serving.triton.repository import ModelSummary, write_cpu_repository, write_gpu_repository
from audex.serving.triton.repository_check import read_config
from audex.serving.triton.worker import run_one

LIMITS = ServeLimits(max_audio_seconds=30.0, max_new_tokens=16, max_speech_seconds=0.5, tta_seconds=0.2)


def make_requests(n: int) -> list[ServeRequest]:
    out = []
    for i in range(n):
        task = ("asr", "chat", "tts", "tta")[i % 4]
        if task == "asr":
            t = np.arange(int((0.5 + 0.1 * (i % 5)) * 16000)) / 16000
            audio = torch.from_numpy((0.3 * np.sin(2 * np.pi * (200 + i) * t)).astype(np.float32))
            out.append(ServeRequest(task="asr", audio=audio))
        elif task == "chat":
            out.append(ServeRequest(task="chat", text=f"question {i}", seed=i, max_new_tokens=8))
        else:
            out.append(ServeRequest(task=task, text=f"sentence number {i}", seed=i))
    return out


def run_load(call, requests, concurrency: int) -> tuple[list[float], int, float]:
    latencies, failures, lock, queue = [], [0], threading.Lock(), list(range(len(requests)))

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop()
            start = time.perf_counter()
            try:
                call(requests[i])
                with lock:
                    latencies.append(time.perf_counter() - start)
            except Exception:  # noqa: BLE001 - counted
                with lock:
                    failures[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, failures[0], time.perf_counter() - t0


def gpu_ensemble(model, work: Path, executor: str = "torch", runtime: str = "engine", max_batch_size: int = 8):
    """The GPU repository over an export of ``model``, and the direct chain of its handlers."""
    cfg = OmegaConf.load(config_path("export.yaml"))
    cfg.trtllm.dtype = "float32" if executor == "torch" else "bfloat16"
    export_bundle(model, work / "export", cfg)
    build = {**OmegaConf.to_container(cfg.trtllm.build, resolve=True), "max_batch_size": max_batch_size}
    build["max_prompt_embedding_table_size"] = max_batch_size * 750
    repo = write_gpu_repository(work / "repo", work / "export", ModelSummary.from_export(work / "export"),
                                executor=executor, runtime=runtime, max_batch_size=max_batch_size, limits=LIMITS,
                                build=build, prompt_table_dtype=cfg.trtllm.dtype)

    def params(name):
        out = {k: v.string_value for k, v in read_config(repo / name / "config.pbtxt").parameters.items()}
        return out | {"model_dir": str(repo / name / "1"), "decoupled": "false"}

    pre, llm, post = (PreprocessingHandler(params("preprocessing")), LlmHandler(params("tensorrt_llm")),
                      PostprocessingHandler(params("postprocessing")))

    def direct(req):
        inputs = {"task": np.array([[req.task.encode()]], dtype=np.object_)}
        if req.text is not None:
            inputs["text"] = np.array([[req.text.encode()]], dtype=np.object_)
        if req.audio is not None:
            inputs["audio"] = req.audio.numpy().reshape(1, -1)
        for name, value, dtype in (("max_new_tokens", req.max_new_tokens, np.int32), ("seed", req.seed, np.uint64)):
            if value is not None:
                inputs[name] = np.array([[value]], dtype)
        generated = run_one(llm, run_one(pre, inputs))
        run_one(post, {k: generated[k] for k in ("output_ids", "sequence_length", "output_kind")})

    return repo, direct, llm.close


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", default=str(config_path("model", "tiny.yaml")), help=".nemo, folder or YAML")
    parser.add_argument("--layout", choices=["cpu", "gpu"], default="cpu",
                        help="cpu: the one-model CPU repository; gpu: the ensemble with CFG pairs")
    parser.add_argument("--executor", choices=["torch", "tensorrt_llm"], default="torch",
                        help="gpu layout: the CPU references (torch) or TensorRT-LLM (a GPU host)")
    parser.add_argument("--runtime", choices=["engine", "pytorch"], default="engine",
                        help="gpu layout: executor bindings over an engine, or the LLM API (PyTorch backend)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="audex_bench_serve_"))
    model_path = Path(args.model)
    torch.manual_seed(0)
    model = load_model(model_path, device="cpu")
    if model_path.suffix in (".yaml", ".yml"):  # freeze the random weights so both sides share them
        model_path = work / "model.nemo"
        model.save_to(str(model_path))
    requests = make_requests(args.requests)

    engine, engine_lock = LocalEngine(model, LIMITS), threading.Lock()

    def direct(req):  # the CPU layout's direct path: one engine call at a time, as one model instance serves
        with engine_lock:
            [res] = engine.run([req])
        if res.error:
            raise RuntimeError(res.error)

    eager_rps = None
    if args.layout == "gpu":
        device = "cuda" if args.executor == "tensorrt_llm" else "cpu"
        eager = LocalEngine(model.to(device), LIMITS)
        t0 = time.perf_counter()
        for i in range(0, len(requests), args.concurrency):           # eager: batches of --concurrency requests
            failures = [r for r in eager.run(requests[i:i + args.concurrency]) if r.error]
            assert not failures, failures[0].error
        eager_rps = len(requests) / (time.perf_counter() - t0)
        model.to("cpu")
        repo, direct, close = gpu_ensemble(model, work, args.executor, args.runtime,
                                           max_batch_size=max(8, args.concurrency))
        model_name = "ensemble"
    else:
        repo = write_cpu_repository(work / "repo", model_path, limits=LIMITS)
        model_name, close = "audex", (lambda: None)
    with TritonServer(repo, workdir=work / "server") as server:
        clients = threading.local()

        def through_triton(req):
            if not hasattr(clients, "c"):
                clients.c = AudexTritonClient(server.http_url, "http", model_name=model_name)
            clients.c.infer(req.task, text=req.text, audio=None if req.audio is None else req.audio.numpy(),
                            max_new_tokens=req.max_new_tokens, seed=req.seed)

        run_load(through_triton, requests[:8], 4)                   # warm-up
        t_lat, t_fail, t_wall = run_load(through_triton, requests, args.concurrency)
    run_load(direct, requests[:8], 4)
    d_lat, d_fail, d_wall = run_load(direct, requests, args.concurrency)
    close()

    def stats(lat, wall):
        ms = np.array(lat) * 1000
        return len(lat) / wall, float(np.percentile(ms, 50)), float(np.percentile(ms, 95))

    t_rps, t_p50, t_p95 = stats(t_lat, t_wall)
    d_rps, d_p50, d_p95 = stats(d_lat, d_wall)
    print(f"{'path':<10}{'req/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'failures':>10}")
    print(f"{'triton':<10}{t_rps:>10.2f}{t_p50:>10.1f}{t_p95:>10.1f}{t_fail:>10d}")
    print(f"{'direct':<10}{d_rps:>10.2f}{d_p50:>10.1f}{d_p95:>10.1f}{d_fail:>10d}")
    print(json.dumps({"triton_overhead": round(d_rps / t_rps - 1.0, 4), "p50_ms": round(t_p50, 2),
                      "p95_ms": round(t_p95, 2), "failures": t_fail + d_fail, "requests": args.requests,
                      "concurrency": args.concurrency, "direct_p50_ms": round(d_p50, 2), "direct_rps": round(d_rps, 3),
                      "triton_rps": round(t_rps, 3), "layout": args.layout, "executor": args.executor,
                      "runtime": args.runtime,
                      **({"eager_rps": round(eager_rps, 3), "speedup_vs_eager": round(t_rps / eager_rps, 3)}
                         if eager_rps else {})}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
