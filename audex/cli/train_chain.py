"""Run a chain of Audex stages as one command, each stage initialised from the previous stage's ``.nemo``.

    audex-train-chain                                   # conf/stage_chain.yaml: stage0_text -> stage1 -> 2 -> 3
    audex-train-chain --config-name=demo_chain          # the CPU demo (scripts/run_demo.sh)
    audex-train-chain 'stages=[stage1,single_stage]' init_from=base.nemo

The chain config lists ``stages``, the first stage's ``init_from``, ``overrides`` for every stage and
``stage_overrides`` per stage (Hydra override strings, as on the ``audex-train`` command line). A stage whose
``.nemo`` exists is skipped, and a stage that was killed resumes from its last checkpoint: rerunning the same
command continues a killed chain. A text regression with ``model.text_gate.on_regression=error`` stops the chain
before the next stage.
"""

import logging
import time
from pathlib import Path

from hydra import compose
from nemo.core.config import hydra_runner
from omegaconf import DictConfig

from audex import CONF_DIR
from audex.training.run import train_stage


def stage_overrides(chain: DictConfig, stage: str, previous_nemo: str | None) -> list[str]:
    """The Hydra overrides of one stage of the chain: common, per stage, run folder, init weights."""
    overrides = [str(o) for o in chain.get("overrides") or []]
    overrides += [str(o) for o in (chain.get("stage_overrides") or {}).get(stage) or []]
    overrides.append(f"exp_manager.exp_dir={chain.run_dir}")
    if previous_nemo is not None:
        overrides.append(f"model.init_from={previous_nemo}")
    return overrides


def run_chain(chain: DictConfig) -> list[Path]:
    """Train every stage of ``chain`` in order (composed from the same config search path); the ``.nemo`` paths."""
    previous = chain.get("init_from")
    outputs, timings = [], {}
    for stage in chain.stages:
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


@hydra_runner(config_path=str(CONF_DIR), config_name="stage_chain")
def main(chain: DictConfig) -> None:
    logging.getLogger("audex").setLevel(logging.INFO)
    run_chain(chain)
