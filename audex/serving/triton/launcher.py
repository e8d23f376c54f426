"""Run a real Triton Inference Server on this machine: the ``tritonserver`` of the ``nvidia-pytriton`` wheel.

The wheel (``pip install nvidia-pytriton==0.7.0``) ships Triton 2.51 with the **python** backend only, with all its
libraries bundled; it serves a standard model repository (``config.pbtxt`` + ``1/model.py``) over HTTP and gRPC.
:class:`TritonServer` starts it on loopback ports, waits for readiness and stops it cleanly by PID with SIGTERM.

Each trap below was met on these machines and is handled here, so that ``TritonServer(repo).start()`` just works:

* the backend directory must hold ``python/`` with the stub built for the running interpreter's version
  (``pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub``): :func:`backend_directory`;
* ``LD_LIBRARY_PATH`` must start with the interpreter's own ``LIBDIR``, then ``site-packages/nvidia_pytriton.libs``,
  or the stub loads the system's libpython and fails inside ``multiprocessing``;
* the stub runs the first ``python3`` on ``PATH``;
* the stub is compiled with a pybind11 that predates NumPy 2's ABI: under NumPy 2 it reads every array's item size
  as 0 (inputs arrive as copies of their first element, outputs arrive empty, string tensors crash the stub). So
  when the project's environment has NumPy >= 2, :func:`stub_environment` makes (once, cached, no network) a small
  overlay virtual environment whose ``site-packages`` puts the NumPy 1.26 that setup installed
  (:func:`stub_numpy_dir`, ``scripts/setup_env.sh``) first and then the project's own ``site-packages`` (with its
  ``.pth`` hooks); its ``bin`` goes first on ``PATH``, so the stub's interpreter sees NumPy 1.26 and everything else
  from the project (torch, transformers, audex). Nothing is downloaded when the server starts: an air-gapped host
  serves from what setup installed;
* started in the background, the server ignores SIGINT: :meth:`TritonServer.stop` sends SIGTERM to its PID and
  waits, escalating to SIGKILL only after ``stop_timeout``.

Example::

    >>> with TritonServer("triton_repo") as server:           # free loopback ports, waits until ready
    ...     client = tritonclient.http.InferenceServerClient(server.http_url)
    ...     client.is_server_ready()
    True
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

import audex

STUB_NUMPY = "numpy==1.26.4"  # the last NumPy with the 1.x ABI the wheel's python-backend stub was built against
STUB_NUMPY_DIR = "triton-numpy1"  # under the environment's prefix (.venv/triton-numpy1), filled at setup time


class TritonNotInstalledError(RuntimeError):
    """``nvidia-pytriton`` (which carries the ``tritonserver`` binary) is not installed."""


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")  # does not import pytriton (its own deps pin numpy<2)
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalledError(
            "the Triton server binary comes from the nvidia-pytriton wheel: pip install --no-deps "
            "nvidia-pytriton==0.7.0 (scripts/setup_env.sh does); it is not installed in this environment"
        )
    return Path(list(spec.submodule_search_locations)[0])


def tritonserver_binary() -> Path:
    path = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not path.exists():
        raise TritonNotInstalledError(f"{path} is missing: reinstall nvidia-pytriton==0.7.0")
    return path


def _bundled_libs() -> Path:
    return _pytriton_root().parent / "nvidia_pytriton.libs"


def backend_directory(dest: str | os.PathLike) -> Path:
    """A backend directory holding ``python/`` (backend library, utils and the stub for this Python version)."""
    root = _pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonNotInstalledError(f"the pytriton wheel has no python-backend stub for Python {version} ({stub})")
    dest = Path(dest)
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for item in (root / "backends" / "python").iterdir():
        if item.is_file():
            shutil.copy2(item, python_dir / item.name)
    shutil.copy2(stub, python_dir / "triton_python_backend_stub")
    return dest


def _numpy_major() -> int:
    return int(importlib.metadata.version("numpy").split(".")[0])


def default_cache_dir() -> Path:
    base = os.environ.get("AUDEX_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "audex")
    return Path(base)


def stub_numpy_dir() -> Path:
    """Where setup installed :data:`STUB_NUMPY` for the stub: ``AUDEX_TRITON_NUMPY1``, else ``<sys.prefix>/triton-numpy1``."""
    return Path(os.environ.get("AUDEX_TRITON_NUMPY1") or Path(sys.prefix) / STUB_NUMPY_DIR)


def install_stub_numpy_command(target: Path | None = None) -> list[str]:
    """The setup-time command that fills :func:`stub_numpy_dir` (``scripts/setup_env.sh`` runs it)."""
    return [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target or stub_numpy_dir()),
            STUB_NUMPY]


def stub_environment(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The ``bin`` folder to put first on the stub's ``PATH``, or None when the project's NumPy is already 1.x.

    Makes ``<cache>/triton-stub-env-py3.11-<hash>`` once: ``python -m venv --without-pip`` and two ``.pth`` files in
    its ``site-packages``: the first puts :func:`stub_numpy_dir` (and :func:`checkout_root`) on the path, the second
    adds this interpreter's ``site-packages`` after it (``site.addsitedir``, so the project's own ``.pth`` hooks run
    too). Runs no pip: a missing NumPy 1.26 is an error that names the setup command.

    Safe for servers started at once, from one checkout or several, on one cache: the folder is named by the hash of
    its ``.pth`` lines (each checkout / environment gets its own), it is built in a temporary folder beside it and
    renamed into place in one step, and a finished folder is never changed or deleted, so a running server's stubs
    never lose the environment they start from. (Before, one shared folder was deleted and rewritten whenever its
    lines differed, e.g. a server of another checkout starting on the same ``~/.cache/audex``.)
    """
    if _numpy_major() < 2:
        return None
    numpy1 = stub_numpy_dir()
    if not (numpy1 / "numpy" / "__init__.py").exists():
        raise RuntimeError(
            f"the Triton python-backend stub needs {STUB_NUMPY} (its pybind11 predates NumPy 2), installed at setup time "
            f"into {numpy1}, which has none: run scripts/setup_env.sh, or {shlex.join(install_stub_numpy_command())} "
            "(or set AUDEX_TRITON_NUMPY1 to a folder that holds it)")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    # NumPy 1.26 first, then the checkout this audex runs from (the embedded stub ignores PYTHONPATH, and the editable
    # install would otherwise give it the installed checkout's audex), then the project's site-packages
    root = checkout_root()
    lines = (f"{numpy1.resolve()}\n" + (f"{root}\n" if root is not None else ""),
             f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    digest = hashlib.sha256("\0".join((sys.executable, *lines)).encode()).hexdigest()[:16]
    cache = Path(cache_dir or default_cache_dir())
    env = cache / f"triton-stub-env-py{version}-{digest}"
    if _stub_env_complete(env, version, lines):
        return env / "bin"
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{env.name}.", dir=cache))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], check=True)
        site_packages = tmp / "lib" / f"python{version}" / "site-packages"
        for script in (tmp / "bin").glob("activate*"):     # they would name the temporary folder; the stub needs none
            script.unlink()
        (site_packages / "aa_audex_stub_numpy.pth").write_text(lines[0])
        (site_packages / "zz_audex_project_env.pth").write_text(lines[1])
        try:
            os.rename(tmp, env)                          # atomic; fails when another process put its copy there first
        except OSError:
            if not _stub_env_complete(env, version, lines):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)           # gone after a successful rename; the loser's copy otherwise
    return env / "bin"


