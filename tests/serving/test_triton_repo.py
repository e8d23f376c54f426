"""Triton repositories: generated config.pbtxt files parse back into tritonclient's ModelConfig, the GPU ensemble is
wired consistently, and the python steps around the TensorRT-LLM engine write the same prompts as the pipelines."""


import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tritonclient.grpc import model_config_pb2 as mc

from audex import config_path
from audex.cli.triton_repo import main as triton_repo_main
from audex.export.bundle import export_bundle
from audex.inference.pipelines import AudexPipeline
from audex.prompts import tts_user_content
from audex.serving.requests import BadRequest, ServeLimits
from audex.serving.triton.handlers import LlmHandler
from audex.serving.triton.llm_io import LlmInputBuilder, LlmOutputDecoder
from audex.serving.triton.repository import ModelSummary, write_cpu_repository, write_gpu_repository
from audex.serving.triton.repository_check import RepositoryError, read_config, validate_repository


def test_cpu_repository_config(tiny_model, tmp_path):
    nemo = tmp_path / "m.nemo"
    tiny_model.save_to(str(nemo))
    repo = write_cpu_repository(tmp_path / "repo", nemo, limits=ServeLimits(max_audio_seconds=30.0), max_batch_size=8)
    assert validate_repository(repo) == ["audex"]
    cfg = read_config(repo / "audex" / "config.pbtxt")
    assert cfg.backend == "python" and cfg.max_batch_size == 8 and cfg.dynamic_batching.max_queue_delay_microseconds > 0
    assert {i.name for i in cfg.input} == {"task", "text", "audio", "sample_rate", "max_new_tokens", "seed",
                                           "guidance_scale", "voice", "voice_sample_rate", "voice_text", "tools"}
    assert {o.name for o in cfg.output} == {"text", "audio", "finish_reason", "tool_calls"}
    assert cfg.parameters["max_audio_seconds"].string_value == "30.0"
    assert cfg.parameters["model_path"].string_value == str(nemo.resolve())
    # one python-model stack: the CPU model is the ensemble steps' python model with the local engine as handler
    model_py = (repo / "audex" / "1" / "model.py").read_text()
    assert "class TritonPythonModel(AudexPythonModel)" in model_py and "handlers:LocalEngineHandler" in model_py
    assert ServeLimits.from_params({k: v.string_value for k, v in cfg.parameters.items()}) == \
        ServeLimits(max_audio_seconds=30.0)                                # the limits round-trip through config.pbtxt
    (repo / "audex" / "config.pbtxt").write_text(cfg.__class__.__name__ + " { }")
    with pytest.raises(RepositoryError, match="not a valid Triton ModelConfig"):
        validate_repository(repo)


