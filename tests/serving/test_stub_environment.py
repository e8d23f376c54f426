"""The python-backend stub's NumPy 1.x overlay environment (:func:`audex.serving.triton.launcher.stub_environment`)
is safe for Triton servers started at once on one cache: from one checkout (several processes create it together
and all get the same finished environment) or from several (each keeps its own; none deletes another's, which a
running server's stubs start from)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from audex.serving.triton import launcher

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def needs_overlay():
    if launcher._numpy_major() < 2:
        pytest.skip("the project's NumPy is 1.x: the stub needs no overlay environment")
    if not (launcher.stub_numpy_dir() / "numpy" / "__init__.py").exists():
        pytest.skip(f"no {launcher.STUB_NUMPY} at {launcher.stub_numpy_dir()}: run scripts/setup_env.sh")


def _stub_numpy(bin_dir: Path) -> str:
    """The NumPy version the environment's interpreter imports (what the stub gets)."""
    out = subprocess.run([str(bin_dir / "python3"), "-c", "import numpy; print(numpy.__version__)"],
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


def test_two_checkouts_on_one_cache_keep_their_own_environment(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    mine = launcher.stub_environment(cache)
    pth = mine.parent / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    lines = (pth / "aa_audex_stub_numpy.pth").read_text()
    made = (mine / "python3").lstat().st_mtime_ns
    assert launcher.stub_environment(cache) == mine                 # made once: the second server reuses it as is
    assert (mine / "python3").lstat().st_mtime_ns == made
    # a server of another checkout (its own audex on the stub's path) starts on the same cache
    monkeypatch.setattr(launcher, "checkout_root", lambda: tmp_path / "other_checkout")
    theirs = launcher.stub_environment(cache)
    assert theirs != mine
    assert str(tmp_path / "other_checkout") in (theirs.parent / pth.relative_to(mine.parent) / "aa_audex_stub_numpy.pth").read_text()
    # ours is untouched: same lines, same files, still usable by a stub that is starting from it
    assert (pth / "aa_audex_stub_numpy.pth").read_text() == lines
    assert (mine / "python3").lstat().st_mtime_ns == made
    assert _stub_numpy(mine) == launcher.STUB_NUMPY.split("==")[1]
    assert not list(cache.glob(".*"))                                # no temporary folder left behind


def test_servers_starting_at_once_all_get_the_finished_environment(tmp_path):
    cache, n = tmp_path / "cache", 4
    start = time.time() + 8                                          # after every interpreter has imported audex
    code = ("import sys, time; from audex.serving.triton.launcher import stub_environment; "
            f"time.sleep(max(0, {start} - time.time())); print(stub_environment(sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cache)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    bins = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(bins) == 1, bins
    assert _stub_numpy(Path(bins.pop())) == launcher.STUB_NUMPY.split("==")[1]
    assert len(list(cache.iterdir())) == 1                           # one environment, no temporary folder left


def test_a_worker_stuck_loading_its_handler_is_an_error_with_its_stacks(tmp_path, monkeypatch, capfd):
    """The python model waits for its worker's hello at most ``startup_timeout_s``: a stuck worker becomes the
    model's load error, with every thread's stack in the server log, instead of a load that never ends."""
    from audex.serving.triton.link import WorkerProcess

    (tmp_path / "stuck_handler.py").write_text(
        "import threading\n\nclass Handler:\n    def __init__(self, params):\n        threading.Event().wait()\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT}")
    worker = WorkerProcess("audex.serving.triton.worker", ["--handler", "stuck_handler:Handler", "--params", "{}"],
                           sys.executable, startup_timeout=120)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="did not load its handler within 3 s"):
        worker.hello(3.0)
    assert time.monotonic() - start < 30
    assert worker.proc.wait(timeout=30) != 0
    err = capfd.readouterr().err
    assert "stuck_handler.py" in err and "__init__" in err, err[-3000:]
