"""Every command the README shows runs, as written, on the tiny model and generated data.

The commands are read from the README's ```` ```bash ```` blocks, in order, and run one by one with ``bash -c`` in
a workspace laid out like a checkout (``examples/``, ``scripts/``, ``conf/`` link to this one) that holds the
files the README names: the demo's manifests (``demo_data/manifests``, generated here, small), the demo's last
``.nemo`` (``runs/demo/stage3/stage3.nemo``: the tiny model), ``cuts.jsonl.gz`` (a CutSet built by Lhotse itself
from recordings and supervisions, no Audex fields), ``speech/*.wav``, and the same speech as a NeMo manifest
(``nemo_manifest.json``) and as a Hugging Face dataset saved to disk (``hf_speech/``). A command written with a
trailing ``&`` (a server) runs in the background until the other commands are done. Inline commands in the prose must also
appear in a block, so no command escapes the test. Only the commands in :data:`NOT_RUN` are skipped, each for
the reason given there.
"""

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

from audex.data import schema
from audex.models.audex_model import AudexModel

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: how a command line of the README starts
PREFIXES = ("python examples/", "python scripts/", "audex-", "bash scripts/", "torchrun ", "srun ")
#: commands the test does not run, with the reason
NOT_RUN = {
    "bash scripts/run_demo.sh": "the ~11-minute CPU demo; the README's demo figures are what it printed",
    "bash scripts/setup_env.sh && .venv/bin/python -m pytest -q -n 2": "the test command itself, which runs this test",
    "python examples/audex_train_chain.py --config-name=demo_chain": "the demo's 12-25-minute training chain, which "
    "bash scripts/run_demo.sh runs (the chain runner itself is tested in tests/training)",
}
NOT_RUN_PREFIXES = {
    "torchrun ": "multi-process launches on GPU nodes (the 2-process CPU runs are tested in tests/parallel)",
    "srun ": "SLURM launches need a cluster",
}

pytestmark = pytest.mark.slow


