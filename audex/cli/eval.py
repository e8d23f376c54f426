"""Evaluate an Audex checkpoint on one of the paper's benchmarks (section 5, appendix A).

    audex-eval model=audex_2b.nemo suite=asr manifest=librispeech_test_clean.jsonl.gz
    audex-eval model=ckpt/ suite=noisy_asr suite.noise.folder=musan/noise manifest=...
    audex-eval model=ckpt/ suite=mcq references=mmau.jsonl folder=mmau_audio/
    audex-eval model=after_stage1.nemo baseline_model=backbone/ suite=text references=chats.jsonl
    audex-eval hypotheses=whisper_outputs.jsonl suite=asr manifest=...   # score another system

Writes <output_dir>/samples.jsonl (per sample, with the reason of every sample not scored), summary.json,
summary.md (our numbers beside the paper's Tables 1, 6-13) and plots; re-running resumes where it stopped.
Configs: conf/eval/eval.yaml and conf/eval/suite/<name>.yaml.
"""

import logging

from nemo.core.config import hydra_runner
from omegaconf import DictConfig

from audex import CONF_DIR
from audex.eval.runner import run_eval


@hydra_runner(config_path=str(CONF_DIR / "eval"), config_name="eval")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO)
    summary = run_eval(cfg)
    metrics = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.metrics.items())
    print(f"{summary.suite}: {metrics} | scored {summary.counts.get('scored', 0)}/{summary.counts.get('total', 0)} "
          f"-> {cfg.output_dir}/summary.md")
