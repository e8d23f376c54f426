"""A real Triton server (the nvidia-pytriton wheel's tritonserver, python backend) serving the tiny Audex model on
loopback: the four tasks over HTTP and gRPC, equal to in-process calls of the same engine; every class of malformed
request refused with a message while the server keeps serving; a bounded mixed load test; clean SIGTERM shutdown."""

import threading
import time
import urllib.request

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")

from tritonclient.utils import InferenceServerException  # noqa: E402

from audex.export.client import AudexTritonClient  # noqa: E402
from audex.export.serve import TritonNotInstalledError, TritonServer  # noqa: E402
from audex.export.serving import AudexServingEngine, ServeLimits, ServeRequest  # noqa: E402
from audex.export.triton_repo import validate_repository, write_cpu_repository  # noqa: E402

LIMITS = ServeLimits(max_audio_seconds=12.0, max_new_tokens=12, max_speech_seconds=0.5, max_context_tokens=400,
                     tta_seconds=0.2)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    nemo = root / "tiny.nemo"
    tiny_model.save_to(str(nemo))
    repo = write_cpu_repository(root / "repo", nemo, limits=LIMITS, max_batch_size=8)
    assert validate_repository(repo) == ["audex"]
    try:
        server = TritonServer(repo, workdir=root / "server", startup_timeout=600).start()
    except TritonNotInstalledError as e:
        pytest.skip(str(e))
    from audex.export.loading import load_audex_model

    engine = AudexServingEngine(load_audex_model(nemo), LIMITS)  # the same weights, in this process
    yield server, engine
    server.stop()


@pytest.fixture(params=["http", "grpc"])
def client(served, request):
    server, _ = served
    return AudexTritonClient(server.http_url if request.param == "http" else server.grpc_url, protocol=request.param)


def tone(seconds, freq=440.0):
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_health_and_readiness_endpoints(served):
    server, _ = served
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/audex/ready"):
        with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=5) as resp:
            assert resp.status == 200
    assert AudexTritonClient(server.grpc_url, protocol="grpc").is_ready()


def test_asr_of_a_wav_file_matches_the_in_process_engine(served, client, tmp_path):
    _, engine = served
    path = tmp_path / "speech.wav"
    sf.write(str(path), tone(1.5, 300.0), 16000, subtype="PCM_16")
    audio, sr = sf.read(str(path), dtype="float32")
    reply = client.asr(audio, sample_rate=sr)
    [direct] = engine.run([ServeRequest(task="asr", audio=torch.from_numpy(audio), sample_rate=sr)])
    assert direct.error is None
    assert reply.text == direct.text and reply.finish_reason == direct.finish_reason


def test_tts_and_tta_return_audio_equal_to_the_in_process_engine(served, client):
    _, engine = served
    tts = client.tts("Hello there, how are you?", seed=7)
    [direct] = engine.run([ServeRequest(task="tts", text="Hello there, how are you?", seed=7)])
    assert tts.audio.size > 0 and tts.audio.size % 320 == 0          # whole 50 Hz codec frames at 16 kHz
    assert tts.audio.size <= (int(0.5 * 50) + 2) * 320                  # max_speech_seconds caps the output
    np.testing.assert_allclose(tts.audio, direct.audio.numpy(), atol=1e-5)
    tta = client.tta("A dog barks twice.", seed=3)
    assert tta.audio.size == int(0.2 * 16000)                          # fixed TTA length: 0.2 s = 10 frames x 4 codes
    assert np.isfinite(tta.audio).all()


def test_chat_returns_the_engine_text(served, client):
    _, engine = served
    reply = client.chat("What is the capital of France?", seed=1, max_new_tokens=8)
    [direct] = engine.run([ServeRequest(task="chat", text="What is the capital of France?", seed=1, max_new_tokens=8)])
    assert reply.text == direct.text and reply.audio.size == 0


def _raw_infer(client, inputs):
    return client.client.infer("audex", inputs)


@pytest.mark.parametrize("case, expected", [
    ("unknown_task", "unknown task 'sing'"),
    ("empty_audio", "empty"),
    ("nan_audio", "NaN"),
    ("long_audio", "over the server's limit of 12 s"),
    ("over_context", "over the model's context of 400 tokens"),
    ("missing_text", "needs a non-empty 'text'"),
    ("wrong_dtype", "data-type is 'INT32', but model 'audex' expects 'FP32'"),
    ("wrong_shape", "shape"),
    ("batch_of_two", "one input per request"),
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
    elif case == "wrong_shape":
        bad = c.module.InferInput("audio", [1, 4, 16], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 4, 16), np.float32))
        inputs = c.build_inputs("asr")[:1] + [bad]
    else:
        task = c.module.InferInput("task", [2, 1], "BYTES")
        task.set_data_from_numpy(np.array([[b"chat"], [b"chat"]], dtype=np.object_))
        text = c.module.InferInput("text", [2, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"hi"], [b"yo"]], dtype=np.object_))
        inputs = [task, text]
    with pytest.raises(InferenceServerException) as err:
        _raw_infer(c, inputs)
    assert expected.lower() in str(err.value).lower()
    assert c.chat("Still there?", max_new_tokens=2).finish_reason in ("stop", "length")


def test_bounded_mixed_load_has_no_failures(served):
    server, _ = served
    n_requests, concurrency, budget_s = 64, 8, 240.0   # bench/serve.py runs the full 200-request version
    tasks = ["asr", "chat", "tts", "tta"]
    failures, done, lock = [], [], threading.Lock()
    jobs = list(range(n_requests))

    def worker(protocol):
        c = AudexTritonClient(server.http_url if protocol == "http" else server.grpc_url, protocol=protocol)
        while True:
            with lock:
                if not jobs:
                    return
                i = jobs.pop()
            task = tasks[i % len(tasks)]
            try:
                if task == "asr":
                    reply = c.asr(tone(0.5 + 0.1 * (i % 5)))
                elif task == "chat":
                    reply = c.chat(f"question {i}", max_new_tokens=4)
                else:
                    reply = getattr(c, task)(f"sentence number {i}", seed=i)
                    assert reply.audio.size > 0
                with lock:
                    done.append(i)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    failures.append((i, task, repr(e)))

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


def test_sigterm_shuts_the_server_down_cleanly(served):
    server, _ = served
    pid = server.process.pid
    assert server.stop() == 0
    assert "successfully unloaded 'audex'" in server.log_tail(20000)
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)