def readme_commands(text: str) -> list[str]:
    """The command lines of the README's bash blocks (continuations joined, comments dropped), in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def inline_commands(text: str) -> list[str]:
    """Commands with arguments quoted inline in the prose (single backticks); a bare name such as ``audex-serve``
    names a command, it does not run one."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = [c.strip() for c in re.findall(r"`([^`\n]+)`", prose)]
    return [c for c in spans if c.startswith(PREFIXES) and " " in c]


def skip_reason(command: str) -> str | None:
    if command in NOT_RUN:
        return NOT_RUN[command]
    return next((why for prefix, why in NOT_RUN_PREFIXES.items() if command.startswith(prefix)), None)


def _wav(path: Path, seconds: float, freq: float) -> Path:
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.3 * np.sin(2 * math.pi * freq * t)).astype(np.float32), 16000)
    return path


def _demo_manifests(root: Path) -> None:
    """``demo_data/manifests/{task}_{split}.jsonl.gz`` as ``scripts/make_demo_data.py`` names them, small."""
    audio = root / "audio"
    audio.mkdir(parents=True)
    rng = np.random.default_rng(0)
    chat = lambda i: [{"role": "user", "content": "What is " + "two plus " * (i % 3 + 1) + "?"},  # noqa: E731
                      {"role": "assistant", "content": "It is " + "more " * (i % 4 + 1)}]
    for split, n in (("train", 8), ("val", 2), ("test", 2)):
        cuts = {
            "text": [schema.make_text_cut(f"text-{split}-{i}", chat(i)) for i in range(n)],
            "asr": [schema.make_asr_cut(Recording.from_file(_wav(audio / f"asr-{split}-{i}.wav", 1.0, 300 + 40 * i)),
                                        "hello world", "en", cut_id=f"asr-{split}-{i}") for i in range(n)],
            "audio_qa": [schema.make_audio_qa_cut(Recording.from_file(_wav(audio / f"qa-{split}-{i}.wav", 1.0, 500)),
                                                  "What is it?", "A tone.", cut_id=f"audio_qa-{split}-{i}")
                         for i in range(n)],
            "tts": [schema.make_tts_cut("say it", speech_codes=rng.integers(0, 256, 40), cut_id=f"tts-{split}-{i}")
                    for i in range(n)],
            "tta": [schema.make_tta_cut("a tone", audio_codes=rng.integers(0, 64, (4, 500)), cut_id=f"tta-{split}-{i}")
                    for i in range(n)],
        }
        for task, items in cuts.items():
            CutSet.from_cuts(items).to_file(root / f"{task}_{split}.jsonl.gz")


def _lhotse_cuts(ws: Path) -> None:
    """``cuts.jsonl.gz``: recordings + supervisions made into cuts by Lhotse itself (a recipe's output shape)."""
    (ws / "speech").mkdir()
    recordings = [Recording.from_file(_wav(ws / "speech" / f"utt{i}.wav", 1.0 + 0.25 * i, 220 * (i + 1)))
                  for i in range(3)]
    supervisions = [SupervisionSegment(id=r.id, recording_id=r.id, start=0, duration=r.duration, text=text,
                                       language="English")
                    for r, text in zip(recordings, ["hello world", "good morning", "thank you"])]
    CutSet.from_manifests(recordings=RecordingSet.from_recordings(recordings),
                          supervisions=SupervisionSet.from_segments(supervisions)).to_file(ws / "cuts.jsonl.gz")


def _nemo_and_hf(ws: Path) -> None:
    """``speech/*.wav`` as a NeMo manifest (audio_filepath/duration/text only) and as a saved HF dataset."""
    cuts = list(CutSet.from_file(ws / "cuts.jsonl.gz"))
    lines = [{"audio_filepath": f"speech/{c.recording_id}.wav", "duration": c.duration, "text": c.supervisions[0].text}
             for c in cuts]
    (ws / "nemo_manifest.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    audio = [{"bytes": (ws / x["audio_filepath"]).read_bytes(), "path": Path(x["audio_filepath"]).name} for x in lines]
    ds = datasets.Dataset.from_dict({"audio": audio, "text": [x["text"] for x in lines]})
    ds.cast_column("audio", datasets.Audio()).save_to_disk(str(ws / "hf_speech"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("readme")
    for name in ("examples", "scripts", "conf"):
        (ws / name).symlink_to(ROOT / name)
    _demo_manifests(ws / "demo_data" / "manifests")
    _lhotse_cuts(ws)
    _nemo_and_hf(ws)
    torch.manual_seed(0)
    nemo = ws / "runs" / "demo" / "stage3" / "stage3.nemo"
    nemo.parent.mkdir(parents=True)
    AudexModel.from_config_file(str(ROOT / "conf" / "model" / "tiny.yaml")).save_to(str(nemo))
    return ws


def test_readme_lists_its_commands_in_blocks():
    text = README.read_text()
    commands = readme_commands(text)
    assert len(commands) >= 8, commands
    assert commands[:2] == ["bash scripts/run_demo.sh", "bash scripts/setup_env.sh && .venv/bin/python -m pytest -q -n 2"]
    missing = [c for c in inline_commands(text) if c not in commands]
    assert not missing, f"commands quoted in the prose but not in a ```bash block (so not tested): {missing}"


def test_every_readme_command_runs_as_written(workspace, triton_server_turn):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "1"}
    env.pop("PYTHONPATH", None)
    background, ran, skipped = [], [], []
    try:
        for command in readme_commands(README.read_text()):
            reason = skip_reason(command)
            if reason is not None:
                skipped.append((command, reason))
                continue
            if command.endswith("&"):
                proc = subprocess.Popen(["bash", "-c", f"exec {command[:-1].strip()}"], cwd=workspace, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
                background.append((command, proc))
                continue
            start = time.monotonic()
            proc = subprocess.run(["bash", "-c", command], cwd=workspace, env=env, capture_output=True, text=True,
                                  timeout=900)
            print(f"{time.monotonic() - start:6.1f} s  {command}", flush=True)
            assert proc.returncode == 0, (f"README command failed (exit {proc.returncode}):\n  {command}\n"
                                          f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
            ran.append(command)
    finally:
        for command, proc in background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    assert ran, "no README command ran"
    assert all(shlex.split(c)[0] in ("python", "bash") or c.startswith("audex-") for c in ran)
    assert (workspace / "outputs" / "eval" / "asr" / "summary.md").exists(), "the README's eval command wrote no summary"
    assert set(NOT_RUN) <= {c for c, _ in skipped}, "an exemption in NOT_RUN names a command the README no longer has"
