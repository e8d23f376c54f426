"""Run an Audex model on WAV files, texts or a Lhotse manifest; write JSONL (and WAVs for generated audio).

    audex-infer model.path=audex_2b.nemo task=asr 'inputs.wav=[data/*.wav]'
    python examples/audex_infer.py model.path=conf/model/tiny.yaml task=tta 'inputs.text=[Birds chirping.]'

Tasks are those of :mod:`audex.tasks`. Each input gets one output line; an input that fails (unreadable audio,
missing field, ...) gets ``"status": "error"`` and its reason, and the others go on. Config: ``conf/infer.yaml``.
"""

import logging

from nemo.core.config import hydra_runner
from omegaconf import DictConfig, OmegaConf

from audex import CONF_DIR
from audex.inference.pipelines import AudexPipeline
from audex.inference.presets import presets_from_config
from audex.inference.runner import records_from_manifest, records_from_texts, records_from_wavs, run_inference
from audex.models.checkpoint import load_model
from audex.tasks import record_fields, task


@hydra_runner(config_path=str(CONF_DIR), config_name="infer")
def main(cfg: DictConfig) -> None:
    spec = task(cfg.task)
    inputs = cfg.inputs
    fields = {k: OmegaConf.to_container(inputs[k]) if OmegaConf.is_config(inputs[k]) else inputs[k]
              for k in record_fields()}
    records = records_from_wavs(list(inputs.wav), **fields) + records_from_texts(list(inputs.text), **fields)
    if inputs.manifest:
        records += records_from_manifest(inputs.manifest, cfg.task)
    if not records:
        raise SystemExit(f"no inputs for task {cfg.task!r}: set inputs.wav, inputs.text or inputs.manifest")
    if not spec.audio_in and inputs.wav:
        logging.warning("task %s takes texts; the %d inputs.wav files will be reported as errors", cfg.task, len(inputs.wav))
    model = load_model(cfg.model.path, cfg.model.device, cfg.model.dtype)
    pipe = AudexPipeline(model, presets_from_config(cfg.presets), prompt_format=cfg.prompt_format)
    summary = run_inference(pipe, cfg.task, records, cfg.output.jsonl, batch_size=cfg.batch_size,
                            sampling={k: v for k, v in cfg.sampling.items() if v is not None}, wav_dir=cfg.output.wav_dir,
                            progress=cfg.progress)
    logging.info("%s: %d ok, %d failed -> %s", cfg.task, summary["ok"], summary["failed"], summary["output"])
