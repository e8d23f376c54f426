"""Checks shared by the live Triton tests (the CPU repository and the GPU ensemble): the malformed-request classes
every endpoint must refuse by name, and a bounded mixed load that must end with nothing failed or lost."""

import contextlib
import threading
import time
import warnings

import numpy as np
import pytest

from audex.serving.client import AudexTritonClient
from audex.serving.requests import ServeLimits
from audex.serving.triton.launcher import TritonNotInstalledError, TritonServer

#: what an air-gapped host looks like to pip: no index, an unreachable index URL, no proxy
OFFLINE_ENV = {"PIP_NO_INDEX": "1", "PIP_INDEX_URL": "http://127.0.0.1:9/", "PIP_EXTRA_INDEX_URL": "",
               "PIP_FIND_LINKS": "", "NO_PROXY": "*"}
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "PIP_PROXY")

# (case, words the error must contain); {model} is the model the request was sent to
MALFORMED = [
    ("unknown_task", "unknown task 'sing'"),
    ("empty_audio", "empty"),
    ("nan_audio", "NaN"),
    ("long_audio", "over the server's limit of 12 s"),
    ("over_context", "over the model's context of {context} tokens"),
    ("missing_text", "needs a non-empty 'text'"),
    ("wrong_dtype", "data-type is 'INT32', but model '{model}' expects 'FP32'"),
    ("wrong_shape", "shape"),
    ("batch_of_two", "one input per request"),
]


@contextlib.contextmanager
def offline(cache_dir):
    """Package indexes unreachable and a fresh launcher cache (``AUDEX_CACHE_DIR``), so a server started inside
    must make its stub environment from what setup installed: any pip download fails."""
    with pytest.MonkeyPatch.context() as mp:
        for name in PROXY_VARS:
            mp.delenv(name, raising=False)
        for name, value in OFFLINE_ENV.items():
            mp.setenv(name, value)
        mp.setenv("AUDEX_CACHE_DIR", str(cache_dir))
        yield


def served_limits(max_speech_seconds: float, max_context_tokens: int = 400):
    """The limits the live tests serve with: 12 s of audio, a short context (400 tokens; the over-context case of
    :data:`MALFORMED`), 12 new text tokens, 0.2 s of TTA audio (10 frames x 4 codes), and the given TTS cap."""
    return ServeLimits(max_audio_seconds=12.0, max_new_tokens=12, max_speech_seconds=max_speech_seconds,
                       max_context_tokens=max_context_tokens, tta_seconds=0.2)


def start_server(repo, workdir, first_timeout: float = 300.0):
    """A started :class:`TritonServer` on ``repo``, started with no network (:func:`offline`, cache under
    ``workdir``), or a skip when the Triton wheel is not installed.

    The README's known limit: in some CI runs a server loading several python models at once never finished
    loading two of them, or aborted (``boost::interprocess::lock_exception``); a normal start takes 20-60 s here.
    A first start that is not ready after ``first_timeout`` s or dies is stopped (its log, with the stacks of its
    stubs and handler workers, stays in ``workdir``), a warning names it, and one more server is started in
    ``workdir/retry`` loading one model at a time (``--model-load-thread-count=1``); a second failure fails."""
    try:
        with offline(workdir / "cache"):
            try:
                return TritonServer(repo, workdir=workdir, startup_timeout=first_timeout).start()
            except (TimeoutError, RuntimeError) as e:
                warnings.warn(f"tritonserver on {repo} did not start (the known python-backend load failure, README "
                              f"Known limits; log: {workdir}); starting it once more, one model at a time: {e}",
                              stacklevel=2)
                return TritonServer(repo, workdir=workdir / "retry", startup_timeout=600,
                                    extra_args=("--model-load-thread-count=1",)).start()
    except TritonNotInstalledError as e:
        pytest.skip(str(e))


def open_client(server, protocol: str, model_name: str = "audex"):
    """An :class:`AudexTritonClient` on the server's HTTP or gRPC port (a context manager: it closes itself)."""
    url = server.http_url if protocol == "http" else server.grpc_url
    return AudexTritonClient(url, protocol=protocol, model_name=model_name)


def tone(seconds, freq=440.0):
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def malformed_inputs(c, case: str) -> list:
    """The inputs of one malformed request of class ``case`` for an :class:`AudexTritonClient` ``c``."""
    if case == "unknown_task":
        return c.build_inputs("sing", text="la la")
    if case == "empty_audio":
        return c.build_inputs("asr", audio=np.zeros(0, np.float32))
    if case == "nan_audio":
        return c.build_inputs("asr", audio=np.full(1600, np.nan, np.float32))
    if case == "long_audio":
        return c.build_inputs("asr", audio=tone(13.0))
    if case == "over_context":
        return c.build_inputs("chat", text="tell me more " * 300)
    if case == "missing_text":
        return c.build_inputs("tts")
    if case in ("wrong_dtype", "wrong_shape"):
        shape, dtype, np_dtype = ([1, 16], "INT32", np.int32) if case == "wrong_dtype" else ([1, 4, 16], "FP32", np.float32)
        bad = c.module.InferInput("audio", shape, dtype)
        bad.set_data_from_numpy(np.zeros(shape, np_dtype))
        return c.build_inputs("asr")[:1] + [bad]
    if case == "batch_of_two":
        task = c.module.InferInput("task", [2, 1], "BYTES")
        task.set_data_from_numpy(np.array([[b"chat"], [b"chat"]], dtype=np.object_))
        text = c.module.InferInput("text", [2, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"hi"], [b"yo"]], dtype=np.object_))
        return [task, text]
    raise KeyError(case)


def run_mixed_load(make_client, n_requests: int, concurrency: int, budget_s: float):
    """ASR / chat / TTS / TTA in turn from ``concurrency`` threads (HTTP and gRPC alternating); returns
    ``(indices done, failures)`` and asserts the whole run stayed within ``budget_s``."""
    tasks = ["asr", "chat", "tts", "tta"]
    failures, done, lock = [], [], threading.Lock()
    jobs = list(range(n_requests))

    def worker(protocol):
        with make_client(protocol) as c:
            while True:
                with lock:
                    if not jobs:
                        return
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

    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=("http" if k % 2 else "grpc",)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=budget_s)
    assert not any(t.is_alive() for t in threads), f"load test exceeded {budget_s} s"
    assert time.monotonic() - start < budget_s
    return sorted(done), failures
