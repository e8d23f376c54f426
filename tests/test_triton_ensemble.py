"""The GPU ensemble (preprocessing -> LLM with CFG pairs -> postprocessing) served by a real Triton server on
loopback, with the PyTorch reference executor in place of TensorRT-LLM's: what a GPU host runs, minus the engine.

Checks: the four tasks over HTTP and gRPC against the in-process generation engine (TTS/TTA with their CFG twin,
lambda from the preset or the request), TTS streamed from the decoupled ensemble, every malformed-request class
refused by name while the server keeps serving, a bounded mixed load with nothing failed or lost, clean shutdown."""

import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("tritonclient.grpc")

from omegaconf import OmegaConf  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from audex.export.client import AudexTritonClient  # noqa: E402
from audex.export.serve import TritonNotInstalledError, TritonServer  # noqa: E402
from audex.export.serving import AudexServingEngine, ServeLimits, ServeRequest  # noqa: E402
from audex.export.triton_repo import ModelSummary, validate_repository, write_gpu_repository  # noqa: E402

LIMITS = ServeLimits(max_audio_seconds=12.0, max_new_tokens=12, max_speech_seconds=1.2, max_context_tokens=400,
                     tta_seconds=0.2)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    from audex.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("ensemble")
    cfg = OmegaConf.load("conf/export.yaml")
    cfg.trtllm.dtype = "float32"
    export_bundle(tiny_model, root / "export", cfg)
    summary = ModelSummary.from_export(root / "export")
    assert summary == ModelSummary.of(tiny_model)
    repo = write_gpu_repository(root / "repo", root / "export", summary, executor="torch", max_batch_size=8,
                                limits=LIMITS)
    validate_repository(repo)
    try:
        server = TritonServer(repo, workdir=root / "server", startup_timeout=600).start()
    except TritonNotInstalledError as e:
        pytest.skip(str(e))
    yield server, AudexServingEngine(tiny_model, LIMITS)
    server.stop()


@pytest.fixture(params=["http", "grpc"])
def client(served, request):
    server, _ = served
    url = server.http_url if request.param == "http" else server.grpc_url
    with AudexTritonClient(url, protocol=request.param, model_name="ensemble") as c:
        yield c


def tone(seconds, freq=440.0):
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def direct(engine, **kw):
    [res] = engine.run([ServeRequest(**kw)])
    assert res.error is None, res.error
    return res


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


def test_tts_streams_from_the_decoupled_ensemble(served):
    server, engine = served
    with AudexTritonClient(server.grpc_url, protocol="grpc", model_name="ensemble") as grpc:
        chunks = list(grpc.stream("tts", text="A longer sentence, streamed one second at a time.", seed=5))
        whole = grpc.tts("A longer sentence, streamed one second at a time.", seed=5)
    audio = [c.audio for c in chunks if c.audio.size]
    assert len(audio) >= 2                                         # 1.2 s cap, 1 s chunks: two pieces
    assert audio[0].size == 50 * 320                               # the first chunk is one second (50 codes)
    assert sum(a.size for a in audio) == whole.audio.size          # chunked decoding, same number of frames
    with AudexTritonClient(server.http_url, model_name="ensemble") as http, pytest.raises(ValueError, match="grpc"):
        next(http.stream("tts", text="x"))


@pytest.mark.parametrize("case, expected", [
    ("unknown_task", "unknown task 'sing'"),
    ("empty_audio", "empty"),
    ("nan_audio", "NaN"),
    ("long_audio", "over the server's limit of 12 s"),
    ("over_context", "over the model's context of 400 tokens"),
    ("missing_text", "needs a non-empty 'text'"),
    ("wrong_dtype", "data-type is 'INT32', but model 'ensemble' expects 'FP32'"),
    ("batch_of_two", "one item per request"),
])
def test_malformed_requests_get_a_named_error_and_the_server_keeps_serving(served, client, case, expected):
    c = client
    if case == "unknown_task":
        inputs = c.build_inputs("sing", text="la la")
    elif case == "empty_audio":
        inputs = c.build_inputs("asr", audio=np.zeros(0, np.float32))
    elif case == "nan_audio":
        inputs = c.build_inputs("asr", audio=np.full(1600, np.nan, np.float32))
    elif case == "long_audio":
        inputs = c.build_inputs("asr", audio=tone(13.0))
    elif case == "over_context":
        inputs = c.build_inputs("chat", text="tell me more " * 300)
    elif case == "missing_text":
        inputs = c.build_inputs("tts")
    elif case == "wrong_dtype":
        bad = c.module.InferInput("audio", [1, 16], "INT32")
        bad.set_data_from_numpy(np.zeros((1, 16), np.int32))
        inputs = c.build_inputs("asr")[:1] + [bad]
    else:
        task = c.module.InferInput("task", [2, 1], "BYTES")
        task.set_data_from_numpy(np.array([[b"chat"], [b"chat"]], dtype=np.object_))
        text = c.module.InferInput("text", [2, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"hi"], [b"yo"]], dtype=np.object_))
        inputs = [task, text]
    with pytest.raises(InferenceServerException) as err:
        c.infer_inputs(inputs)
    assert expected.lower() in str(err.value).lower()
    assert c.chat("Still there?", max_new_tokens=2).text is not None


def test_bounded_mixed_load_has_no_failures(served):
    server, _ = served
    n_requests, concurrency, budget_s = 48, 8, 300.0
    tasks = ["asr", "chat", "tts", "tta"]
    failures, done, lock = [], [], threading.Lock()
    jobs = list(range(n_requests))

    def worker(protocol):
        c = AudexTritonClient(server.http_url if protocol == "http" else server.grpc_url, protocol=protocol,
                              model_name="ensemble")
        while True:
            with lock:
                if not jobs:
                    break
                i = jobs.pop()
            task = tasks[i % len(tasks)]
            try:
                if task == "asr":
                    c.asr(tone(0.5 + 0.1 * (i % 5)))
                elif task == "chat":
                    c.chat(f"question {i}", max_new_tokens=4)
                else:
                    assert getattr(c, task)(f"sentence number {i}", seed=i).audio.size > 0
                with lock:
                    done.append(i)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    failures.append((i, task, repr(e)))
        c.close()

    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=("http" if k % 2 else "grpc",)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=budget_s)
    assert not any(t.is_alive() for t in threads), f"load test exceeded {budget_s} s"
    assert failures == []
    assert sorted(done) == list(range(n_requests))      # no request lost
    assert time.monotonic() - start < budget_s


def test_sigterm_shuts_the_ensemble_down_cleanly(served):
    server, _ = served
    code = server.stop()
    log = server.log_tail(40000)
    assert code == 0, log[-3000:]
    for model in ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble"):
        assert f"successfully unloaded '{model}'" in log
