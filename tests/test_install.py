"""A plain (not editable) ``pip install`` works outside the checkout: console scripts run, the package's own configs
(presets, export defaults, model YAMLs) load, and ``ModelPT.restore_from`` rebuilds an Audex ``.nemo``.

The wheel is built from this checkout and installed with ``--no-deps`` into a fresh venv whose dependencies come
from the test environment (a ``.pth`` line onto its site-packages), so the test needs no package index and takes
seconds; every command then runs from a temporary folder with no ``PYTHONPATH``, so nothing resolves through the
checkout.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEGACY_NEMO = ROOT / "tests" / "assets" / "legacy" / "tiny_pre_renovation.nemo"

pytestmark = pytest.mark.slow


def run(cmd, cwd, timeout=600, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **kw)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    wheels, venv = tmp / "wheels", tmp / "venv"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)], tmp)
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    py = venv / "bin" / "python"
    purelib = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).strip())
    (purelib / "zz_audex_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    [wheel] = wheels.glob("audex-*.whl")
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp)
    outside = tmp / "elsewhere"
    outside.mkdir()
    return venv, outside


def test_the_installed_package_is_the_one_imported(installed):
    venv, outside = installed
    where = run([str(venv / "bin" / "python"), "-c", "import audex; print(audex.__file__)"], outside).strip()
    assert where.startswith(str(venv)) and str(ROOT) not in where


def test_console_scripts_run_with_the_packaged_configs(installed):
    venv, outside = installed
    bin_ = venv / "bin"
    help_text = run([str(bin_ / "audex-infer"), "--help"], outside)
    assert "model: audex_2b, audex_30b_a3b, tiny, tiny_hybrid" in help_text and "trainer: cpu, gpu" in help_text
    tiny = run([str(bin_ / "python"), "-c", "import audex; print(audex.config_path('model', 'tiny.yaml'))"], outside).strip()
    assert tiny.startswith(str(venv))
    run([str(bin_ / "audex-infer"), f"model.path={tiny}", "task=chat", "inputs.text=[Hello there]",
         "sampling.max_new_tokens=3", "sampling.seed=0", "output.jsonl=out.jsonl", "progress=false"], outside)
    [line] = [json.loads(x) for x in (outside / "out.jsonl").read_text().splitlines()]
    assert line["status"] == "ok" and line["task"] == "chat"
    for script in ("audex-train", "audex-train-chain", "audex-eval"):
        assert "== Config groups ==" in run([str(bin_ / script), "--help"], outside) or script


def test_defaults_load_from_the_package(installed):
    venv, outside = installed
    code = ("import audex\n"
            "from omegaconf import OmegaConf\n"
            "from audex.inference.presets import DEFAULT_PRESETS_PATH, load_presets\n"
            "p = load_presets()\n"
            "export = OmegaConf.load(audex.config_path('export.yaml'))\n"
            "print(DEFAULT_PRESETS_PATH, p['tts'].sampling.guidance_scale, p['tta'].sampling.top_k, len(export))\n")
    out = run([str(venv / "bin" / "python"), "-c", code], outside).split()
    assert out[0].startswith(str(venv)) and out[1:3] == ["1.5", "80"] and int(out[3]) > 0


def test_plain_nemo_restores_an_audex_archive(installed):
    venv, outside = installed
    code = ("import torch; torch.set_num_threads(1)\n"
            "from nemo.core import ModelPT\n"
            f"m = ModelPT.restore_from({str(LEGACY_NEMO)!r}, map_location='cpu')\n"
            "import audex; print(type(m).__name__, audex.__file__)\n")
    name, where = run([str(venv / "bin" / "python"), "-c", code], outside).split()[-2:]
    assert name == "AudexModel" and where.startswith(str(venv))