def _stub_env_complete(env: Path, version: str, lines: tuple[str, str]) -> bool:
    site_packages = env / "lib" / f"python{version}" / "site-packages"
    first, last = site_packages / "aa_audex_stub_numpy.pth", site_packages / "zz_audex_project_env.pth"
    try:
        return (env / "bin" / "python3").exists() and (first.read_text(), last.read_text()) == lines
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_environment(stub_bin: Path | None = None) -> dict[str, str]:
    """The environment for ``tritonserver`` and its stubs (``LD_LIBRARY_PATH`` and ``PATH`` traps handled)."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    libs = [p for p in (libdir, str(_bundled_libs()), env.get("LD_LIBRARY_PATH", "")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    path = [str(Path(sys.executable).parent)]
    if stub_bin is not None:
        path.insert(0, str(stub_bin))
        # the stub sees NumPy 1.x: the python models must run their handlers in worker processes
        env["AUDEX_TRITON_HANDLER_WORKER"] = "1"
    env["AUDEX_PROJECT_PYTHON"] = sys.executable
    env["PATH"] = os.pathsep.join(path + [env.get("PATH", "")])
    # the stub's interpreter takes its paths from the venv on PATH, plus the checkout this audex runs from (when it is
    # not an installed copy): the stubs and workers import the same audex as the process that starts the server
    root = checkout_root()
    if root is None:
        env.pop("PYTHONPATH", None)
    else:
        env["PYTHONPATH"] = str(root)
    return env


def checkout_root() -> Path | None:
    """The folder holding the running ``audex`` package when that is a checkout (editable install, worktree or
    ``PYTHONPATH``), None when it is an installed copy in ``site-packages`` (which must not go before the stub's
    NumPy 1.x)."""
    root = Path(audex.__file__).resolve().parents[1]
    installed = {Path(p).resolve() for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
    return None if root in installed or root.name in ("site-packages", "dist-packages") else root


class TritonServer:
    """One ``tritonserver`` process on loopback ports, serving a model repository.

    Args:
        model_repository: folder with one sub-folder per model (``config.pbtxt`` + ``1/model.py``).
        host: address to bind (loopback by default; the server is not meant to be exposed from a test).
        http_port / grpc_port / metrics_port: fixed ports, or None for free ones.
        workdir: where the backend directory and the log go (a temporary folder by default).
        startup_timeout: seconds to wait for ``/v2/health/ready`` (model loading included).
        stop_timeout: seconds to wait after SIGTERM before SIGKILL.
        extra_args: more ``tritonserver`` flags (e.g. ``["--log-verbose=1"]``).
    """

    def __init__(self, model_repository: str | os.PathLike, *, host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, workdir: str | os.PathLike | None = None,
                 startup_timeout: float = 300.0, stop_timeout: float = 60.0, extra_args: tuple[str, ...] = (),
                 cache_dir: str | os.PathLike | None = None):
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {str(self.model_repository)!r} does not exist: generate one with "
                                    "examples/audex_triton_repo.py")
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="audex_triton_")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "tritonserver.log"
        self.startup_timeout = float(startup_timeout)
        self.stop_timeout = float(stop_timeout)
        self.extra_args = tuple(extra_args)
        self.cache_dir = cache_dir
        self.process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list[str]:
        return [
            str(tritonserver_binary()),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.workdir / 'backends'}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false",
            "--exit-on-error=true", "--strict-readiness=true",
            *self.extra_args,
        ]

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise RuntimeError("this TritonServer is already started")
        backend_directory(self.workdir / "backends")
        env = server_environment(stub_environment(self.cache_dir))
        self._log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command(), stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                        cwd=str(self.workdir), start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str, timeout: float = 2.0) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=timeout) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return 0

    def is_live(self) -> bool:
        return self._get("/v2/health/live") == 200

    def is_ready(self) -> bool:
        return self._get("/v2/health/ready") == 200

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-chars:].decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} while starting; log tail:\n"
                                   f"{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        workers = self._signal_workers(signal.SIGUSR1)   # each writes its threads' stacks to the log (worker.main)
        if workers:
            time.sleep(3.0)
        raise TimeoutError(f"tritonserver was not ready after {self.startup_timeout:.0f} s (stacks of its {len(workers)} "
                           f"handler workers and stubs are in {self.log_path}); log tail:\n{self.log_tail(12000)}")

    def _signal_workers(self, sig: int) -> list[int]:
        """Send ``sig`` to this server's handler workers (its descendants running ``audex.serving.triton.worker``) and
        python-backend stubs (``triton_python_backend_stub``; an Audex python model registers the same stack dump)."""
        if self.process is None:
            return []
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(pid)
        todo, found = [self.process.pid], []
        while todo:
            for pid in children.get(todo.pop(), []):
                todo.append(pid)
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if b"audex.serving.triton.worker" in cmdline or b"triton_python_backend_stub" in cmdline:
                        os.kill(pid, sig)
                        found.append(pid)
                except OSError:
                    pass
        return found

    def stop(self) -> int | None:
        """SIGTERM by PID (the server ignores SIGINT in the background), SIGKILL after ``stop_timeout``.
        Returns the exit code."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.process = None
        return proc.returncode

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
