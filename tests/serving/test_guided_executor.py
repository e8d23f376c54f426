"""CFG on an in-flight-batching executor: GuidedExecutor over the executor API (the PyTorch reference of
audex.serving.reference_executor on CPU) equals the generation engine's CFG, token for token, and copes with twins the
scheduler splits, cancelled jobs, streaming, bad requests and audio through the prompt table."""

import threading
import time

import pytest
import torch

import audex.serving.reference_executor as trtllm
from audex.export.frontend_onnx import prompt_tuning_inputs
from audex.inference.constraints import CodecConstraint
from audex.inference.decoding import AudexDecoder
from audex.inference.pipelines import AudexPipeline
from audex.inference.sampling import SamplingParams
from audex.prompts import tts_user_content
from audex.serving.guided_executor import GuidedExecutor, LlmJob

LAMBDA, MAX_NEW = 3.0, 10


@pytest.fixture(scope="module")
def prompts(tiny_model):
    pipe = AudexPipeline(tiny_model)
    texts = ["Hello there.", "A longer sentence to speak aloud now.", "Short."]
    return pipe._generation_prompts(tts_user_content, texts, tiny_model.vocab.speechgen_start, False)


def guided_executor(model, max_batch_size=8, max_lag_steps=4, max_inflight=None):
    """Block reuse on (the bindings' default): audio carries content-hash extra ids, twins pair-unique ones."""
    engine = trtllm.ReferenceEngine(model.backbone, max_batch_size=max_batch_size, max_input_len=2048,
                                    max_prompt_embedding_table_size=max_batch_size * 250)
    config = trtllm.ExecutorConfig(1, scheduler_config=trtllm.SchedulerConfig(
        trtllm.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT))
    return GuidedExecutor.create(trtllm, engine, model.tokenizer, config, max_lag_steps=max_lag_steps,
                                 max_inflight=max_inflight)


def wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def assert_drained(guided):
    """Nothing left behind: every job answered, every pair forgotten by the tracker."""
    wait_until(lambda: guided.pending() == 0)
    assert guided.tracker.pairs == {}


@pytest.fixture
def start(tiny_model):
    """``start(max_batch_size=8) -> (GuidedExecutor, Collector)``; every executor started is shut down afterwards."""
    started = []

    def make(max_batch_size=8, max_inflight=None):
        started.append(guided_executor(tiny_model, max_batch_size=max_batch_size, max_inflight=max_inflight))
        return started[-1], Collector()
    yield make
    for guided in started:
        guided.shutdown()


class Collector:
    def __init__(self):
        self.events, self.done, self.lock = {}, {}, threading.Lock()

    def __call__(self, event):
        with self.lock:
            self.events.setdefault(event.job_id, []).append(event)
            if event.final:
                self.done.setdefault(event.job_id, threading.Event()).set()

    def wait(self, job_id, timeout=120):
        with self.lock:
            flag = self.done.setdefault(job_id, threading.Event())
        assert flag.wait(timeout), f"job {job_id} never finished"
        return self.events[job_id]


def speech_job(model, cond, uncond, lam=LAMBDA, **kw):
    tok = model.tokenizer
    return LlmJob(cond, MAX_NEW, tok.im_end, tok.pad_id, SamplingParams(do_sample=False, guidance_scale=lam),
                  uncond_input_ids=uncond, output="speech", **kw)


def engine_cfg(model, cond, uncond, lam=LAMBDA):
    return AudexDecoder.for_model(model).generate(
        cond, SamplingParams(do_sample=False, guidance_scale=lam, max_new_tokens=MAX_NEW),
        uncond_prompts=uncond if lam != 1.0 else None,
        constraint=CodecConstraint.for_task(model.tokenizer, "speech", max_speech_seconds=None)).token_ids


def test_twins_in_one_batch_equal_the_engine_cfg(tiny_model, prompts, start):
    cond, uncond = prompts
    guided, got = start()
    ids = [guided.submit(speech_job(tiny_model, c, u), got) for c, u in zip(cond, uncond)]
    results = [got.wait(i)[-1] for i in ids]
    assert [r.tokens for r in results] == engine_cfg(tiny_model, cond, uncond)
    assert all(r.error is None and r.finish_reason in ("stop", "length") for r in results)
    assert guided.stats["guided"] > 0 and guided.stats["unguided"] == 0
    assert_drained(guided)
    assert max(guided.executor.batch_sizes) == 6                       # the three pairs shared the steps


