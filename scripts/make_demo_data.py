#!/usr/bin/env python
"""Make the demo dataset locally: real espeak-ng speech, synthetic sounds, text chats, as Lhotse manifests.

Everything is generated on this machine in well under two minutes on two cores; nothing is downloaded.

* **ASR** -- sentences of a small grammar ("the red fox finds three keys") spoken by several espeak-ng voices
  (``en-us``, ``en-gb``, ``en-us+f3``, ``en-gb-scotland+m3``), 22,050 Hz resampled to 16 kHz mono with sox.
  The ``val``/``test`` sentences are word combinations that never occur in ``train``.
* **TTS** -- the same kind of sentences in one fixed voice (``en-us``, as the paper's fixed-voice TTS), as
  speech-codec codes of the tiny model's X-Codec2 (50 tokens/s), plus the 10 % CFG-unconditional copies.
* **TTA** -- 10 s (``--tta-seconds``) synthetic environmental sounds of eight kinds (beeps, hums, chirps, clicks,
  knocks, noise and noise bursts) with captions, as the tiny model's X-Codec codes (4 RVQ layers, 200 tokens/s), plus CFG copies.
* **audio QA** -- 3 s clips of those sounds with questions (what is it, how does the pitch move, is it
  rhythmic) and answers.
* **text** -- chats in instruct and thinking mode: arithmetic, capitals, days, spelling-free echo tasks.

Outputs under ``--out`` (default ``demo_data``)::

    tiny_init.nemo                  the initial tiny model; its codecs made the codes, stage0 starts from it
    audio/{asr,qa}/*.wav            16 kHz mono
    manifests/{task}_{split}.jsonl.gz   task in text, asr, tts, tta, audio_qa; split in train, val, test
    stats.json                      counts, hours, tokens per task and split

Usage::

    python scripts/make_demo_data.py --out demo_data            # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import random
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import yaml
from lhotse import CutSet, Recording

from audex.data import schema
from audex.data.cfg_uncond import CfgUncondConfig, blend_cfg_uncond
from audex.models.audex_model import AudexModel

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("make_demo_data")
SR = 16000

# ---- the sentence grammar (ASR and TTS) -----------------------------------------------------------------
COLORS = ["red", "blue", "green", "yellow", "black", "white"]
ANIMALS = ["cat", "dog", "fox", "bird", "fish", "horse"]
VERBS = ["sees", "likes", "finds", "wants", "follows", "hears"]
NUMBERS = ["two", "three", "four", "five", "six", "seven"]
OBJECTS = ["boxes", "apples", "stones", "cups", "books", "keys"]
ASR_VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb-scotland+m3"]
TTS_VOICE = "en-us"


def sentence_splits(rng: random.Random, n_train: int, n_val: int, n_test: int) -> dict[str, list[str]]:
    """Disjoint sets of sentences; every word of val/test also occurs in train."""
    combos = list(itertools.product(COLORS, ANIMALS, VERBS, NUMBERS, OBJECTS))
    rng.shuffle(combos)
    sentences = [f"the {c} {a} {v} {n} {o}" for c, a, v, n, o in combos]
    return {"train": sentences[:n_train], "val": sentences[n_train:n_train + n_val],
            "test": sentences[n_train + n_val:n_train + n_val + n_test]}


def espeak_to_16k(text: str, voice: str, path: Path, speed: int) -> None:
    """espeak-ng (22,050 Hz) piped through sox to 16 kHz mono 16-bit WAV."""
    espeak = subprocess.Popen(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], stdout=subprocess.PIPE)
    sox = subprocess.run(["sox", "-t", "wav", "-", "-r", str(SR), "-c", "1", "-b", "16", str(path)],
                         stdin=espeak.stdout, capture_output=True)
    espeak.stdout.close()
    if espeak.wait() != 0 or sox.returncode != 0:
        raise RuntimeError(f"espeak-ng/sox failed for voice {voice!r} and text {text!r}: {sox.stderr.decode()[:300]}")


# ---- synthetic sounds (TTA and audio QA) -------------------------------------------------------------------
# Each kind repeats a 2 s pattern with fixed timing (pitch and level vary from clip to clip), so that a caption
# determines which codec tokens come where: the tiny random codec turns plain stationary sounds into code streams
# that say little about their source, timing patterns survive it.
PATTERN_SECONDS = 2.0
SOUND_KINDS = {
    "beep": ["a short beep every two seconds", "a single high beep then silence", "an electronic beep repeating slowly"],
    "double_beep": ["two quick beeps every two seconds", "a pair of short high beeps", "double beeps like an alarm clock"],
    "hum": ["a low steady hum", "a deep electrical hum", "a low droning tone"],
    "noise": ["steady static noise", "a constant hiss", "continuous white noise"],
    "noise_burst": ["a short burst of noise every two seconds", "a hiss of spraying water then silence",
                    "short noise bursts"],
    "rising": ["a whistle sliding up in pitch", "a rising chirp then silence", "a tone sweeping upward"],
    "clicks": ["fast regular clicking", "a clock ticking quickly", "four sharp clicks a second"],
    "knock": ["three knocks on a wooden door", "knocking three times", "someone knocks three times"],
}
QA_ANSWERS = {  # (what is it, pitch, rhythm)
    "beep": ("A short high beep.", "The pitch is high and steady.", "Yes, it repeats every two seconds."),
    "double_beep": ("Two quick beeps.", "The pitch is high and steady.", "Yes, the pair of beeps repeats."),
    "hum": ("A low steady hum.", "The pitch is low and steady.", "No, it is continuous."),
    "noise": ("Steady static noise.", "There is no clear pitch.", "No, it is continuous."),
    "noise_burst": ("A short burst of noise.", "There is no clear pitch.", "Yes, it comes in bursts."),
    "rising": ("A whistle sliding up in pitch.", "The pitch rises.", "Yes, it repeats every two seconds."),
    "clicks": ("Fast regular clicking.", "There is no clear pitch.", "Yes, it clicks four times a second."),
    "knock": ("Three knocks on wood.", "There is no clear pitch.", "Yes, the knocks come in groups of three."),
}
QA_QUESTIONS = ("What is the sound in the audio?", "How does the pitch of the sound change?",
                "Is the sound rhythmic?")


def synth_sound(kind: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """``seconds`` of the 2 s pattern of ``kind``; random pitch and level, fixed timing."""
    n = int(seconds * SR)
    t = np.arange(n) / SR
    phase = t % PATTERN_SECONDS

    def tone(freq):
        return np.sin(2 * np.pi * freq * t)

    if kind == "beep":
        x = np.where(phase < 0.4, tone(rng.uniform(1800, 2200)), 0.0)
    elif kind == "double_beep":
        x = np.where((phase < 0.2) | ((phase >= 0.4) & (phase < 0.6)), tone(rng.uniform(1800, 2200)), 0.0)
    elif kind == "hum":
        f = rng.uniform(90, 120)
        x = tone(f) + 0.5 * tone(2 * f)
    elif kind == "noise":
        x = rng.standard_normal(n)
    elif kind == "noise_burst":
        x = np.where(phase < 0.5, rng.standard_normal(n), 0.0)
    elif kind == "rising":
        lo, hi = rng.uniform(300, 400), rng.uniform(1800, 2200)
        freq = lo + (hi - lo) * np.clip(phase, 0.0, 1.0)
        x = np.where(phase < 1.0, np.sin(2 * np.pi * np.cumsum(freq) / SR), 0.0)
    elif kind == "clicks":
        k = (phase % 0.25) * SR
        x = np.where(k < 80, np.exp(-k / 12.0), 0.0)
    elif kind == "knock":
        f = rng.uniform(150, 250)
        x = np.zeros(n)
        for start in (0.0, 0.3, 0.6):
            k = (phase - start) * SR
            x += np.where((k >= 0) & (k < 1600), np.sin(2 * np.pi * f * k / SR) * np.exp(-np.clip(k, 0, None) / 300.0), 0.0)
    else:
        raise ValueError(f"unknown sound kind {kind!r}; known: {sorted(SOUND_KINDS)}")
    return (x / (np.abs(x).max() + 1e-9) * rng.uniform(0.25, 0.4)).astype(np.float32)


# ---- text chats ---------------------------------------------------------------------------------------
NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
             "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
CAPITALS = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
            "Egypt": "Cairo", "Canada": "Ottawa", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
            "Greece": "Athens", "Cuba": "Havana"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def text_chats(rng: random.Random) -> dict[str, list[tuple[list[dict], bool]]]:
    """(messages, thinking) chats; val/test hold arithmetic pairs and phrasings unseen in train."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    held_out = set(pairs[:20])
    chats: dict[str, list] = {"train": [], "val": [], "test": []}

    def add(split, user, answer, reasoning=None):
        thinking = reasoning is not None
        turn = {"role": "assistant", "content": answer}
        if thinking:
            turn["thinking"] = reasoning
        chats[split].append(([{"role": "user", "content": user}, turn], thinking))

    for i, (a, b) in enumerate(pairs):
        split = ("val" if i % 2 else "test") if (a, b) in held_out else "train"
        for form in range(2 if split == "train" else 1):
            user = f"What is {NUM_WORDS[a]} plus {NUM_WORDS[b]}?" if form == 0 else f"Add {NUM_WORDS[a]} and {NUM_WORDS[b]}."
            answer = f"{NUM_WORDS[a].capitalize()} plus {NUM_WORDS[b]} is {NUM_WORDS[a + b]}."
            reasoning = f"{a} + {b} = {a + b}." if rng.random() < 0.3 else None
            add(split, user, answer, reasoning)
    countries = list(CAPITALS)
    for i, country in enumerate(countries):
        split = "train" if i < 9 else ("val" if i < 11 else "test")
        for q in (f"What is the capital of {country}?", f"Which city is the capital of {country}?"):
            add(split, q, f"The capital of {country} is {CAPITALS[country]}.")
    for i, day in enumerate(DAYS):
        nxt = DAYS[(i + 1) % 7]
        add("train", f"What day comes after {day}?", f"{nxt} comes after {day}.")
        add("train" if i % 3 else "val", f"Which day follows {day}?", f"{nxt} follows {day}.")
    words = COLORS + ANIMALS + OBJECTS + ["river", "window", "garden", "music", "orange", "winter"]
    for i, word in enumerate(words):
        split = "train" if i % 6 else "test"
        add(split, f"Repeat the word {word} twice.", f"{word} {word}")
        add("train" if i % 5 else "val", f"Say the word {word} three times.", f"{word} {word} {word}")
    # More families with held-out items, so that Table 3's text share (59-75 % of a stage's samples) repeats each
    # chat ~10 times instead of ~35: with a few hundred chats the held-out text loss measured memorisation.
    def held(items, k):
        items = list(items)
        rng.shuffle(items)
        return {x: ("val" if i % 2 else "test") for i, x in enumerate(items[:k])}

    minus = [(a, b) for a in range(1, 13) for b in range(a + 1)]
    out = held(minus, 14)
    for a, b in minus:
        split = out.get((a, b), "train")
        for form in range(2 if split == "train" else 1):
            user = f"What is {NUM_WORDS[a]} minus {NUM_WORDS[b]}?" if form == 0 else f"Take {NUM_WORDS[b]} from {NUM_WORDS[a]}."
            reasoning = f"{a} - {b} = {a - b}." if rng.random() < 0.3 else None
            add(split, user, f"{NUM_WORDS[a].capitalize()} minus {NUM_WORDS[b]} is {NUM_WORDS[a - b]}.", reasoning)
    out = held(range(17), 4)
    for n in range(17):
        split = out.get(n, "train")
        add(split, f"What number comes after {NUM_WORDS[n]}?", f"{NUM_WORDS[n + 1].capitalize()} comes after {NUM_WORDS[n]}.")
        add(split, f"What number comes before {NUM_WORDS[n + 1]}?", f"{NUM_WORDS[n].capitalize()} comes before {NUM_WORDS[n + 1]}.")
    larger = [(a, b) for a in range(13) for b in range(13) if a != b]
    out = held(larger, 16)
    for a, b in larger:
        add(out.get((a, b), "train"), f"Which is larger, {NUM_WORDS[a]} or {NUM_WORDS[b]}?",
            f"{NUM_WORDS[max(a, b)].capitalize()} is larger.")
    for i, day in enumerate(DAYS):
        prev = DAYS[(i - 1) % 7]
        add("train" if i % 3 else "val", f"What day comes before {day}?", f"{prev} comes before {day}.")
    # Word problems, all of them (not 160 as before): with ~1,300 distinct training chats Table 3's text shares
    # repeat each chat ~5 times per stage, and stage 3's held-out text loss stopped measuring memorisation.
    counts = [(a, b, obj) for a in range(1, 10) for b in range(1, 10) for obj in OBJECTS if a + b <= 18]
    rng.shuffle(counts)
    for i, (a, b, obj) in enumerate(counts):
        split = ("val" if i % 2 else "test") if i < 12 else "train"
        reasoning = f"{a} + {b} = {a + b}." if rng.random() < 0.3 else None
        add(split, f"I have {NUM_WORDS[a]} {obj} and get {NUM_WORDS[b]} more. How many {obj} do I have?",
            f"You have {NUM_WORDS[a + b]} {obj}.", reasoning)
    left = [(a, b, obj) for a in range(2, 13) for b in range(1, a) for obj in OBJECTS]
    rng.shuffle(left)
    for i, (a, b, obj) in enumerate(left[:300]):
        split = ("val" if i % 2 else "test") if i < 12 else "train"
        reasoning = f"{a} - {b} = {a - b}." if rng.random() < 0.3 else None
        add(split, f"I have {NUM_WORDS[a]} {obj} and give away {NUM_WORDS[b]}. How many {obj} are left?",
            f"You have {NUM_WORDS[a - b]} {obj} left.", reasoning)
    pets = [(c, a) for c in COLORS for a in ANIMALS]
    out = held(pets, 6)
    for c, a in pets:
        add(out.get((c, a), "train"), f"I see a {c} {a}. What color is the {a}?", f"The {a} is {c}.")
    for split in chats:
        rng.shuffle(chats[split])
    return chats


