"""Train one Audex stage (Table 3 of the paper) with Lightning + NeMo's exp_manager.

    audex-train --config-name=stage1 model.init_from=runs/stage0_text/stage0_text.nemo trainer=cpu data=demo
    python examples/audex_train.py --config-name=stage2 model=tiny data=demo trainer=cpu trainer.max_steps=200

Stages: stage0_text, stage1 (audio warmup), stage2 (audio generation), stage3 (generation + understanding),
single_stage. A rerun of the same command resumes the run from its last checkpoint (optimizer, LR schedule and
data position included); the stage ends by writing ``output_nemo`` (``runs/<stage>/<stage>.nemo``), which the next
stage's ``model.init_from`` names. The whole chain in one command: ``audex-train-chain``.
"""

import logging

from nemo.core.config import hydra_runner
from omegaconf import DictConfig, OmegaConf

from audex import CONF_DIR
from audex.training.run import train_stage


@hydra_runner(config_path=str(CONF_DIR), config_name="stage1")
def main(cfg: DictConfig) -> None:
    logging.getLogger("audex").setLevel(logging.INFO)
    logging.info("stage config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    nemo_path = train_stage(cfg)
    print(f"AUDEX_STAGE_DONE {cfg.name} {nemo_path}", flush=True)
