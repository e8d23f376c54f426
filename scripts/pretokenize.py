#!/usr/bin/env python
"""Pre-tokenise TTS and TTA targets: audio -> codec codes -> base64 in the cut's ``custom`` (section 4.5).

Speech (``tts`` cuts) goes through the model's X-Codec2 ``SpeechCodec`` (50 tokens/s, stored in
``custom["speech_codes"]``); general audio (``tta`` cuts) through its X-Codec ``AudioCodec``, first 4 RVQ
layers (stored frame-major in ``custom["audio_codes"]``). TTA clips are zero-padded or cropped to exactly
10 s first, so every TTA target is 500 frames x 4 = 2,000 tokens. The codecs are built from the model YAML
(``speech_codec`` / ``audio_codec`` nodes), and their codebooks are checked against its ``vocab``.

    python scripts/pretokenize.py manifests/tts.jsonl.gz -o manifests/tts_codes.jsonl \\
        --model-config conf/model/audex_2b.yaml --device cuda --batch-size 32

* Every other cut (ASR, AST, audio QA, text, cuts that already carry codes) is copied through unchanged, so
  the output is the complete manifest.
* Resumable: the output is written batch by batch and flushed; run the same command again after an
  interruption and the cuts already in the output are skipped (a half-written last line is repaired).
* A cut whose audio is missing, corrupt or empty, or whose codes do not fit the vocabulary, is not written;
  it is listed with its reason in ``<output>.failed.jsonl`` and counted in the summary printed at the end
  (exit status 1 when more than ``--max-skip-rate`` of the cuts failed). Failed cuts are retried on the next run.
* ``--drop-recording`` removes the audio reference from pre-tokenised cuts (the target is in the codes).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import hydra
import torch
from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.utils import fastcopy
from omegaconf import OmegaConf
from tqdm import tqdm

from audex.data import schema
from audex.data.prepare import comma_separated, preparation_counter, report
from audex.data.sequence import SAMPLE_RATE, TTA_SECONDS, load_cut_audio
from audex.data.skips import CODES_OUT_OF_RANGE, SkipSample
from audex.vocab import AudexVocab

TASKS = (schema.TTS, schema.TTA)


# ---- codecs -------------------------------------------------------------------------------------
def load_model_config(path: str | Path):
    cfg = OmegaConf.load(path)
    if "model" in cfg and "vocab" not in cfg:
        cfg = cfg.model
    if "vocab" not in cfg:
        raise SystemExit(f"{path} has no 'vocab' node: give a model config such as conf/model/tiny.yaml")
    return cfg


def build_codecs(cfg, tasks: tuple[str, ...], device: str) -> dict[str, torch.nn.Module]:
    """``{"tts": SpeechCodec, "tta": AudioCodec}`` for the requested tasks, checked against ``cfg.vocab``."""
    vocab = AudexVocab(**OmegaConf.to_container(cfg.vocab, resolve=True))
    node_for = {schema.TTS: "speech_codec", schema.TTA: "audio_codec"}
    codecs = {}
    for task in tasks:
        node = cfg.get(node_for[task])
        if node is None:
            raise SystemExit(f"the model config has no '{node_for[task]}' node, needed to pre-tokenise {task} cuts")
        codec = hydra.utils.instantiate(node, _convert_="all").to(device).eval()
        expected = vocab.speech_codebook_size if task == schema.TTS else vocab.audio_codebook_size
        if codec.codebook_size != expected:
            raise SystemExit(f"{node_for[task]} has a codebook of {codec.codebook_size} codes but the vocabulary "
                             f"reserves {expected}: the codec and model.vocab do not belong together")
        if task == schema.TTA and codec.n_q != vocab.audio_rvq_used:
            raise SystemExit(f"audio_codec.n_q={codec.n_q} but the model generates {vocab.audio_rvq_used} RVQ layers")
        codecs[task] = codec
    return codecs


def fixed_length(wav: torch.Tensor, seconds: float) -> torch.Tensor:
    """Zero-pad or crop to exactly ``seconds`` (the fixed 10 s TTA output of section 4.1)."""
    n = int(round(seconds * SAMPLE_RATE))
    return wav[:n] if wav.numel() >= n else torch.nn.functional.pad(wav, (0, n - wav.numel()))


def encode_cut(cut: Cut, wav: torch.Tensor, codecs: dict, drop_recording: bool) -> Cut:
    task = cut.custom["task"]
    codec = codecs[task]
    if task == schema.TTA:
        wav = fixed_length(wav, TTA_SECONDS)
    codes = codec.encode(wav.to(next(codec.parameters()).device))
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codec.codebook_size):
        raise SkipSample(CODES_OUT_OF_RANGE, f"the codec returned codes in [{int(codes.min())}, {int(codes.max())}]",
                         cut.id)
    out = fastcopy(cut, custom=dict(cut.custom))
    (schema.set_speech_codes if task == schema.TTS else schema.set_audio_codes)(out, codes)
    if drop_recording:
        out = fastcopy(out, recording=None)
    return out


# ---- resumable output ---------------------------------------------------------------------------
def repair_output(path: Path) -> int:
    """Keep the complete lines of an interrupted output (a torn last line or gzip stream is cut off);
    returns how many cuts it already holds."""
    if not path.is_file():
        return 0
    opener = gzip.open if path.suffix == ".gz" else open
    good, damaged = [], False
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    damaged = True
                    break
                good.append(line if line.endswith("\n") else line + "\n")
    except (EOFError, OSError):
        damaged = True
    if damaged:
        with opener(path, "wt", encoding="utf-8") as f:
            f.writelines(good)
    return len(good)


def batches(cuts, size: int) -> Iterator[list[Cut]]:
    batch = []
    for cut in cuts:
        batch.append(cut)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def needs_codes(cut: Cut, tasks: tuple[str, ...]) -> bool:
    return (cut.custom or {}).get("task") in tasks and not schema.has_codes(cut)


def _load(cut: Cut):
    try:
        return load_cut_audio(cut)
    except SkipSample as e:
        return e


def pretokenize(input_path: Path, output: Path, codecs: dict, tasks: tuple[str, ...], batch_size: int = 16,
                num_workers: int = 2, drop_recording: bool = False, max_skip_rate: float | None = 0.05,
                out=None) -> int:
    output.parent.mkdir(parents=True, exist_ok=True)
    already = repair_output(output)
    counter = preparation_counter("pretokenize", max_skip_rate)
    failed_path = output.with_name(output.name + ".failed.jsonl")
    cuts = CutSet.from_jsonl_lazy(input_path)
    encoded = copied = resumed = 0
    with CutSet.open_writer(output, overwrite=False) as writer, failed_path.open("w") as failed, \
            ThreadPoolExecutor(max(1, num_workers)) as pool, tqdm(desc="pretokenize", unit="cut") as bar:
        for batch in batches(cuts, batch_size):
            todo = [c for c in batch if not writer.contains(c.id) and needs_codes(c, tasks)]
            done_before = [c for c in batch if writer.contains(c.id)]
            resumed += len(done_before)
            # encoded in an earlier run: part of the manifest's success count, so the rate covers the whole set
            counter.accept(sum((c.custom or {}).get("task") in tasks for c in done_before))
            waves = dict(zip((c.id for c in todo), pool.map(_load, todo)))  # audio I/O in parallel
            for cut in batch:
                if writer.contains(cut.id):
                    continue
                if cut.id not in waves:
                    writer.write(cut)
                    copied += 1
                    continue
                try:
                    wav = waves[cut.id]
                    if isinstance(wav, SkipSample):
                        raise wav
                    writer.write(encode_cut(cut, wav, codecs, drop_recording))
                    encoded += 1
                    counter.accept()
                except SkipSample as e:
                    counter.skip(e, cut_id=cut.id)
                    failed.write(json.dumps({"id": cut.id, "reason": e.reason, "detail": e.detail}) + "\n")
            if writer.file is not None:
                writer.file.flush()
            failed.flush()
            bar.update(len(batch))
    return report(counter, f"encoded {encoded}, copied {copied} cuts of other tasks or with codes, {resumed} already "
                  f"done ({already} lines found in {output}); failures listed in {failed_path}", out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="manifest to pre-tokenise (.jsonl or .jsonl.gz)")
    parser.add_argument("--output", "-o", type=Path, required=True,
                        help="output manifest (.jsonl resumes most cheaply; must differ from the input)")
    parser.add_argument("--model-config", type=Path, required=True, help="model YAML with vocab and codec nodes")
    parser.add_argument("--tasks", type=comma_separated(TASKS), default=TASKS,
                        help="which generation tasks to encode (default tts,tta)")
    parser.add_argument("--batch-size", type=int, default=16, help="cuts loaded in parallel and flushed together")
    parser.add_argument("--num-workers", type=int, default=2, help="threads that load audio")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--drop-recording", action="store_true", help="remove the audio reference once encoded")
    parser.add_argument("--max-skip-rate", type=float, default=0.05)
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"{args.input} does not exist")
    if args.input.resolve() == args.output.resolve():
        parser.error("--output must differ from the input manifest")
    codecs = build_codecs(load_model_config(args.model_config), args.tasks, args.device)
    return pretokenize(args.input, args.output, codecs, args.tasks, args.batch_size, args.num_workers,
                       args.drop_recording, args.max_skip_rate)


if __name__ == "__main__":
    sys.exit(main())