def test_pair_aware_admission_keeps_every_pair_guided_in_a_full_batch(tiny_model, prompts, start):
    """max_batch_size=3 and max_inflight=3: pair 1 (2 rows) waits until both twins fit instead of being split; the
    text job behind it waits its turn (first come first served). Every pair equals the engine's CFG."""
    cond, uncond = prompts
    tok = tiny_model.tokenizer
    guided, got = start(max_batch_size=3, max_inflight=3)
    a = guided.submit(speech_job(tiny_model, cond[0], uncond[0]), got)
    b = guided.submit(speech_job(tiny_model, cond[1], uncond[1]), got)
    text = guided.submit(LlmJob(cond[2][:-1], 6, tok.im_end, tok.pad_id, SamplingParams(do_sample=False)), got)
    c = guided.submit(speech_job(tiny_model, cond[2], uncond[2]), got)
    assert [got.wait(j)[-1].tokens for j in (a, b, c)] == engine_cfg(tiny_model, cond, uncond)
    assert got.wait(text)[-1].error is None
    assert guided.stats["unguided"] == 0 and guided.stats["retire"] == 0
    assert max(guided.executor.batch_sizes) <= 3
    # a job cancelled while it waits for admission never reaches the executor
    busy = speech_job(tiny_model, cond[0], uncond[0])
    busy.max_new_tokens = 200
    first = guided.submit(busy, got)                                      # 2 of the 3 slots for a while
    queued = guided.submit(speech_job(tiny_model, cond[1], uncond[1]), got)
    requests_before = len(guided._by_req)
    guided.cancel(queued)
    [event] = got.wait(queued)
    assert (event.tokens, event.final, event.finish_reason) == ([], True, "cancelled")
    assert len(guided._by_req) <= requests_before                        # nothing was enqueued for it
    got.wait(first)
    assert_drained(guided)
    with pytest.raises(ValueError, match="max_inflight must be >= 2"):
        GuidedExecutor(trtllm, guided.executor, guided.processor, max_inflight=1)


def test_hybrid_mamba_backbone_pairs_equal_the_engine_cfg():
    """Nemotron-H (the 30B-A3B's family): the same pairing over a hybrid Mamba/attention cache."""
    from audex.models.audex_model import AudexModel

    torch.manual_seed(0)
    model = AudexModel.from_config_file("conf/model/tiny_hybrid.yaml").eval()
    pipe = AudexPipeline(model)
    cond, uncond = pipe._generation_prompts(tts_user_content, ["Hello there.", "A longer sentence to speak aloud."],
                                            model.vocab.speechgen_start, False)
    guided, got = guided_executor(model), Collector()
    try:
        ids = [guided.submit(speech_job(model, c, u), got) for c, u in zip(cond, uncond)]
        assert [got.wait(i)[-1].tokens for i in ids] == engine_cfg(model, cond, uncond)
        assert guided.stats["unguided"] == 0
    finally:
        guided.shutdown()


def test_a_split_pair_decides_unguided_and_every_job_finishes(tiny_model, prompts, start):
    """Without admission control (max_inflight=None), max_batch_size=3: pair 0 (2 rows) and pair 1's conditional row
    fill the batch; pair 1's twin waits in the engine. Pair 0 is guided exactly, pair 1 decides with lambda = 1
    (counted), the plain text job after them still runs."""
    cond, uncond = prompts
    tok = tiny_model.tokenizer
    guided, got = start(max_batch_size=3)
    a = guided.submit(speech_job(tiny_model, cond[0], uncond[0]), got)
    b = guided.submit(speech_job(tiny_model, cond[1], uncond[1]), got)
    text = guided.submit(LlmJob(cond[2][:-1], 6, tok.im_end, tok.pad_id, SamplingParams(do_sample=False)), got)
    assert got.wait(a)[-1].tokens == engine_cfg(tiny_model, cond[:1], uncond[:1])[0]
    assert got.wait(b)[-1].tokens == engine_cfg(tiny_model, cond[1:2], uncond[1:2], lam=1.0)[0]
    plain = AudexDecoder.for_model(tiny_model).generate([cond[2][:-1]], SamplingParams(do_sample=False,
                                                                                       max_new_tokens=6))
    assert got.wait(text)[-1].tokens == plain.token_ids[0]
    assert guided.stats["unguided"] > 0
    assert max(guided.executor.batch_sizes) <= 3
    assert_drained(guided)


