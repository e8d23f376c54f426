#!/usr/bin/env python
"""Blend CFG-unconditional copies of 10 % of the TTS and TTA examples into a manifest (section 4.3).

Exactly round(10 %) of each generation task is chosen with a seeded generator; each copy's
transcript/caption is replaced by a random number (``--min-pads`` .. ``--max-pads``) of untrainable
``<pad>`` tokens (see :mod:`audex.data.cfg_uncond`). Run it after ``scripts/pretokenize.py`` so that the
copies carry the codes without encoding the audio twice.

    python scripts/make_cfg_uncond.py manifests/tts_codes.jsonl -o manifests/tts_cfg.jsonl.gz --seed 0
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import Counter
from pathlib import Path

from lhotse import CutSet

from audex.data import schema
from audex.data.cfg_uncond import CfgUncondConfig, blend_cfg_uncond


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="manifest (.jsonl or .jsonl.gz)")
    parser.add_argument("--output", "-o", type=Path, required=True)
    defaults = CfgUncondConfig()
    parser.add_argument("--fraction", type=float, default=defaults.fraction)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--min-pads", type=int, default=defaults.min_pads)
    parser.add_argument("--max-pads", type=int, default=defaults.max_pads)
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"{args.input} does not exist")
    if args.input.resolve() == args.output.resolve():
        parser.error("--output must differ from the input manifest (it is read twice)")
    try:
        config = CfgUncondConfig(args.fraction, args.seed, args.min_pads, args.max_pads)
    except ValueError as e:
        parser.error(str(e))
    cuts = CutSet.from_jsonl_lazy(args.input)
    totals, copies = Counter(), Counter()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    blended = blend_cfg_uncond(cuts, config)
    try:
        first = next(blended, None)  # the selection pass runs (and validates the manifest) here
    except ValueError as e:
        print(f"ERROR: {e}")
        return 1
    with CutSet.open_writer(args.output) as writer:
        for cut in itertools.chain([first] if first is not None else [], blended):
            writer.write(cut)
            task = cut.custom.get("task")
            (copies if cut.custom.get("cfg_uncond_pads") else totals)[task] += 1
    for task in schema.GENERATION_TASKS:
        share = copies[task] / totals[task] if totals[task] else 0.0
        print(f"{task}: {totals[task]} examples, {copies[task]} unconditional copies ({100 * share:.2f} %)")
    print(f"wrote {sum(totals.values()) + sum(copies.values())} cuts to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
