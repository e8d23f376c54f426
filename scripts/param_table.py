#!/usr/bin/env python
"""Print the parameter table of the Audex configs, counted on the meta device (no weights allocated).

    python scripts/param_table.py [conf/model/audex_2b.yaml conf/model/audex_30b_a3b.yaml ...]
"""

import sys
from pathlib import Path

from audex.models.sizing import count_parameters

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [ROOT / "conf/model/audex_2b.yaml", ROOT / "conf/model/audex_30b_a3b.yaml", ROOT / "conf/model/tiny.yaml"]


def main(argv=None) -> None:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])] or DEFAULT
    cols = ["vocab_size", "encoder", "adapter", "backbone_text_vocab", "backbone", "backbone_active", "backbone_active_non_embedding", "total_llm"]
    print("| config | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for p in paths:
        c = count_parameters(str(p))
        cells = [f"{c[k]:,}" if k == "vocab_size" else f"{c[k] / 1e9:.3f}B" for k in cols]
        print(f"| {p.stem} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