def test_gpu_ensemble_is_filled_from_the_model_and_wired(tiny_model, tmp_path):
    summary = ModelSummary.of(tiny_model)
    assert (summary.hidden_size, summary.vocab_size, summary.frames_per_window) == (128, 1536, 250)
    repo = write_gpu_repository(tmp_path / "repo", tmp_path / "export", summary, max_batch_size=64,
                                handler_process="worker")
    # one LLM model (one engine): no tensorrt_llm_stream; tensorrt_llm_once only forwards to it
    assert validate_repository(repo) == ["ensemble", "ensemble_stream", "postprocessing", "postprocessing_stream",
                                         "preprocessing", "tensorrt_llm", "tensorrt_llm_once"]
    llm = read_config(repo / "tensorrt_llm" / "config.pbtxt")
    # Audex's python LLM model: TensorRT-LLM's executor with the CFG pairing post-processor, decoupled with
    # TensorRT-LLM's `streaming` input, as TensorRT-LLM's own model serves both kinds of request
    assert llm.backend == "python" and llm.model_transaction_policy.decoupled
    assert "streaming" in {i.name for i in llm.input} and llm.parameters["handler_process"].string_value == "worker"
    assert llm.parameters["executor"].string_value == "tensorrt_llm"
    assert llm.parameters["batch_scheduler_policy"].string_value == "guaranteed_no_evict"
    assert llm.parameters["enable_chunked_context"].string_value == "false"
    assert {"uncond_input_ids", "uncond_input_lengths", "guidance_scale", "output_kind"} <= {i.name for i in llm.input}
    assert "AudexPythonModel" in (repo / "tensorrt_llm" / "1" / "model.py").read_text()
    table = next(i for i in llm.input if i.name == "prompt_embedding_table")
    assert list(table.dims) == [-1, 128]
    pre = read_config(repo / "preprocessing" / "config.pbtxt")
    assert pre.parameters["max_audio_seconds"].string_value == "30.0"      # the same limits as the CPU engine
    assert (repo / "preprocessing" / "1" / "presets.yaml").exists()
    stream = read_config(repo / "ensemble_stream" / "config.pbtxt")
    assert stream.model_transaction_policy.decoupled            # TTS streaming
    assert [step.model_name for step in stream.ensemble_scheduling.step] == ["preprocessing", "tensorrt_llm",
                                                                             "postprocessing_stream"]
    assert stream.ensemble_scheduling.step[1].input_map["streaming"] == "stream"     # TensorRT-LLM's ensemble input
    assert "stream" not in stream.ensemble_scheduling.step[0].input_map
    assert read_config(repo / "postprocessing_stream" / "config.pbtxt").parameters["partial"].string_value == "true"
    once = read_config(repo / "tensorrt_llm_once" / "config.pbtxt")
    assert not once.model_transaction_policy.decoupled and "streaming" not in {i.name for i in once.input}
    assert {i.name for i in once.input} == {i.name for i in llm.input} - {"streaming"}
    assert [o.name for o in once.output] == [o.name for o in llm.output]
    assert once.parameters["llm_model"].string_value == "tensorrt_llm"
    assert once.parameters["handler_process"].string_value == "stub"        # BLS calls: never in a worker
    assert "llm_once:LlmOnceHandler" in (repo / "tensorrt_llm_once" / "1" / "model.py").read_text()
    ens = read_config(repo / "ensemble" / "config.pbtxt")
    assert not ens.model_transaction_policy.decoupled and "stream" not in {i.name for i in ens.input}
    assert [o.name for o in ens.output] == ["text_output", "audio_output"]
    assert ens.ensemble_scheduling.step[1].model_name == "tensorrt_llm_once"
    ens.ensemble_scheduling.step[1].model_name = "tensorrt_llm"     # the decoupled model straight in `ensemble`
    (repo / "ensemble" / "config.pbtxt").write_text(str(ens))
    with pytest.raises(RepositoryError, match="not decoupled"):
        validate_repository(repo)


def test_gpu_ensemble_rules_triton_enforces_at_load_time(tiny_model, tmp_path):
    """Two mistakes Triton only reports when it loads (or answers): an ensemble output named like an input (answered
    twice), and a step fed from different decoupled sources (refused) -- both now caught when the repo is written."""
    summary = ModelSummary.of(tiny_model)
    repo = write_gpu_repository(tmp_path / "repo", tmp_path / "export", summary)
    ens = read_config(repo / "ensemble" / "config.pbtxt")
    ens.output[0].name = "text"
    ens.ensemble_scheduling.step[2].output_map["text"] = "text"
    (repo / "ensemble" / "config.pbtxt").write_text(str(ens))
    with pytest.raises(RepositoryError, match="both an input and an output"):
        validate_repository(repo)
    repo = write_gpu_repository(tmp_path / "repo2", tmp_path / "export", summary)
    stream = read_config(repo / "ensemble_stream" / "config.pbtxt")
    post = stream.ensemble_scheduling.step[2]
    post.input_map["output_kind"] = "_output_kind"         # from preprocessing, i.e. before the decoupled LLM
    (repo / "ensemble_stream" / "config.pbtxt").write_text(str(stream))
    with pytest.raises(RepositoryError, match="different decoupled sources"):
        validate_repository(repo)
    # TensorRT-LLM's C++ backend: no Python post-processor, so no CFG inputs (documented: TTS/TTA unguided)
    # its prompt table goes to the executor as preprocessing writes it, so in the engine's dtype (never bfloat16,
    # which NumPy cannot write); Audex's own LLM model takes float32 and casts it to the engine's dtype
    cpp = write_gpu_repository(tmp_path / "cpp", tmp_path / "export", summary, llm_backend="tensorrtllm",
                               prompt_table_dtype="float16")
    validate_repository(cpp)
    llm = read_config(cpp / "tensorrt_llm" / "config.pbtxt")
    assert llm.backend == "tensorrtllm" and "uncond_input_ids" not in {i.name for i in llm.input}
    assert llm.model_transaction_policy.decoupled and "streaming" in {i.name for i in llm.input}
    cpp_once = read_config(cpp / "tensorrt_llm_once" / "config.pbtxt")    # the same BLS front, without output_kind
    assert cpp_once.parameters["llm_outputs"].string_value == "output_ids,sequence_length"
    table_type = {i.name: i.data_type for i in llm.input}["prompt_embedding_table"]
    assert table_type == mc.DataType.Value("TYPE_FP16")
    with pytest.raises(ValueError, match="cannot write bfloat16"):
        write_gpu_repository(tmp_path / "cpp16", tmp_path / "export", summary, llm_backend="tensorrtllm")
    # a built engine decides: its config.json says float16, so the table is float16 whatever the config asked for
    engine = tmp_path / "engine_fp16"
    engine.mkdir()
    (engine / "config.json").write_text('{"pretrained_config": {"dtype": "float16"}}')
    cpp = write_gpu_repository(tmp_path / "cpp_built", tmp_path / "export", summary, llm_backend="tensorrtllm",
                               engine_dir=engine, prompt_table_dtype="bfloat16")
    pre = read_config(cpp / "preprocessing" / "config.pbtxt")
    assert pre.parameters["prompt_table_dtype"].string_value == "float16"
    assert {i.name: i.data_type for i in read_config(cpp / "tensorrt_llm" / "config.pbtxt").input}[
        "prompt_embedding_table"] == mc.DataType.Value("TYPE_FP16")
    python_llm = read_config(repo / "tensorrt_llm" / "config.pbtxt")
    assert {i.name: i.data_type for i in python_llm.input}["prompt_embedding_table"] == mc.DataType.Value("TYPE_FP32")
    with pytest.raises(ValueError, match="executor must be one of"):
        write_gpu_repository(tmp_path / "bad", tmp_path / "export", summary, executor="onnx")


