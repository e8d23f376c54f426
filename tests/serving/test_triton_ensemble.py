"""The GPU ensemble (preprocessing -> LLM with CFG pairs -> postprocessing) served by a real Triton server on
loopback, with the PyTorch reference executor in place of TensorRT-LLM's: what a GPU host runs, minus the engine.

Checks: the four tasks over HTTP and gRPC against the in-process generation engine (TTS/TTA with their CFG twin,
lambda from the preset or the request), TTS streamed from the decoupled ensemble, every malformed-request class
refused by name while the server keeps serving, a bounded mixed load with nothing failed or lost, clean shutdown."""

import json
import re
import time
import urllib.request

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from serving_checks import MALFORMED, malformed_inputs, open_client, run_mixed_load, served_limits, start_server, tone
from tritonclient.utils import InferenceServerException

from audex import config_path
from audex.export.bundle import export_bundle
from audex.serving.client import AudexTritonClient
from audex.serving.local_engine import LocalEngine
from audex.serving.requests import ServeRequest
from audex.serving.triton.repository import ModelSummary, write_gpu_repository
from audex.serving.triton.repository_check import validate_repository

LIMITS = served_limits(max_speech_seconds=1.2)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory, triton_server_turn):
    root = tmp_path_factory.mktemp("ensemble")
    cfg = OmegaConf.load(config_path("export.yaml"))
    cfg.trtllm.dtype = "float32"
    export_bundle(tiny_model, root / "export", cfg)
    summary = ModelSummary.from_export(root / "export")
    assert summary == ModelSummary.of(tiny_model)
    # the reference executor gets the engine's build sizes: a 12 s clip is 2 windows = 500 prompt-table rows
    repo = write_gpu_repository(root / "repo", root / "export", summary, executor="torch", max_batch_size=8,
                                limits=LIMITS, build={"max_batch_size": 8, "max_input_len": 2048,
                                                      "max_prompt_embedding_table_size": 8 * 500})
    validate_repository(repo)
    server = start_server(repo, root / "server")
    yield server, LocalEngine(tiny_model, LIMITS)
    server.stop()


@pytest.fixture(params=["http", "grpc"])
def client(served, request):
    server, _ = served
    with open_client(server, request.param, "ensemble") as c:
        yield c



def direct(engine, **kw):
    [res] = engine.run([ServeRequest(**kw)])
    assert res.error is None, res.error
    return res


def test_health_and_readiness_of_every_model(served):
    server, _ = served
    models = ["ensemble", "ensemble_stream", "preprocessing", "tensorrt_llm", "tensorrt_llm_once", "postprocessing",
              "postprocessing_stream"]
    for path in ["/v2/health/live", "/v2/health/ready"] + [f"/v2/models/{m}/ready" for m in models]:
        with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=5) as resp:
            assert resp.status == 200, path
    with AudexTritonClient(server.grpc_url, protocol="grpc", model_name="ensemble") as c:
        assert c.is_ready()


def test_tts_and_tta_decode_as_cfg_pairs_equal_to_the_engine(served, client):
    """lambda from the preset (TTS 1.5, TTA 3) and from the request; lambda = 1 sends no twin."""
    _, engine = served
    for lam in (None, 3.0, 1.0):
        tts = client.tts("Hello there, how are you?", seed=7, guidance_scale=lam)
        ref = direct(engine, task="tts", text="Hello there, how are you?", seed=7, guidance_scale=lam)
        assert tts.audio.size > 0 and tts.audio.size % 320 == 0          # whole 50 Hz codec frames at 16 kHz
        np.testing.assert_allclose(tts.audio, ref.audio.numpy(), atol=1e-5)
    tta = client.tta("A dog barks twice.", seed=3)
    ref = direct(engine, task="tta", text="A dog barks twice.", seed=3)
    assert tta.audio.size == int(0.2 * 16000)                            # 0.2 s = 10 frames x 4 RVQ codes, exactly
    np.testing.assert_allclose(tta.audio, ref.audio.numpy(), atol=1e-5)


def test_asr_and_chat_equal_the_engine(served, client):
    _, engine = served
    audio = tone(1.5, 300.0)
    asr = client.asr(audio)
    ref = direct(engine, task="asr", audio=torch.from_numpy(audio))
    # ASR goes through the ONNX front end (within 1e-3 of PyTorch) and the prompt table
    assert asr.text.strip() and (asr.text == ref.text or asr.text in ref.text or ref.text in asr.text)
    # chat samples (T 1.0) with the executor's own sampler: reproducible by seed, not the engine's draws
    first, again = (client.chat("What is the capital of France?", max_new_tokens=8, seed=11) for _ in range(2))
    assert first.audio.size == 0 and first.text == again.text


def llm_successes(server) -> dict:
    """Requests each LLM-side model has run to the end (Triton's statistics extension)."""
    out = {}
    for model in ("tensorrt_llm", "tensorrt_llm_once"):
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=5) as resp:
            stats = json.loads(resp.read())["model_stats"]
        out[model] = sum(int(s["inference_stats"]["success"]["count"]) for s in stats)
    return out