# ---- main ----------------------------------------------------------------------------------------------
def build(out: Path, model_config: Path, seed: int, jobs: int, sizes: dict[str, int],
          model_overrides: dict | None = None, tta_seconds: float = 10.0) -> dict:
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: run scripts/setup_env.sh (apt-get install espeak-ng sox)")
    t0 = time.time()
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    man = out / "manifests"
    man.mkdir(parents=True, exist_ok=True)
    (out / "audio" / "asr").mkdir(parents=True, exist_ok=True)
    (out / "audio" / "tts").mkdir(parents=True, exist_ok=True)
    (out / "audio" / "qa").mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    model = AudexModel.from_config_file(str(model_config), **(model_overrides or {})).eval()
    model.save_to(str(out / "tiny_init.nemo"))
    log.info("initial model -> %s", out / "tiny_init.nemo")

    cuts: dict[tuple[str, str], list] = {}

    # speech: synthesise all clips in parallel (espeak-ng and sox are separate processes)
    asr_sents = sentence_splits(rng, sizes["asr_train"], sizes["asr_eval"], sizes["asr_eval"])
    tts_sents = sentence_splits(random.Random(seed + 1), sizes["tts_train"], sizes["tts_eval"], sizes["tts_eval"])
    tts_sents["val"] = [s for s in tts_sents["val"] if s not in set(asr_sents["train"])]
    tts_sents["test"] = [s for s in tts_sents["test"] if s not in set(asr_sents["train"])]
    jobs_list = []
    for split, sents in asr_sents.items():
        for i, s in enumerate(sents):
            voice = ASR_VOICES[i % len(ASR_VOICES)]
            jobs_list.append(("asr", split, f"asr_{split}_{i:04d}", s, voice, rng.randint(150, 190)))
    for split, sents in tts_sents.items():
        for i, s in enumerate(sents):
            jobs_list.append(("tts", split, f"tts_{split}_{i:04d}", s, TTS_VOICE, 170))

    def synth(job):
        task, split, cid, text, voice, speed = job
        path = out / "audio" / task / f"{cid}.wav"
        espeak_to_16k(text, voice, path, speed)
        return job, path

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        speech = list(pool.map(synth, jobs_list))
    log.info("synthesised %d espeak-ng clips in %.1f s", len(speech), time.time() - t0)

    for (task, split, cid, text, voice, _), path in speech:
        rec = Recording.from_file(path, recording_id=cid)
        if task == "asr":
            cut = schema.make_asr_cut(rec, text, language="en", cut_id=cid)
            cut.custom["voice"] = voice
        else:
            wav = torch.from_numpy(sf.read(path, dtype="float32")[0])
            codes = model.speech_codec.encode(wav)
            cut = schema.make_tts_cut(text, speech_codes=codes, language="en", cut_id=cid)
            cut.custom["voice"] = voice
            path.unlink()  # the codes are the target; the waveform is not needed any more
        cuts.setdefault((task, split), []).append(cut)
    log.info("speech done (%.1f s)", time.time() - t0)

    # sounds: TTA (tta_seconds, 10 s as in the paper by default; codec codes) and audio QA (3 s clips)
    kinds = list(SOUND_KINDS)
    for split, per_kind in (("train", sizes["tta_train_per_kind"]), ("val", 1), ("test", 2)):
        for kind in kinds:
            for v in range(per_kind):
                cid = f"tta_{split}_{kind}_{v}"
                wav = torch.from_numpy(synth_sound(kind, tta_seconds, nprng))
                codes = model.audio_codec.encode(wav)
                caption = SOUND_KINDS[kind][(v + (split != "train")) % len(SOUND_KINDS[kind])]
                cut = schema.make_tta_cut(caption, audio_codes=codes, cut_id=cid)
                cut.custom["sound_kind"] = kind
                cuts.setdefault(("tta", split), []).append(cut)
    for split, per_kind in (("train", sizes["qa_train_per_kind"]), ("val", 2), ("test", 2)):
        for kind in kinds:
            for v in range(per_kind):
                cid = f"qa_{split}_{kind}_{v}"
                path = out / "audio" / "qa" / f"{cid}.wav"
                sf.write(path, synth_sound(kind, 3.0, nprng), SR, subtype="PCM_16")
                rec = Recording.from_file(path, recording_id=cid)
                q = v % len(QA_QUESTIONS) if split == "train" else (v + 1) % len(QA_QUESTIONS)
                cut = schema.make_audio_qa_cut(rec, QA_QUESTIONS[q], QA_ANSWERS[kind][q], cut_id=cid)
                cut.custom["sound_kind"] = kind
                cuts.setdefault(("audio_qa", split), []).append(cut)
    log.info("sounds done (%.1f s)", time.time() - t0)

    for split, chats in text_chats(random.Random(seed + 2)).items():
        cuts[("text", split)] = [schema.make_text_cut(f"text_{split}_{i:04d}", m, thinking=th)
                                 for i, (m, th) in enumerate(chats)]

    stats = {}
    for (task, split), items in sorted(cuts.items()):
        cutset = CutSet.from_cuts(items)
        if split == "train" and task in schema.GENERATION_TASKS:
            cutset = CutSet.from_cuts(blend_cfg_uncond(cutset, CfgUncondConfig(fraction=0.1, seed=seed, max_pads=24)))
        path = man / f"{task}_{split}.jsonl.gz"
        cutset.to_file(path)
        stats[f"{task}_{split}"] = {"cuts": len(cutset), "seconds": round(sum(c.duration for c in cutset), 1),
                                    "manifest": str(path.relative_to(out))}
    stats["elapsed_seconds"] = round(time.time() - t0, 1)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