def test_engine_steps_write_the_pipeline_prompts_and_decode_codes(tiny_model, tmp_path):
    cfg = OmegaConf.load(config_path("export.yaml"))
    cfg.trtllm.dtype = "float32"
    export_bundle(tiny_model, tmp_path / "export", cfg)
    builder = LlmInputBuilder(tmp_path / "export", 250, 10.0)
    pipe = AudexPipeline(tiny_model)
    tts = builder.build("tts", text="Hello there.")
    cond, uncond = pipe._generation_prompts(tts_user_content, ["Hello there."], tiny_model.vocab.speechgen_start, False)
    assert tts["input_ids"][0].tolist() == cond[0]
    assert tts["runtime_top_k"][0, 0] == 80 and abs(tts["temperature"][0, 0] - 0.1) < 1e-6   # the TTS preset
    assert tts["uncond_input_ids"][0].tolist() == uncond[0] and tts["guidance_scale"][0, 0] == 1.5   # CFG twin, lambda
    assert tts["output_kind"][0, 0] == b"speech"
    plain = builder.build("tts", text="Hello there.", guidance_scale=1.0)
    assert plain["uncond_input_lengths"][0, 0] == 0 and plain["uncond_input_ids"].shape == (1, 0)
    assert builder.build("tta", text="A dog barks.")["guidance_scale"][0, 0] == 3.0
    wav = (0.2 * np.sin(np.arange(8000) / 16000 * 2 * np.pi * 300)).astype(np.float32)
    asr = builder.build("asr", audio=wav)
    expected = pipe._with_audio(pipe.prompt_ids(pipe.formatter.audio_content("Transcribe the speech in the input audio")),
                                [torch.from_numpy(wav)], "test")
    ids = asr["input_ids"][0]
    fake = ids >= 1536
    assert fake.sum() == 250 and asr["prompt_embedding_table"].shape == (1, 250, 128)
    assert np.where(fake, tiny_model.tokenizer.so_embedding, ids).tolist() == expected
    with pytest.raises(BadRequest, match="unknown task"):
        builder.build("sing", text="x")
    with pytest.raises(BadRequest, match="over the server's limit"):        # the CPU engine's validation
        builder.build("asr", audio=np.zeros(16000 * 31, np.float32))
    with pytest.raises(BadRequest, match="NaN"):
        builder.build("asr", audio=np.full(1600, np.nan, np.float32))
    decoder = LlmOutputDecoder(tmp_path / "export")
    codes = torch.tensor([3, 9, 27, 81, 200])
    ids = [tiny_model.vocab.speechgen_start] + tiny_model.vocab.speech_codes_to_ids(codes).tolist() + \
        [tiny_model.vocab.speechgen_end, tiny_model.tokenizer.im_end]
    _, audio = decoder.decode("tts", ids)
    np.testing.assert_allclose(audio, tiny_model.speech_codec.decode(codes).numpy(), atol=1e-5)


