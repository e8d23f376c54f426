"""Triton repositories: generated config.pbtxt files parse back into tritonclient's ModelConfig, the GPU ensemble is
wired consistently, and the python steps around the TensorRT-LLM engine write the same prompts as the pipelines."""

import numpy as np
import pytest
import torch

pytest.importorskip("tritonclient.grpc")

from audex.export.serving import ServeLimits  # noqa: E402
from audex.export.triton_repo import (  # noqa: E402
    ModelSummary,
    RepositoryError,
    read_config,
    validate_repository,
    write_cpu_repository,
    write_gpu_repository,
)


def test_cpu_repository_config(tiny_model, tmp_path):
    nemo = tmp_path / "m.nemo"
    tiny_model.save_to(str(nemo))
    repo = write_cpu_repository(tmp_path / "repo", nemo, limits=ServeLimits(max_audio_seconds=30.0), max_batch_size=8)
    assert validate_repository(repo) == ["audex"]
    cfg = read_config(repo / "audex" / "config.pbtxt")
    assert cfg.backend == "python" and cfg.max_batch_size == 8 and cfg.dynamic_batching.max_queue_delay_microseconds > 0
    assert {i.name for i in cfg.input} == {"task", "text", "audio", "sample_rate", "max_new_tokens", "seed",
                                           "guidance_scale"}
    assert cfg.parameters["max_audio_seconds"].string_value == "30.0"
    assert cfg.parameters["model_path"].string_value == str(nemo.resolve())
    (repo / "audex" / "config.pbtxt").write_text(cfg.__class__.__name__ + " { }")
    with pytest.raises(RepositoryError, match="not a valid Triton ModelConfig"):
        validate_repository(repo)


def test_gpu_ensemble_is_filled_from_the_model_and_wired(tiny_model, tmp_path):
    summary = ModelSummary.of(tiny_model)
    assert (summary.hidden_size, summary.vocab_size, summary.frames_per_window) == (128, 1536, 250)
    repo = write_gpu_repository(tmp_path / "repo", tmp_path / "export", summary, max_batch_size=64)
    assert validate_repository(repo) == ["ensemble", "ensemble_stream", "postprocessing", "preprocessing",
                                         "tensorrt_llm", "tensorrt_llm_stream"]
    llm = read_config(repo / "tensorrt_llm" / "config.pbtxt")
    assert llm.backend == "tensorrtllm" and not llm.model_transaction_policy.decoupled
    assert llm.parameters["batch_scheduler_policy"].string_value == "guaranteed_no_evict"
    table = next(i for i in llm.input if i.name == "prompt_embedding_table")
    assert list(table.dims) == [-1, 128]
    stream = read_config(repo / "ensemble_stream" / "config.pbtxt")
    assert stream.model_transaction_policy.decoupled            # TTS streaming
    assert read_config(repo / "tensorrt_llm_stream" / "config.pbtxt").model_transaction_policy.decoupled
    ens = read_config(repo / "ensemble" / "config.pbtxt")
    ens.ensemble_scheduling.step[1].model_name = "tensorrt_llm_stream"
    (repo / "ensemble" / "config.pbtxt").write_text(str(ens))
    with pytest.raises(RepositoryError, match="not decoupled"):
        validate_repository(repo)


def test_engine_steps_write_the_pipeline_prompts_and_decode_codes(tiny_model, tmp_path):
    from omegaconf import OmegaConf

    from audex.data.prompts import tts_user_content
    from audex.export.bundle import export_bundle
    from audex.export.triton_models.trtllm_steps import EngineInputBuilder, EngineOutputDecoder
    from audex.inference.pipelines import AudexPipeline

    cfg = OmegaConf.load("conf/export.yaml")
    cfg.trtllm.dtype = "float32"
    export_bundle(tiny_model, tmp_path / "export", cfg)
    builder = EngineInputBuilder(tmp_path / "export", 250, 10.0)
    pipe = AudexPipeline(tiny_model)
    tts = builder.build("tts", text="Hello there.")
    cond, _ = pipe._generation_prompts(tts_user_content, ["Hello there."], tiny_model.vocab.speechgen_start, False)
    assert tts["input_ids"][0].tolist() == cond[0]
    assert tts["runtime_top_k"][0, 0] == 80 and abs(tts["temperature"][0, 0] - 0.1) < 1e-6   # the TTS preset
    wav = (0.2 * np.sin(np.arange(8000) / 16000 * 2 * np.pi * 300)).astype(np.float32)
    asr = builder.build("asr", audio=wav)
    expected = pipe._with_audio(pipe.prompt_ids(pipe.formatter.audio_content("Transcribe the speech in the input audio")),
                                [torch.from_numpy(wav)], "test")
    ids = asr["input_ids"][0]
    fake = ids >= 1536
    assert fake.sum() == 250 and asr["prompt_embedding_table"].shape == (1, 250, 128)
    assert np.where(fake, tiny_model.tokenizer.so_embedding, ids).tolist() == expected
    with pytest.raises(ValueError, match="unknown task"):
        builder.build("sing", text="x")
    decoder = EngineOutputDecoder(tmp_path / "export")
    codes = torch.tensor([3, 9, 27, 81, 200])
    ids = [tiny_model.vocab.speechgen_start] + tiny_model.vocab.speech_codes_to_ids(codes).tolist() + \
        [tiny_model.vocab.speechgen_end, tiny_model.tokenizer.im_end]
    _, audio = decoder.decode("tts", ids)
    np.testing.assert_allclose(audio, tiny_model.speech_codec.decode(codes).numpy(), atol=1e-5)
