"""``hydra_runner`` for the commands that build no model (``audex-client``, ``audex-params``,
``audex-plan-parallelism``): the same command line and Hydra settings as NeMo's
``nemo.core.config.hydra_runner`` without importing ``nemo.core``.

Why a copy: importing NeMo's runner imports ``nemo.core`` first (Lightning, torchmetrics and, where it is
installed, megatron-core), about 15 s on a 2-core machine before a client sends one request or the planner
prints one line (measured here: `audex-params` 26 s with it, 10 s with this one). The behaviour is NeMo's: Hydra's own argument parser,
no ``.hydra`` output folder, job logging to stdout, the run directory is the current one. Commands that load a
model (train, infer, eval, export, serve) keep NeMo's runner: they import NeMo anyway.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from hydra._internal.utils import _run_hydra, get_args_parser
from omegaconf import DictConfig

#: the overrides NeMo's hydra_runner appends to every command line
NEMO_RUNNER_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=.")


def hydra_runner(config_path: str, config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[..., Any]]:
    """Decorator: ``main()`` parses ``sys.argv`` as Hydra does and calls the task with the composed config;
    ``main(cfg)`` calls it with ``cfg`` directly (as NeMo's runner does)."""

    def decorator(task_function: Callable[[DictConfig], Any]) -> Callable[..., Any]:
        @functools.wraps(task_function)
        def wrapper(cfg_passthrough: DictConfig | None = None) -> Any:
            if cfg_passthrough is not None:
                return task_function(cfg_passthrough)
            parser = get_args_parser()
            parsed = parser.parse_args()
            parsed.overrides.extend(NEMO_RUNNER_OVERRIDES)
            parsed.parse_args = lambda self=None, args=None, namespace=None: parsed
            _run_hydra(args=parsed, args_parser=parser, task_function=task_function, config_path=config_path,
                       config_name=config_name)
            return None

        return wrapper

    return decorator
