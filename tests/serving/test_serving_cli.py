"""The serving commands as a user runs them: ``examples/audex_serve.py`` writes the CPU repository of a ``.nemo`` and
serves it with package indexes unreachable, ``examples/audex_client.py`` asks it over HTTP and gRPC, and SIGTERM
stops it with exit code 0."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
from serving_checks import OFFLINE_ENV, PROXY_VARS

from audex.serving.triton.launcher import TritonNotInstalledError, free_port, tritonserver_binary

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run(args, timeout):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_serve_and_client_commands(tiny_model, tmp_path, triton_server_turn):
    try:
        tritonserver_binary()
    except TritonNotInstalledError as e:
        pytest.skip(str(e))
    nemo = tmp_path / "tiny.nemo"
    tiny_model.save_to(str(nemo))
    http, grpc, metrics = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS} | OFFLINE_ENV | {
        "AUDEX_CACHE_DIR": str(tmp_path / "cache")}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "examples/audex_serve.py", f"model_path={nemo}", f"repo={tmp_path / 'repo'}",
                               f"serve.http_port={http}", f"serve.grpc_port={grpc}", f"serve.metrics_port={metrics}",
                               "serve.max_speech_seconds=0.5"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _run(["examples/audex_client.py", f"url=127.0.0.1:{http}", "task=chat", "text=Hello", "max_new_tokens=3",
              "wait_s=600"], timeout=900)
        wav = tmp_path / "hello.wav"
        printed = _run(["examples/audex_client.py", f"url=127.0.0.1:{grpc}", "protocol=grpc", "task=tts",
                        "text=Hello there.", "seed=1", f"out={wav}"], timeout=300)
        assert f"wrote {wav}" in printed
        audio, rate = sf.read(str(wav))
        assert rate == 16000 and 0 < audio.size <= (int(0.5 * 50) + 2) * 320 and audio.size % 320 == 0
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert code == 0 and "Triton ready" in text and "stopping Triton (SIGTERM)" in text, text[-3000:]
    assert (tmp_path / "repo" / "audex" / "config.pbtxt").exists()
