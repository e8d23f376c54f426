#!/usr/bin/env python
"""Fixed-voice TTS manifest + prompt-speaker TTS manifest -> the release stage's TTS manifest (footnote 4).

Writes every fixed-voice cut and, after each, its copy with a voice prompt of another speaker whose target stays
the fixed voice (:mod:`audex.data.voice_release`); ``conf/stage_release.yaml`` trains on it.

    python scripts/make_voice_release.py tts/fixed_voice.jsonl.gz tts/prompt_speakers.jsonl.gz \
        -o tts/voice_release.jsonl.gz --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lhotse import CutSet

from audex.data.prepare import add_output_args, write_manifest
from audex.data.voice_release import voice_release_copies


def blended(fixed_voice: CutSet, references: list, seed: int):
    copies = voice_release_copies(fixed_voice, references, seed)
    for cut in fixed_voice:
        yield cut
        if (cut.custom or {}).get("cfg_uncond_pads") is None:
            yield next(copies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixed_voice", type=Path, help="TTS manifest of the fixed voice (pre-tokenised)")
    parser.add_argument("references", type=Path, help="TTS manifest of other speakers (their codes are the prompts)")
    parser.add_argument("--seed", type=int, default=0)
    add_output_args(parser)
    args = parser.parse_args(argv)
    for path in (args.fixed_voice, args.references):
        if not path.is_file():
            parser.error(f"{path} does not exist")
    references = list(CutSet.from_file(str(args.references)))
    fixed_voice = CutSet.from_file(str(args.fixed_voice))
    return write_manifest(blended(fixed_voice, references, args.seed), args.output, "make_voice_release",
                          args.max_skip_rate)


if __name__ == "__main__":
    sys.exit(main())
