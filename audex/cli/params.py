"""Print the parameter table of Audex model configs, counted on the meta device (no weights allocated).

    audex-params                                   # audex_2b, audex_30b_a3b, tiny (the package's model configs)
    python examples/audex_params.py 'models=[audex_2b,conf/model/my_model.yaml]'

A name is a config of ``conf/model/``; a path is any model YAML. Config: ``conf/params.yaml``.
"""

from pathlib import Path

from omegaconf import DictConfig

from audex import CONF_DIR, config_path
from audex.cli.light_runner import hydra_runner
from audex.models.sizing import count_parameters

COLUMNS = ["vocab_size", "encoder", "adapter", "backbone_text_vocab", "backbone", "backbone_active",
           "backbone_active_non_embedding", "total_llm"]


def parameter_table(models) -> str:
    """The Markdown table of :func:`~audex.models.sizing.count_parameters` for each model name or YAML path."""
    lines = ["| config | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for model in models:
        path = Path(model) if str(model).endswith((".yaml", ".yml")) else config_path("model", f"{model}.yaml")
        if not path.exists():
            raise FileNotFoundError(f"model config {str(path)!r} does not exist: give a name of conf/model/ or a YAML path")
        counts = count_parameters(str(path))
        cells = [f"{counts[k]:,}" if k == "vocab_size" else f"{counts[k] / 1e9:.3f}B" for k in COLUMNS]
        lines.append(f"| {path.stem} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@hydra_runner(config_path=str(CONF_DIR), config_name="params")
def main(cfg: DictConfig) -> None:
    print(parameter_table(list(cfg.models)))
