"""A real Triton server (the nvidia-pytriton wheel's tritonserver, python backend) serving the tiny Audex model on
loopback, started with package indexes unreachable: the four tasks over HTTP and gRPC, equal to in-process calls of
the same engine; every class of malformed request refused with a message while the server keeps serving; a bounded
mixed load test; clean SIGTERM shutdown."""

import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from serving_checks import MALFORMED, malformed_inputs, open_client, run_mixed_load, served_limits, start_server, tone
from tritonclient.utils import InferenceServerException

import audex
from audex.models.checkpoint import load_model
from audex.serving.client import AudexTritonClient
from audex.serving.local_engine import LocalEngine
from audex.serving.requests import ServeRequest
from audex.serving.triton.launcher import STUB_NUMPY, checkout_root, stub_environment, stub_numpy_dir
from audex.serving.triton.repository import write_cpu_repository
from audex.serving.triton.repository_check import validate_repository

LIMITS = served_limits(max_speech_seconds=0.5, max_context_tokens=640)  # room for a tool chat's system turn


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory, triton_server_turn):
    root = tmp_path_factory.mktemp("triton")
    nemo = root / "tiny.nemo"
    tiny_model.save_to(str(nemo))
    repo = write_cpu_repository(root / "repo", nemo, limits=LIMITS, max_batch_size=8)
    assert validate_repository(repo) == ["audex"]
    server = start_server(repo, root / "server")
    engine = LocalEngine(load_model(nemo, device="cpu"), LIMITS)  # the same weights, in this process
    yield server, engine
    server.stop()


def test_the_server_started_offline_from_what_setup_installed(served, tmp_path, monkeypatch):
    server, _ = served
    # started by start_server under serving_checks.offline: a fresh cache, pip unable to reach any index
    overlay = next((server.workdir / "cache").glob("triton-stub-env-py*/lib/python*/site-packages"))
    assert not (overlay / "numpy").exists()                               # nothing was installed at start
    # NumPy 1.26 first, then this checkout: the stubs import the audex under test, not the editable install's
    assert (overlay / "aa_audex_stub_numpy.pth").read_text().split() == [str(stub_numpy_dir().resolve()),
                                                                         str(checkout_root())]
    assert checkout_root() == Path(audex.__file__).resolve().parents[1]
    version = (stub_numpy_dir() / "numpy" / "version.py").read_text()
    assert f'version = "{STUB_NUMPY.split("==")[1]}"' in version         # NumPy 1.26 from scripts/setup_env.sh
    assert AudexTritonClient(server.http_url).chat("hi", max_new_tokens=2).finish_reason   # and it answers
    # without the setup-time NumPy the launcher says how to install it, and never calls pip itself
    monkeypatch.setenv("AUDEX_TRITON_NUMPY1", str(tmp_path / "none"))
    with pytest.raises(RuntimeError, match="scripts/setup_env.sh.*--target"):
        stub_environment(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.fixture(params=["http", "grpc"])
def client(served, request):
    server, _ = served
    with open_client(server, request.param) as c:
        yield c



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


def test_voice_prompted_tts_and_tool_chat_equal_the_engine(served, client):
    _, engine = served
    voice, weather = tone(0.4), {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    reply = client.tts("Good evening.", voice=voice, voice_text="He hoped there would be stew.", seed=5)
    [direct] = engine.run([ServeRequest(task="tts", text="Good evening.", voice=torch.from_numpy(voice),
                                        voice_text="He hoped there would be stew.", seed=5)])
    assert direct.error is None and reply.audio.size > 0
    np.testing.assert_allclose(reply.audio, direct.audio.numpy(), atol=1e-5)
    reply = client.chat("Weather in Paris?", tools=[weather], seed=1, max_new_tokens=8)
    [direct] = engine.run([ServeRequest(task="chat", text="Weather in Paris?", tools=[weather], seed=1,
                                        max_new_tokens=8)])
    assert reply.text == direct.text and reply.tool_calls == direct.tool_calls is not None
    assert client.chat("hi", max_new_tokens=2).tool_calls is None          # a plain chat has no tool calls
    with pytest.raises(InferenceServerException, match="'tools' is an input of task 'chat' only"):
        client.tts("Good evening.", tools=[weather])


@pytest.mark.parametrize("case, expected", MALFORMED)
def test_malformed_requests_get_a_named_error_and_the_server_keeps_serving(served, client, case, expected):
    with pytest.raises(InferenceServerException) as err:
        client.infer_inputs(malformed_inputs(client, case))
    assert expected.format(model="audex", context=LIMITS.max_context_tokens).lower() in str(err.value).lower()
    assert client.chat("Still there?", max_new_tokens=2).text is not None


def test_bounded_mixed_load_has_no_failures(served):
    server, _ = served
    n = 64                             # bench/serve.py runs the full 200-request version

    def make(protocol):
        return open_client(server, protocol)

    done, failures = run_mixed_load(make, n_requests=n, concurrency=8, budget_s=300.0)
    assert failures == []
    assert done == list(range(n))                               # no request lost


def test_sigterm_shuts_the_server_down_cleanly(served):
    server, _ = served
    pid = server.process.pid
    assert server.stop() == 0
    assert "successfully unloaded 'audex'" in server.log_tail(20000)
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)
