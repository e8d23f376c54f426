"""GPU checks of the TensorRT-LLM serving path (issue 12), for a host with a CUDA GPU and tensorrt_llm==1.2.0rc2:
the tiny engine under Audex's GuidedExecutor, with KV block reuse on (the executor's default) so that the extra-id
scheme is what is exercised. Run with ``bash tests/gpu/run.sh``; every test here skips on a machine without a GPU."""

import subprocess

import pytest
import torch

from audex.export.frontend_onnx import prompt_tuning_inputs
from audex.export.trtllm_checkpoint import trtllm_build_command, write_trtllm_checkpoint
from audex.inference.constraints import CodecConstraint
from audex.inference.decoding import AudexDecoder
from audex.inference.pipelines import AudexPipeline
from audex.inference.sampling import SamplingParams
from audex.prompts import tts_user_content
from audex.serving.guided_executor import GuidedExecutor, LlmJob

pytestmark = pytest.mark.gpu
BUILD = {"max_batch_size": 8, "max_input_len": 512, "max_seq_len": 640, "max_num_tokens": 4096,
         "max_prompt_embedding_table_size": 8 * 250}


@pytest.fixture(scope="module")
def real(tiny_model, tmp_path_factory):
    """``(executor module, engine folder)``: the tiny model built as a float32 engine with a prompt table."""
    pytest.importorskip("tensorrt_llm", reason="TensorRT-LLM is not installed (it installs only on CUDA hosts)")
    import tensorrt_llm
    import tensorrt_llm.bindings.executor as bindings

    assert tensorrt_llm.__version__ == "1.2.0rc2", f"the code is pinned to 1.2.0rc2, not {tensorrt_llm.__version__}"
    root = tmp_path_factory.mktemp("trtllm")
    ckpt = write_trtllm_checkpoint(tiny_model.backbone, root / "ckpt", dtype="float32")
    subprocess.run(trtllm_build_command(ckpt, root / "engine", BUILD), check=True)
    return bindings, root / "engine"


@pytest.fixture
def guided(real, tiny_model):
    bindings, engine = real
    config = bindings.ExecutorConfig(1, scheduler_config=bindings.SchedulerConfig(
        bindings.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT), enable_chunked_context=False)
    assert config.kv_cache_config.enable_block_reuse                       # the default this file is about
    g = GuidedExecutor.create(bindings, str(engine), tiny_model.tokenizer, config, max_inflight=BUILD["max_batch_size"])
    yield g
    g.shutdown()


def run(guided, job, timeout=300):
    import threading

    done, events = threading.Event(), []

    def on_event(event):
        events.append(event)
        if event.final:
            done.set()
    guided.submit(job, on_event)
    assert done.wait(timeout), "the job never finished"
    assert events[-1].error is None, events[-1].error
    return [t for e in events for t in e.tokens] if job.streaming else events[-1].tokens


def test_two_different_clips_back_to_back_get_their_own_answers(guided, tiny_model, tone):
    pipe, tok = AudexPipeline(tiny_model), tiny_model.tokenizer
    for freq, amp in ((440.0, 0.3), (1900.0, 0.9), (440.0, 0.3)):
        wav = tone(1.0, freq, amp=amp)
        prompt = pipe._with_audio(pipe.prompt_ids(pipe.formatter.audio_content("Transcribe the speech in the input "
                                                                                "audio")), [wav], "clip")
        with torch.no_grad():
            embeds = tiny_model.encode_audio([wav])
        ids, table = prompt_tuning_inputs(prompt, tok.so_embedding, tiny_model.vocab.size, embeds)
        want = AudexDecoder.for_model(tiny_model).generate([prompt], SamplingParams(do_sample=False, max_new_tokens=8),
                                                           audio_embeds=[embeds]).token_ids[0]
        got = run(guided, LlmJob(ids, 8, tok.im_end, tok.pad_id, SamplingParams(do_sample=False),
                                 prompt_table=table.to(guided.engine.dtype)))
        assert got == want


def test_sampled_text_with_a_seed_repeats(guided, tiny_model):
    tok = tiny_model.tokenizer
    ids = tok.encode("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    params = SamplingParams(do_sample=True, temperature=1.0, top_k=50, seed=11)
    first, second = (run(guided, LlmJob(ids, 16, tok.im_end, tok.pad_id, params)) for _ in range(2))
    assert first and first == second


def test_a_cfg_pair_on_a_cold_cache_is_guided_throughout(guided, tiny_model):
    pipe, tok = AudexPipeline(tiny_model), tiny_model.tokenizer
    cond, uncond = pipe._generation_prompts(tts_user_content, ["Hello there.", "A longer sentence to speak."],
                                            tiny_model.vocab.speechgen_start, False)
    jobs = [LlmJob(c, 10, tok.im_end, tok.pad_id, SamplingParams(do_sample=False, guidance_scale=3.0),
                   uncond_input_ids=u, output="speech") for c, u in zip(cond, uncond)]
    got = [run(guided, job) for job in jobs]
    want = AudexDecoder.for_model(tiny_model).generate(
        cond, SamplingParams(do_sample=False, guidance_scale=3.0, max_new_tokens=10), uncond_prompts=uncond,
        constraint=CodecConstraint.for_task(tok, "speech", max_speech_seconds=None)).token_ids
    assert got == want
    assert guided.stats["unguided"] == 0 and guided.stats["split"] == 0 and guided.stats["guided"] > 0