def test_make_triton_repo_cli_writes_both_layouts(tiny_model, tmp_path, capsys):
    def cli_main(overrides):
        with initialize_config_dir(str(config_path()), version_base=None):
            return triton_repo_main(compose("triton_repo", overrides=overrides))

    nemo = tmp_path / "tiny.nemo"
    tiny_model.save_to(str(nemo))
    cli_main([f"model_path={nemo}", f"repo={tmp_path / 'cpu'}"])
    assert "models ['audex']" in capsys.readouterr().out
    cfg = OmegaConf.load(config_path("export.yaml"))
    cfg.trtllm.dtype = "float32"
    export_bundle(tiny_model, tmp_path / "export", cfg)
    cli_main(["layout=gpu", f"export_dir={tmp_path / 'export'}", f"repo={tmp_path / 'gpu'}", "executor=torch",
              "serve.max_audio_seconds=20"])
    assert "'ensemble', 'ensemble_stream'" in capsys.readouterr().out
    llm = read_config(tmp_path / "gpu" / "tensorrt_llm" / "config.pbtxt")
    assert llm.parameters["executor"].string_value == "torch"
    pre = read_config(tmp_path / "gpu" / "preprocessing" / "config.pbtxt")
    assert float(pre.parameters["max_audio_seconds"].string_value) == 20.0
    # audex/conf/export.yaml's build: 64 concurrent clips of the longest allowed length (30 s = 3 x 250 tiny frames)
    cli_main(["layout=gpu", f"export_dir={tmp_path / 'export'}", f"repo={tmp_path / 'gpu64'}",
              "trtllm.kv_cache_max_tokens=65536"])
    p = read_config(tmp_path / "gpu64" / "tensorrt_llm" / "config.pbtxt").parameters
    table, batch = int(p["max_prompt_embedding_table_size"].string_value), int(p["max_batch_size"].string_value)
    assert batch == 64 and table // batch >= 750 and p["enable_kv_cache_reuse"].string_value == "false"
    assert p["kv_cache_max_tokens"].string_value == "65536"
    # the one LLM model streams only when it is decoupled (TensorRT-LLM's own model refuses the same)
    params = {k: v.string_value for k, v in llm.parameters.items()} | {"model_dir": str(tmp_path / "gpu" / "tensorrt_llm" / "1")}
    for decoupled in ("false", "true"):
        handler = LlmHandler(params | {"decoupled": decoupled})
        inputs = {"input_ids": np.array([[5, 6, 7]], np.int32), "input_lengths": np.array([[3]], np.int32),
                  "request_output_len": np.array([[2]], np.int32), "end_id": np.array([[1]], np.int32),
                  "pad_id": np.array([[0]], np.int32), "streaming": np.array([[True]])}
        try:
            if decoupled == "false":
                with pytest.raises(ValueError, match="streaming is only supported in decoupled mode"):
                    handler.job(inputs)
            else:
                assert handler.job(inputs).streaming and not handler.job(inputs | {"streaming": np.array([[False]])}).streaming
                assert not handler.job({k: v for k, v in inputs.items() if k != "streaming"}).streaming
        finally:
            handler.close()
    # the LLM model checks the same at start-up (an engine built with other sizes than the repository was written for)
    params = {k: v.string_value for k, v in p.items()}
    params.update(executor="torch", max_prompt_embedding_table_size="24000")
    with pytest.raises(ValueError, match="375 rows, but one clip of serve.max_audio_seconds=30 takes 750 rows"):
        LlmHandler(params)
    # an engine for two ranks in TensorRT-LLM's leader mode: rank 1's server loads the LLM model as a participant
    # (it takes no requests, as TensorRT-LLM's own model on a non-leader rank)
    params.update(max_prompt_embedding_table_size="48000", world_size="2",
                  model_dir=str(tmp_path / "gpu64" / "tensorrt_llm" / "1"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMPI_COMM_WORLD_RANK", "1")
        mp.setenv("OMPI_COMM_WORLD_SIZE", "2")
        participant = LlmHandler(params | {"decoupled": "true"})
        assert participant.participant
        with pytest.raises(RuntimeError, match="participant rank .* send requests to the leader"):
            participant.submit(1, {}, None)
        participant.close()
        mp.setenv("OMPI_COMM_WORLD_RANK", "0")
        leader = LlmHandler(params | {"decoupled": "true"})
        assert not leader.participant
        leader.close()
    with pytest.raises(ValueError, match="max_prompt_embedding_table_size=24000 gives each of max_batch_size=64 "
                                         "requests 375 rows"):
        cli_main(["layout=gpu", f"export_dir={tmp_path / 'export'}", f"repo={tmp_path / 'gpu375'}",
                  "trtllm.build.max_prompt_embedding_table_size=24000"])
    with pytest.raises(FileNotFoundError, match="not an export folder|no audex_export.json"):
        cli_main(["layout=gpu", f"export_dir={tmp_path / 'nowhere'}", f"repo={tmp_path / 'gpu2'}"])
