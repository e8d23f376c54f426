"""Print what each GPU holds under a parallel layout, as a dry run on the meta device (nothing allocated).

    python examples/audex_plan_parallelism.py model=audex_30b_a3b parallelism=paper
    python examples/audex_plan_parallelism.py model=audex_2b parallelism=paper parallelism.expert=1
    python examples/audex_plan_parallelism.py model=audex_30b_a3b parallelism=paper parallelism.world_size=1024

An impossible layout (sizes that do not divide, EP larger than the experts, CP without packed rows, ...) ends
with the error naming the key to change. The last line is the plan as JSON.
"""

import json
import sys
from dataclasses import asdict

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from audex import CONF_DIR
from audex.cli.light_runner import hydra_runner
from audex.parallel.config import ParallelismConfig, ParallelismError
from audex.parallel.planner import format_plan, plan_layout


@hydra_runner(config_path=str(CONF_DIR), config_name="plan_parallelism")
def main(cfg: DictConfig) -> None:
    try:
        parallelism = ParallelismConfig.from_dict(cfg.parallelism)
        plan = plan_layout(cfg.model, parallelism, packing=bool(cfg.data.packing.enabled),
                           max_length=int(cfg.data.max_length), micro_batch_rows=int(cfg.micro_batch_rows),
                           model_name=str(cfg.model.get("name", None) or _choice("model")))
    except ParallelismError as err:
        print(f"impossible layout: {err}", file=sys.stderr)
        sys.exit(2)
    print(format_plan(plan))
    print(json.dumps({k: v for k, v in asdict(plan).items() if k != "dims"} | {"dims": asdict(plan.dims)}))


def _choice(group: str) -> str:
    return str(HydraConfig.get().runtime.choices.get(group, group))

