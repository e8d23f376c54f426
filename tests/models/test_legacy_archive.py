"""Users' archives outlive refactors: a ``.nemo`` written by the pre-renovation code (commit 4e356e0, before the
package layout changed) still restores, through NeMo's generic ``ModelPT.restore_from`` and Audex's loader, and
generates exactly the tokens it generated then (``tests/assets/legacy/make_legacy.py`` made both files once)."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import torch
import yaml

from audex.inference.pipelines import AudexPipeline
from audex.models.checkpoint import load_model

LEGACY = Path(__file__).resolve().parents[1] / "assets" / "legacy"
NEMO = LEGACY / "tiny_pre_renovation.nemo"
RECORD = json.loads((LEGACY / "tiny_pre_renovation.json").read_text())


def generate(model) -> dict:
    pipe = AudexPipeline(model)
    t = torch.arange(16000 * RECORD["tone_seconds"]) / 16000
    tone = RECORD["tone_amplitude"] * torch.sin(2 * torch.pi * RECORD["tone_hz"] * t)
    limits = RECORD["max_new_tokens"]
    asr = pipe.asr([tone], max_new_tokens=limits["asr"])
    chat = pipe.chat(["Hello there"], thinking=False, max_new_tokens=limits["chat"], seed=RECORD["chat_seed"])
    torch.manual_seed(0)
    tts = pipe.tts_codes(["hi"], max_new_tokens=limits["tts"], seed=RECORD["tts_seed"])
    return {"asr_token_ids": asr[0].token_ids, "chat_token_ids": chat[0].token_ids, "tts_codes": tts[0][0].tolist()}


def test_pre_renovation_archive_names_the_classes_users_archives_name():
    with tarfile.open(NEMO) as tar:
        member = next(m for m in tar if m.name.endswith("model_config.yaml"))
        cfg = yaml.safe_load(tar.extractfile(member))
    assert cfg["target"] == "audex.models.audex_model.AudexModel"
    assert cfg["backbone"]["_target_"] == "audex.modules.backbone.AudexBackbone"
    assert cfg["audio_encoder"]["_target_"] == "audex.modules.audio_encoder.AudexAudioEncoder"


def test_pre_renovation_archive_generates_the_same_tokens():
    model = load_model(NEMO, "cpu")
    assert type(model).__module__ == "audex.models.audex_model"
    assert model.vocab.size == 1536  # 512 text + 256 speech + 8 x 64 audio + 5 specials, padded to 512
    assert generate(model) == {k: RECORD[k] for k in ("asr_token_ids", "chat_token_ids", "tts_codes")}


def test_pre_renovation_archive_restores_with_plain_nemo_in_a_fresh_process():
    code = (f"import torch; torch.set_num_threads(1)\n"
            f"from nemo.core import ModelPT\n"
            f"m = ModelPT.restore_from({str(NEMO)!r}, map_location='cpu').eval()\n"
            f"print(type(m).__module__, type(m).__name__, m.vocab.size)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-3:] == ["audex.models.audex_model", "AudexModel", "1536"]
