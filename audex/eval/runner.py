"""One evaluation run from a config (``conf/eval/eval.yaml``): inputs -> suite -> files. Used by
``examples/audex_eval.py`` and callable from Python with the same config.

Example::

    cfg = OmegaConf.merge(OmegaConf.load("conf/eval/eval.yaml"), {"suite": OmegaConf.load("conf/eval/suite/asr.yaml")},
                          {"model": "audex.nemo", "manifest": "test_clean.jsonl.gz"})
    summary = run_eval(cfg)
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from audex.eval.engine import EvalEngine
from audex.eval.report import SuiteSummary
from audex.eval.samples import load_hypotheses, load_samples
from audex.eval.suites import suite_class
from audex.models.checkpoint import load_model, resolve_device

log = logging.getLogger(__name__)


def _engine(cfg: DictConfig, model_path: str, device) -> EvalEngine:
    generation = cfg.get("generation")  # an empty DictConfig is falsy: never `or {}` it into a plain dict
    generation = OmegaConf.to_container(generation, resolve=True) if generation is not None else {}
    overrides = list(cfg.get("preset_overrides") or [])
    return EvalEngine(load_model(model_path, device), seed=int(cfg.get("seed", 0)), generation=generation,
                      preset_overrides=overrides, presets_path=cfg.get("presets_path"))


def run_eval(cfg: DictConfig) -> SuiteSummary:
    suite_cfg = OmegaConf.to_container(cfg.suite, resolve=True)
    name = suite_cfg.pop("name")
    cls = suite_class(name)
    samples, problems = load_samples(cfg.get("manifest"), cfg.get("references"), cfg.get("folder"),
                                     cfg.get("tarred_audio_filepaths"))
    if cfg.get("limit"):
        samples = samples[: int(cfg.limit)]

    notes = []
    hypotheses, engine, extra = None, None, {}
    device = resolve_device(cfg.get("device"))
    if cfg.get("hypotheses"):
        hypotheses, hyp_problems = load_hypotheses(cfg.hypotheses)
        problems += hyp_problems
        label = f"hypotheses {cfg.hypotheses}"
    else:
        if cfg.get("model") in (None, "???"):
            raise ValueError("set model=<.nemo | pretrained folder> (or hypotheses=<JSONL> to score existing outputs)")
        engine = _engine(cfg, cfg.model, device)
        label = str(cfg.model)
        if Path(label).suffix in (".yaml", ".yml"):
            notes.append(f"model {label} is a config with RANDOM weights: these numbers test the harness, not a model")
    if name == "text":
        if not cfg.get("baseline_model"):
            raise ValueError("the text suite needs baseline_model=<checkpoint> to compare model with")
        extra["baseline_engine"] = _engine(cfg, cfg.baseline_model, device)
        suite_cfg.update(model_label=label, baseline_label=str(cfg.baseline_model))

    suite = cls(suite_cfg, engine=engine, hypotheses=hypotheses, **extra)
    summary = suite.run(samples, cfg.output_dir, model_label=label, problems=problems,
                        batch_size=int(cfg.get("batch_size", 8)), resume=bool(cfg.get("resume", True)),
                        retry_errors=bool(cfg.get("retry_errors", False)), progress=bool(cfg.get("progress", True)),
                        extra_notes=notes)
    log.info("wrote %s", Path(cfg.output_dir) / "summary.md")
    return summary
