"""Checks a written Triton model repository the way Triton does at load time, without starting a server.

:func:`validate_repository` parses every ``config.pbtxt`` back into a ``ModelConfig`` (unknown fields are errors) and
checks what the schema cannot: folder name = model name, a version folder, ``1/model.py`` for python models, every
ensemble step naming a model of the repository with inputs / outputs that model declares, and Triton's rule on
decoupled sources (:func:`_check_decoupled_flow`).
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc


class RepositoryError(ValueError):
    """A model repository Triton would refuse (the message names the file and the field)."""


def read_config(path: str | Path) -> mc.ModelConfig:
    path = Path(path)
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except text_format.ParseError as e:
        raise RepositoryError(f"{path}: not a valid Triton ModelConfig ({e})") from None


def _check_decoupled_flow(ensemble: mc.ModelConfig, configs: dict) -> None:
    """Triton's rule (``ValidateEnsembleConfig`` of ``ensemble_scheduler/ensemble_utils.cc``): every step takes all its
    inputs from one decoupled source. Tensors carry a label: 0 for the ensemble's inputs, a fresh one for each output
    of a decoupled step, the inputs' label for the outputs of any other step."""
    label = {t.name: 0 for t in ensemble.input}
    fresh = 0
    steps = list(ensemble.ensemble_scheduling.step)
    for _ in range(len(steps)):
        for step in steps:
            if not all(name in label for name in step.input_map.values()) or all(
                    name in label for name in step.output_map.values()):
                continue
            labels = {label[name] for name in step.input_map.values()}
            if len(labels) > 1:
                raise RepositoryError(f"ensemble {ensemble.name!r}: step {step.model_name!r} takes inputs from different "
                                      f"decoupled sources ({sorted(step.input_map.values())}); Triton refuses to load it")
            target = configs.get(step.model_name)
            if target is not None and target.model_transaction_policy.decoupled:
                fresh += 1
                out = fresh
            else:
                out = labels.pop() if labels else 0
            for name in step.output_map.values():
                label[name] = out


def validate_repository(repo: str | Path) -> list[str]:
    """Parse every ``config.pbtxt`` back into a ``ModelConfig`` and check what Triton checks at load time that the
    schema cannot: folder name = model name, a version folder, ``1/model.py`` for python models, and every ensemble
    step naming a model of the repository with inputs/outputs that model declares. Returns the model names."""
    repo = Path(repo)
    configs = {}
    for cfg_path in sorted(repo.glob("*/config.pbtxt")):
        config = read_config(cfg_path)
        folder = cfg_path.parent.name
        if config.name != folder:
            raise RepositoryError(f"{cfg_path}: name {config.name!r} differs from its folder {folder!r}")
        if not config.backend and not config.platform:
            raise RepositoryError(f"{cfg_path}: neither backend nor platform is set")
        if not (cfg_path.parent / "1").is_dir():
            raise RepositoryError(f"{cfg_path.parent}: no version folder 1/")
        if config.backend == "python" and not (cfg_path.parent / "1" / "model.py").exists():
            raise RepositoryError(f"{cfg_path.parent}: python backend without 1/model.py")
        for kind, tensors in (("input", config.input), ("output", config.output)):
            names = [t.name for t in tensors]
            if len(names) != len(set(names)):
                raise RepositoryError(f"{cfg_path}: duplicate {kind} names {sorted({n for n in names if names.count(n) > 1})}")
        configs[config.name] = config
    if not configs:
        raise RepositoryError(f"{repo}: no */config.pbtxt found")
    for config in configs.values():
        if config.platform != "ensemble":
            continue
        clash = {t.name for t in config.input} & {t.name for t in config.output}
        if clash:
            raise RepositoryError(f"ensemble {config.name!r}: {sorted(clash)} is both an input and an output; ensemble "
                                  "tensors share one namespace, so Triton would answer such a request twice")
        _check_decoupled_flow(config, configs)
        for step in config.ensemble_scheduling.step:
            target = configs.get(step.model_name)
            if target is None:
                raise RepositoryError(f"ensemble {config.name!r}: step model {step.model_name!r} is not in {repo}")
            inputs = {t.name for t in target.input}
            outputs = {t.name for t in target.output}
            bad_in = set(step.input_map) - inputs
            bad_out = set(step.output_map) - outputs
            if bad_in or bad_out:
                raise RepositoryError(f"ensemble {config.name!r} -> {step.model_name!r}: unknown inputs {sorted(bad_in)} "
                                      f"/ outputs {sorted(bad_out)}")
            required = {t.name for t in target.input if not t.optional}
            if required - set(step.input_map):
                raise RepositoryError(f"ensemble {config.name!r} -> {step.model_name!r}: required inputs "
                                      f"{sorted(required - set(step.input_map))} are not mapped")
            if target.model_transaction_policy.decoupled and not config.model_transaction_policy.decoupled:
                raise RepositoryError(f"ensemble {config.name!r} runs the decoupled model {step.model_name!r} "
                                      "but is not decoupled itself: Triton makes it decoupled (ValidateEnsembleConfig), "
                                      "and then it answers no HTTP/gRPC infer call; declare it decoupled, or reach the "
                                      "model through a BLS step that is not (tensorrt_llm_once)")
    return sorted(configs)
