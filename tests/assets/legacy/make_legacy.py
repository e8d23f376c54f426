"""Made once with the pre-renovation code (commit 4e356e0): a tiny .nemo and the tokens it generates."""
import json, sys, torch
from pathlib import Path
torch.set_num_threads(1)
from audex.models.audex_model import AudexModel
from audex.inference.pipelines import AudexPipeline
out = Path(sys.argv[1])
if not (out / "tiny_pre_renovation.nemo").exists():
    torch.manual_seed(0)
    model = AudexModel.from_config_file("conf/model/tiny.yaml").eval()
    model.save_to(str(out / "tiny_pre_renovation.nemo"))
from nemo.core import ModelPT
model = ModelPT.restore_from(str(out / "tiny_pre_renovation.nemo")).eval()
pipe = AudexPipeline(model)
t = torch.arange(16000 * 2) / 16000
tone = 0.3 * torch.sin(2 * torch.pi * 440 * t)
asr = pipe.asr([tone], max_new_tokens=12)
chat = pipe.chat(["Hello there"], thinking=False, max_new_tokens=12, seed=5)  # the chat preset samples
torch.manual_seed(0)
tts = pipe.tts_codes(["hi"], max_new_tokens=20, seed=3)
rec = {"made_with_commit": "4e356e0", "tone_hz": 440, "tone_seconds": 2, "tone_amplitude": 0.3,
       "max_new_tokens": {"asr": 12, "chat": 12, "tts": 20}, "tts_seed": 3, "chat_seed": 5,
       "asr_token_ids": asr[0].token_ids, "chat_token_ids": chat[0].token_ids,
       "tts_codes": tts[0][0].tolist()}
(out / "tiny_pre_renovation.json").write_text(json.dumps(rec, indent=1))
print(rec)