def test_cancel_streaming_and_seeded_sampling(tiny_model, prompts, start):
    cond, uncond = prompts
    tok = tiny_model.tokenizer
    guided, got = start()
    # streaming: the chunks add up to the non-streamed answer
    streamed = guided.submit(speech_job(tiny_model, cond[1], uncond[1], streaming=True), got)
    events = got.wait(streamed)
    assert len(events) > 1 and events[-1].final
    assert [t for e in events for t in e.tokens] == engine_cfg(tiny_model, cond[1:2], uncond[1:2])[0]
    # seeded sampling through the engine's own sampler (text) and through the pair's sampler (speech)
    params = SamplingParams(do_sample=True, temperature=1.0, top_k=80, guidance_scale=1.5, seed=7)
    twice = [guided.submit(LlmJob(cond[0], MAX_NEW, tok.im_end, tok.pad_id, params, uncond_input_ids=uncond[0],
                                  output="speech"), got) for _ in range(2)]
    assert got.wait(twice[0])[-1].tokens == got.wait(twice[1])[-1].tokens
    # cancellation: a long job is cancelled after its first chunk; both twins leave the executor
    long = speech_job(tiny_model, cond[0], uncond[0], streaming=True)
    long.max_new_tokens = 400
    job = guided.submit(long, got)
    wait_until(lambda: job in got.events)                     # its first chunk has arrived
    guided.cancel(job)
    events = got.wait(job)
    assert events[-1].final and events[-1].finish_reason == "cancelled"
    assert sum(len(e.tokens) for e in events) < 400
    assert_drained(guided)


def test_bad_requests_get_errors_and_the_executor_keeps_serving(tiny_model, prompts, start):
    cond, uncond = prompts
    tok = tiny_model.tokenizer
    guided, got = start()
    bad = guided.submit(LlmJob([1, 2, 10 ** 6], 4, tok.im_end, tok.pad_id, SamplingParams()), got)
    [event] = got.wait(bad)
    assert event.error and "outside the vocabulary" in event.error and event.finish_reason == "error"
    ok = guided.submit(speech_job(tiny_model, cond[2], uncond[2]), got)
    assert got.wait(ok)[-1].tokens == engine_cfg(tiny_model, cond[2:], uncond[2:])[0]
    with pytest.raises(ValueError, match="guidance is for speech/audio"):
        LlmJob([1], 4, tok.im_end, tok.pad_id, SamplingParams(guidance_scale=2.0))
    with pytest.raises(ValueError, match="output must be one of"):
        LlmJob([1], 4, tok.im_end, tok.pad_id, SamplingParams(), output="video")


def test_audio_through_the_prompt_table_equals_the_engine(tiny_model, tone, start):
    """ASR: audio frames enter as ids >= vocab_size indexing the prompt table (the TensorRT-LLM convention)."""
    pipe = AudexPipeline(tiny_model)
    wav = tone(1.0)
    prompt = pipe._with_audio(pipe.prompt_ids(pipe.formatter.audio_content("Transcribe the speech in the input audio")),
                              [wav], "tone")
    with torch.no_grad():
        embeds = tiny_model.encode_audio([wav])
    ids, table = prompt_tuning_inputs(prompt, tiny_model.tokenizer.so_embedding, tiny_model.vocab.size, embeds)
    tok = tiny_model.tokenizer
    guided, got = start()
    job = guided.submit(LlmJob(ids, 8, tok.im_end, tok.pad_id, SamplingParams(do_sample=False), prompt_table=table), got)
    ref = AudexDecoder.for_model(tiny_model).generate([prompt], SamplingParams(do_sample=False, max_new_tokens=8),
                                                      audio_embeds=[embeds])
    assert got.wait(job)[-1].tokens == ref.token_ids[0]


@pytest.mark.gpu
def test_cfg_pairs_on_the_tensorrt_llm_executor_equal_the_engine(tiny_model, prompts, tmp_path):
    """On a GPU host: the same GuidedExecutor over TensorRT-LLM's own executor (the tiny engine, float32) decodes
    greedy CFG pairs equal to the PyTorch engine's, with every pair guided (both twins admitted in one step)."""
    pytest.importorskip("tensorrt_llm", reason="TensorRT-LLM is not installed (it installs only on CUDA hosts)")
    import subprocess

    import tensorrt_llm.bindings.executor as real

    from audex.export.trtllm_checkpoint import trtllm_build_command, write_trtllm_checkpoint

    ckpt = write_trtllm_checkpoint(tiny_model.backbone, tmp_path / "ckpt", dtype="float32")
    subprocess.run(trtllm_build_command(ckpt, tmp_path / "engine", {"max_batch_size": 8, "max_input_len": 256,
                                                                     "max_seq_len": 320,
                                                                     "max_prompt_embedding_table_size": 512}),
                   check=True)
    config = real.ExecutorConfig(1, scheduler_config=real.SchedulerConfig(
        real.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT), enable_chunked_context=False)
    guided = GuidedExecutor.create(real, str(tmp_path / "engine"), tiny_model.tokenizer, config)
    got = Collector()
    cond, uncond = prompts
    try:
        ids = [guided.submit(speech_job(tiny_model, c, u), got) for c, u in zip(cond, uncond)]
        assert [got.wait(i)[-1].tokens for i in ids] == engine_cfg(tiny_model, cond, uncond)
        assert guided.stats["unguided"] == 0 and guided.stats["guided"] > 0
    finally:
        guided.shutdown()
