"""A few generated training manifests for the short training runs (resume, the 2-process stage runs): text chats,
ASR tones, TTS code targets, written as ``{text,asr,tts}_train.jsonl.gz`` under ``root``."""

from pathlib import Path

import numpy as np
import soundfile as sf
from lhotse import CutSet, Recording

from audex.data import schema

WORDS = ["red", "blue", "cat", "dog", "two", "three", "boxes", "keys"]


def write_small_manifests(root: Path, *, n_text: int = 40, n_asr: int = 12, n_tts: int = 10,
                          varied_answers: bool = False) -> Path:
    """``n_text`` chats (``varied_answers``: the answer repeats 1-4 times, so rows pack unevenly), ``n_asr`` clips
    of 0.6 s + 50 ms each (tones), ``n_tts`` code targets of 30 + 3 i codes."""
    rng = np.random.default_rng(0)
    text = []
    for i in range(n_text):
        pair = f"{WORDS[i % 8]} {WORDS[(i * 3) % 8]}"
        answer = f"{pair} " * (1 + i % 4) if varied_answers else pair
        text.append(schema.make_text_cut(f"t{i}", [{"role": "user", "content": f"Say {WORDS[i % 8]} and "
                                                                              f"{WORDS[(i * 3) % 8]}."},
                                                   {"role": "assistant", "content": answer}]))
    asr = []
    for i in range(n_asr):
        path = root / f"a{i}.wav"
        t = np.arange(int(16000 * (0.6 + 0.05 * i))) / 16000
        sf.write(path, 0.3 * np.sin(2 * np.pi * (300.0 + 40 * i) * t), 16000)
        asr.append(schema.make_asr_cut(Recording.from_file(path), f"{WORDS[i % 8]} {WORDS[(i + 1) % 8]}", "en",
                                       cut_id=f"a{i}"))
    tts = [schema.make_tts_cut(f"{WORDS[i % 8]} {WORDS[(i + 5) % 8]}", speech_codes=rng.integers(0, 256, 30 + 3 * i),
                               cut_id=f"s{i}") for i in range(n_tts)]
    for name, cuts in (("text_train", text), ("asr_train", asr), ("tts_train", tts)):
        CutSet.from_cuts(cuts).to_file(root / f"{name}.jsonl.gz")
    return root
