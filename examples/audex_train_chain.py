"""Run a chain of Audex stages as one command, each stage initialised from the previous stage's ``.nemo``.

    python examples/audex_train_chain.py                                  # conf/stage_chain.yaml: stage0 -> 3
    python examples/audex_train_chain.py --chain conf/demo_chain.yaml     # the CPU demo (scripts/run_demo.sh)
    python examples/audex_train_chain.py stages=[stage1,single_stage] init_from=base.nemo

The chain file lists ``stages``, the first stage's ``init_from``, ``overrides`` for every stage and
``stage_overrides`` per stage (Hydra override strings, as on the ``audex_train.py`` command line); any key of
the chain file can be set as ``key=value`` here. A stage whose ``.nemo`` exists is skipped, and a stage that
was killed resumes from its last checkpoint: rerunning the same command continues a killed chain. A text
regression with ``model.text_gate.on_regression=error`` stops the chain before the next stage.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from audex.training.run import train_stage  # noqa: E402


def stage_overrides(chain, stage: str, previous_nemo: str | None) -> list[str]:
    overrides = [str(o) for o in chain.get("overrides") or []]
    overrides += [str(o) for o in (chain.get("stage_overrides") or {}).get(stage) or []]
    overrides.append(f"exp_manager.exp_dir={chain.run_dir}")
    if previous_nemo is not None:
        overrides.append(f"model.init_from={previous_nemo}")
    return overrides


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chain", type=Path, default=ROOT / "conf" / "stage_chain.yaml")
    parser.add_argument("dotlist", nargs="*", help="key=value overrides of the chain file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    chain = OmegaConf.merge(OmegaConf.load(args.chain), OmegaConf.from_dotlist(args.dotlist))
    previous = chain.get("init_from")
    outputs, timings = [], {}
    for stage in chain.stages:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            cfg = compose(config_name=str(stage), overrides=stage_overrides(chain, str(stage), previous))
        out = Path(cfg.output_nemo)
        if out.exists():
            logging.info("stage %s: %s exists, skipping (delete it to retrain)", stage, out)
        else:
            start = time.time()
            out = train_stage(cfg)
            timings[str(stage)] = time.time() - start
        outputs.append(out)
        previous = str(out)
    for stage, seconds in timings.items():
        print(f"AUDEX_STAGE_TIME {stage} {seconds:.1f} s", flush=True)
    print(f"AUDEX_CHAIN_DONE {previous}", flush=True)
    return outputs


if __name__ == "__main__":
    main()