def test_tts_streams_from_the_decoupled_ensemble(served):
    server, engine = served
    text = "A longer sentence, streamed one second at a time."
    before = llm_successes(server)
    with AudexTritonClient(server.grpc_url, protocol="grpc", model_name="ensemble") as grpc:
        chunks = list(grpc.stream("tts", text=text, seed=5))                          # stream=true
        whole = grpc.tts(text, seed=5)                                                # ensemble: one answer
        once = list(grpc.stream("tts", model_name="ensemble_stream", text=text, seed=5, stream=False))
    audio = [c.audio for c in chunks if c.audio.size]
    assert len(audio) >= 2                                         # 1.2 s cap, 1 s chunks: two pieces
    assert audio[0].size == 50 * 320                               # the first chunk is one second (50 codes)
    assert sum(a.size for a in audio) == whole.audio.size          # chunked decoding, same number of frames
    assert [c.audio.size for c in once if c.audio.size] == [whole.audio.size]   # stream=false: one response
    # the one LLM model (one engine) served all three: the two streams directly, the plain request through the BLS
    # front (which counts as one more request on tensorrt_llm)
    after = llm_successes(server)
    assert after["tensorrt_llm"] - before["tensorrt_llm"] == 3
    assert after["tensorrt_llm_once"] - before["tensorrt_llm_once"] == 1
    with AudexTritonClient(server.http_url, model_name="ensemble") as http, pytest.raises(ValueError, match="grpc"):
        next(http.stream("tts", text="x"))


@pytest.mark.parametrize("case, expected", MALFORMED)
def test_malformed_requests_get_a_named_error_and_the_server_keeps_serving(served, client, case, expected):
    with pytest.raises(InferenceServerException) as err:
        client.infer_inputs(malformed_inputs(client, case))
    assert expected.format(model="ensemble", context=LIMITS.max_context_tokens).lower() in str(err.value).lower()
    assert client.chat("Still there?", max_new_tokens=2).text is not None


def test_bounded_mixed_load_has_no_failures(served):
    server, _ = served
    n = 48                             # bench/serve.py runs the full 200-request version

    def make(protocol):
        return open_client(server, protocol, "ensemble")

    done, failures = run_mixed_load(make, n_requests=n, concurrency=8, budget_s=300.0)
    assert failures == []
    assert done == list(range(n))                               # no request lost


def test_a_client_cancelling_a_stream_cancels_both_twins(served):
    """gRPC stream cancelled after the first chunk: Triton marks the request cancelled, the step model tells the LLM
    handler, which cancels the job (conditional row and twin); the server keeps serving."""
    import queue

    import tritonclient.grpc as grpcclient

    server, _ = served
    c = grpcclient.InferenceServerClient(server.grpc_url)
    with AudexTritonClient(server.grpc_url, protocol="grpc", model_name="ensemble") as audex:
        pre = c.infer("preprocessing", audex.build_inputs("tts", text="Speak for a long while, please."))
        inputs = []
        for out in pre.get_response().outputs:
            array = pre.as_numpy(out.name)
            if out.name == "request_output_len":
                array = np.array([[3000]], np.int32)                 # far beyond the preprocessing limit
            tensor = grpcclient.InferInput(out.name, list(array.shape), out.datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        chunks: queue.Queue = queue.Queue()
        c.start_stream(callback=lambda result, error: chunks.put((result, error)))
        streaming = grpcclient.InferInput("streaming", [1, 1], "BOOL")
        streaming.set_data_from_numpy(np.array([[True]]))
        c.async_stream_infer("tensorrt_llm", inputs + [streaming])
        result, error = chunks.get(timeout=60)
        assert error is None and result.as_numpy("output_ids").shape[-1] == 50    # the first second of speech
        c.stop_stream(cancel_requests=True)
        deadline = time.monotonic() + 30
        while "was cancelled by its client" not in server.log_tail(200000):
            assert time.monotonic() < deadline, "the LLM step never heard of the cancellation"
            time.sleep(0.1)
        assert audex.tts("Still serving.", seed=1).audio.size > 0
    c.close()


def metric_values(server, name: str) -> dict:
    """``{labels: value}`` of one metric family from the server's Prometheus endpoint."""
    with urllib.request.urlopen(f"http://{server.host}:{server.metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{name}{{([^}}]*)}} (\S+)$", text, re.M)}


def test_pairing_counts_are_triton_metrics_from_the_worker(served):
    """The LLM handler runs in a worker process here (the stub has NumPy 1.x); its pairing counts still reach Triton's
    /metrics, exported by the stub from the worker's stats messages."""
    server, _ = served
    assert "[audex worker" in server.log_tail(400000)             # the handlers run in worker processes
    before = metric_values(server, "audex_cfg_tokens_total")
    guided_key = 'action="guided",model="tensorrt_llm"'
    with AudexTritonClient(server.http_url, model_name="ensemble") as http:
        tts = http.tts("Counted pairs.", seed=2)
    deadline = time.monotonic() + 10
    while metric_values(server, "audex_cfg_tokens_total").get(guided_key, 0.0) <= before.get(guided_key, 0.0):
        assert time.monotonic() < deadline, metric_values(server, "audex_cfg_tokens_total")
        time.sleep(0.2)
    after = metric_values(server, "audex_cfg_tokens_total")
    # every code token of the answer (50 Hz, 320 samples each) plus its end tokens was decided by a guided pair
    assert after[guided_key] - before.get(guided_key, 0.0) >= tts.audio.size // 320
    assert after['action="unguided",model="tensorrt_llm"'] == 0.0
    assert metric_values(server, "audex_cfg_split_pairs_total") == {'model="tensorrt_llm"': 0.0}
    assert not any("tensorrt_llm_once" in labels for labels in after)      # the BLS front exports nothing


def test_sigterm_shuts_the_ensemble_down_cleanly(served):
    server, _ = served
    code = server.stop()
    log = server.log_tail(40000)
    assert code == 0, log[-3000:]
    for model in ("preprocessing", "tensorrt_llm", "tensorrt_llm_once", "postprocessing", "ensemble"):
        assert f"successfully unloaded '{model}'" in log
    unguided = re.findall(r"CFG pairing over this instance's life: \d+ guided, (\d+) unguided", log)
    assert unguided == ["0"]                  # one LLM instance (one engine): pair-aware admission, no split pair