DEFAULT_SIZES = {"asr_train": 480, "asr_eval": 40, "tts_train": 160, "tts_eval": 20, "tta_train_per_kind": 8,
                 "qa_train_per_kind": 12}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "demo_data")
    parser.add_argument("--model-config", type=Path, default=ROOT / "conf" / "model" / "tiny.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="parallel espeak-ng/sox processes")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of examples (0.1 for tests)")
    parser.add_argument("--tta-seconds", type=float, default=10.0,
                        help="length of the TTA clips (the paper's 10 s); encoding them is a quarter of the run, "
                             "so the demo, which trains on their first second, makes 2 s (one whole pattern)")
    parser.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override of the model config, e.g. audio_encoder.window_seconds=3.0 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # clip-by-clip codec encoding: more threads only contend (10x slower on a busy box)
    sizes = {k: max(1, math.ceil(v * args.scale)) for k, v in DEFAULT_SIZES.items()}
    overrides = {}
    for item in args.model_override:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--model-override expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    if args.tta_seconds < 1.0:
        parser.error(f"--tta-seconds {args.tta_seconds}: TTA clips need at least 1 s (the demo trains on 1 s)")
    stats = build(args.out, args.model_config, args.seed, args.jobs, sizes, overrides, args.tta_seconds)
    width = max(len(k) for k in stats)
    for key, value in stats.items():
        if isinstance(value, dict):
            print(f"{key:<{width}}  {value['cuts']:>5} cuts  {value['seconds']:>8.1f} s")
    print(f"demo data in {args.out} ({stats['elapsed_seconds']} s)")


if __name__ == "__main__":
    main()
