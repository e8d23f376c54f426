"""The Triton LLM step on the LLM API path (``trtllm.runtime: pytorch``): the repository writer passes the runtime,
and the LLM model built from the written ``config.pbtxt`` answers ASR (audio through the ONNX front end) and a seeded
CFG TTS request exactly as the executor path does (both on their CPU references)."""


import numpy as np
import pytest
from omegaconf import OmegaConf

from audex import config_path
from audex.export.bundle import export_bundle
from audex.serving.requests import ServeLimits
from audex.serving.triton.handlers import LlmHandler, PreprocessingHandler
from audex.serving.triton.repository import ModelSummary, write_gpu_repository
from audex.serving.triton.repository_check import read_config
from audex.serving.triton.worker import run_one

LIMITS = ServeLimits(max_audio_seconds=10.0, max_new_tokens=12, max_speech_seconds=0.3, tta_seconds=0.2)


def call(handler, inputs):
    return run_one(handler, inputs, timeout=120)


@pytest.fixture(scope="module")
def export(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("llm_api_triton")
    cfg = OmegaConf.load(config_path("export.yaml"))
    cfg.trtllm.dtype = "float32"
    export_bundle(tiny_model, work / "export", cfg)
    return work, cfg


def steps(work, cfg, runtime):
    build = OmegaConf.to_container(cfg.trtllm.build, resolve=True)
    repo = write_gpu_repository(work / runtime, work / "export", ModelSummary.from_export(work / "export"),
                                executor="torch", runtime=runtime, max_batch_size=8, limits=LIMITS,
                                build={**build, "max_batch_size": 8, "max_prompt_embedding_table_size": 8 * 750})

    def params(name):
        out = {k: v.string_value for k, v in read_config(repo / name / "config.pbtxt").parameters.items()}
        return out | {"model_dir": str(repo / name / "1"), "decoupled": "false"}
    return PreprocessingHandler(params("preprocessing")), LlmHandler(params("tensorrt_llm")), params("tensorrt_llm")


def test_the_llm_api_runtime_answers_as_the_executor_runtime(export):
    work, cfg = export
    answers = {}
    for runtime in ("engine", "pytorch"):
        pre, llm, params = steps(work, cfg, runtime)
        assert params["trtllm_runtime"] == runtime
        try:
            wav = (0.3 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440)).astype(np.float32)
            asr = call(llm, call(pre, {"task": np.array([[b"asr"]], dtype=np.object_), "audio": wav[None]}))
            tts = call(llm, call(pre, {"task": np.array([[b"tts"]], dtype=np.object_),
                                       "text": np.array([[b"Hello there."]], dtype=np.object_),
                                       "seed": np.array([[7]], np.uint64)}))
            answers[runtime] = (asr["output_ids"].tolist(), tts["output_ids"].tolist(), tts["output_kind"].tolist())
            assert llm.guided.stats["guided"] > 0 and llm.guided.stats["unguided"] == 0
        finally:
            llm.close()
    assert answers["pytorch"] == answers["engine"]
    assert answers["pytorch"][2] == [[b"speech"]] and len(answers["pytorch"][1][0][0]) > 1


def test_the_llm_api_runtime_checks_its_sizes_at_start_up(export):
    work, cfg = export
    _, llm, params = steps(work, cfg, "pytorch")
    llm.close()
    with pytest.raises(ValueError, match="trtllm.build.max_input_len=200 is too small for the LLM API path"):
        LlmHandler(params | {"max_input_len": "200"})
    with pytest.raises(ValueError, match="trtllm.runtime must be one of"):
        write_gpu_repository(work / "bad", work / "export", ModelSummary.from_export(work / "export"),
                             llm_backend="tensorrtllm", runtime="pytorch", prompt_table_dtype="float16")
