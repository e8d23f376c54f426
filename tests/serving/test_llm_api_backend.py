"""The LLM API (PyTorch backend) path of issue 12 on the CPU reference of the LLM API: audio as multimodal embeddings
equals PyTorch eager, two different clips in a row get their own answers, seeded sampling repeats, a CFG pair equals
eq. (3) over two separate passes, on the dense and the Nemotron-H backbone; sizes are checked at start-up."""

import math
import time

import pytest
import torch
from omegaconf import OmegaConf
from test_guided_executor import Collector, engine_cfg, speech_job
from test_strict_executor import asr_inputs

from audex import config_path
from audex.export.hf_folder import export_hf_folder
from audex.inference.cfg import cfg_mix
from audex.inference.constraints import CodecConstraint
from audex.inference.decoding import AudexDecoder
from audex.inference.pipelines import AudexPipeline
from audex.inference.sampling import SamplingParams
from audex.prompts import tts_user_content
from audex.serving.guided_executor import LlmJob
from audex.serving.llm_api_backend import LlmApiBackend, check_llm_api_limits, llm_api_module
from audex.serving.requests import ServeLimits

LIMITS = ServeLimits(max_audio_seconds=10.0, max_new_tokens=16, max_speech_seconds=0.5, tta_seconds=0.2)
SIZES = dict(max_batch_size=8, max_input_len=1024, max_seq_len=1400, max_num_tokens=4096)


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    """``make(model, **sizes) -> LlmApiBackend`` on the reference LLM API; all shut down afterwards."""
    made = []

    def make(model, **sizes):
        folder = tmp_path_factory.mktemp("export")
        export_hf_folder(model, folder / "hf")
        enc = model.audio_encoder
        made.append(LlmApiBackend.create(llm_api_module("torch"), folder, model.tokenizer, {**SIZES, **sizes}, LIMITS,
                                         enc.frames_per_window, enc.window_seconds, max_speech_seconds=None))
        return made[-1]
    yield make
    for backend in made:
        backend.shutdown()


@pytest.fixture(scope="module")
def dense(tiny_model, backends):
    return backends(tiny_model)


def run(backend, *jobs):
    got = Collector()
    ids = [backend.submit(job, got) for job in jobs]
    events = [got.wait(i) for i in ids]
    for e in events:
        assert e[-1].error is None, e[-1].error
    return [[t for ev in e for t in ev.tokens] if job.streaming else e[-1].tokens for job, e in zip(jobs, events)]


def text_job(model, ids, table=None, max_new=8, **sampling):
    tok = model.tokenizer
    return LlmJob(ids, max_new, tok.im_end, tok.pad_id, SamplingParams(**(sampling or {"do_sample": False})),
                  prompt_table=table)


def test_two_different_clips_back_to_back_equal_pytorch_eager(tiny_model, tone, dense):
    answers = []
    for freq, amp in ((440.0, 0.3), (1900.0, 0.9), (440.0, 0.3)):
        ids, table, want = asr_inputs(tiny_model, tone(1.0, freq, amp=amp))
        [got] = run(dense, text_job(tiny_model, ids, table))
        assert got == want
        answers.append(got)
    assert answers[0] != answers[1] and answers[0] == answers[2]         # each clip its own answer


def test_seeded_sampling_repeats_and_streaming_gives_the_same_tokens(tiny_model, dense):
    ids = tiny_model.tokenizer.encode("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    params = dict(do_sample=True, temperature=1.0, top_k=50, seed=11)
    first, second = run(dense, text_job(tiny_model, ids, max_new=12, **params), text_job(tiny_model, ids, max_new=12,
                                                                                        **params))
    streamed = text_job(tiny_model, ids, max_new=12, **params)
    streamed.streaming = True
    assert first and first == second == run(dense, streamed)[0]
    want = AudexDecoder.for_model(tiny_model).generate([ids], SamplingParams(max_new_tokens=12, **params)).token_ids[0]
    assert first == want                                                 # the engine's draw is Audex's seeded one


def two_pass_cfg(model, cond, uncond, lam, max_new):
    """Eq. (3) over two separate full forward passes per token (no cache, no batching), grammar, greedy."""
    grammar = CodecConstraint.for_task(model.tokenizer, "speech", max_speech_seconds=None).begin([cond])
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            c = model.backbone(input_ids=torch.tensor([cond + out])).logits[:, -1].float()
            u = model.backbone(input_ids=torch.tensor([uncond + out])).logits[:, -1].float()
            token = int(grammar.apply(cfg_mix(c, u, lam)).argmax(-1))
            grammar.advance(torch.tensor([token]))
            if token == model.tokenizer.im_end:
                break
            out.append(token)
    return out


def test_cfg_pairs_equal_two_separate_passes_and_stay_guided(tiny_model, dense):
    pipe = AudexPipeline(tiny_model)
    cond, uncond = pipe._generation_prompts(tts_user_content, ["Hello there.", "A longer sentence to speak aloud."],
                                            tiny_model.vocab.speechgen_start, False)
    before = dense.stats
    got = run(dense, *(speech_job(tiny_model, c, u) for c, u in zip(cond, uncond)))
    assert got == [two_pass_cfg(tiny_model, c, u, 3.0, 10) for c, u in zip(cond, uncond)]
    after = dense.stats
    assert after["guided"] - before["guided"] == 2 * sum(len(g) + (len(g) < 10) for g in got)
    assert after["unguided"] == before["unguided"] and after["split"] == before["split"]
    assert dense.pairing.tracker.pairs == {}                            # every pair forgotten once both twins ended


def test_sampled_cfg_pair_with_a_seed_equals_the_engine(tiny_model, dense):
    pipe = AudexPipeline(tiny_model)
    cond, uncond = pipe._generation_prompts(tts_user_content, ["Hello there."], tiny_model.vocab.speechgen_start,
                                            False)
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=40, guidance_scale=3.0, seed=4, max_new_tokens=10)
    job = LlmJob(cond[0], 10, tiny_model.tokenizer.im_end, tiny_model.tokenizer.pad_id, params,
                 uncond_input_ids=uncond[0], output="speech")
    first, second = run(dense, job, job)
    want = AudexDecoder.for_model(tiny_model).generate(
        cond, params, uncond_prompts=uncond,
        constraint=CodecConstraint.for_task(tiny_model.tokenizer, "speech", max_speech_seconds=None)).token_ids[0]
    assert first == second == want


def test_admission_keeps_pairs_whole_in_a_full_batch(tiny_model, backends):
    """max_batch_size=3: a pair waits until both twins fit; text and pairs interleave, every pair guided."""
    backend = backends(tiny_model, max_batch_size=3)
    pipe = AudexPipeline(tiny_model)
    cond, uncond = pipe._generation_prompts(tts_user_content, ["Hello there.", "A longer one.", "Short."],
                                            tiny_model.vocab.speechgen_start, False)
    jobs = [speech_job(tiny_model, cond[0], uncond[0]), speech_job(tiny_model, cond[1], uncond[1]),
            text_job(tiny_model, cond[2][:-1], max_new=6), speech_job(tiny_model, cond[2], uncond[2])]
    got = run(backend, *jobs)
    assert [got[0], got[1], got[3]] == engine_cfg(tiny_model, cond, uncond)
    assert backend.stats["unguided"] == 0 and max(len(s) for s in backend.llm.steps) <= 3


def test_nemotron_h_backbone_through_the_llm_api(tone, backends):
    """The 30B-A3B's family (hybrid Mamba2 / attention / MoE): audio and CFG pairs through the same path."""
    from audex.models.audex_model import AudexModel

    torch.manual_seed(0)
    model = AudexModel.from_config_file(str(config_path("model", "tiny_hybrid.yaml"))).eval()
    backend = backends(model)
    config = backend.llm.lm.config
    assert (config.model_type, config.architectures) == ("nemotron_h", ["AudexNemotronHForCausalLM"])
    ids, table, want = asr_inputs(model, tone(1.0, 440.0))
    assert run(backend, text_job(model, ids, table)) == [want]
    pipe = AudexPipeline(model)
    cond, uncond = pipe._generation_prompts(tts_user_content, ["Hello there.", "A longer sentence."],
                                            model.vocab.speechgen_start, False)
    assert run(backend, *(speech_job(model, c, u) for c, u in zip(cond, uncond))) == engine_cfg(model, cond, uncond)
    assert backend.stats["unguided"] == 0


def test_sizes_are_checked_at_start_up_with_the_paper_numbers(tiny_model):
    """export.yaml's sizes serve 64 concurrent 30 s clips (750 frames each); smaller ones are refused by name."""
    cfg = OmegaConf.load(config_path("export.yaml"))
    build, limits, vocab = dict(cfg.trtllm.build), ServeLimits.from_config(cfg.serve), tiny_model.vocab
    check_llm_api_limits(build, limits, 750, 30.0, vocab)
    for key, value, message in (("max_input_len", 900, r"needs 1006 -- one clip .* is 750 frames"),
                                ("max_num_tokens", 1000, "max_num_tokens=1000 is too small"),
                                ("max_seq_len", 1500, "max_seq_len=1500 is too small"),
                                ("max_batch_size", 1, "max_batch_size=1 is too small")):
        with pytest.raises(ValueError, match=message):
            check_llm_api_limits({**build, key: value}, limits, 750, 30.0, vocab)
    with pytest.raises(ValueError, match="tp_size=4"):
        check_llm_api_limits(build, limits, 750, 30.0, vocab, tp_size=4)
    assert math.ceil(31.0 / 30.0) * 750 == 1500                         # a 31 s clip takes two windows


def test_requests_the_llm_refuses_fail_alone(tiny_model, dense):
    tok = tiny_model.tokenizer
    got = Collector()
    bad = dense.submit(text_job(tiny_model, [5] * 8 + [tiny_model.vocab.size + 3]), got)   # audio id without rows
    [event] = got.wait(bad)
    assert event.final and event.error and "vocab_size + 0..-1" in event.error
    with pytest.raises(ValueError, match="exceed max_seq_len=1400"):
        dense.submit(text_job(tiny_model, [5] * 1390, max_new=20), got)
    ok = dense.submit(text_job(tiny_model, tok.encode("<|im_start|>user\nHi<|im_end|>\n")), got)
    assert got.wait(ok)[-1].error is None
    prompt = tok.encode("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n")
    unseeded = LlmJob(prompt, 4, tok.im_end, tok.pad_id, SamplingParams(do_sample=True, top_k=8, guidance_scale=2.0),
                      uncond_input_ids=prompt[:3], output="speech")
    done = dense.submit(unseeded, got)
    assert unseeded.sampling.seed is not None and got.wait(done)[-1].error is None   # a sampled pair gets a seed


def test_streaming_pairs_and_cancelled_jobs(tiny_model, dense):
    pipe = AudexPipeline(tiny_model)
    cond, uncond = pipe._generation_prompts(tts_user_content, ["Hello there."], tiny_model.vocab.speechgen_start, False)
    streamed = speech_job(tiny_model, cond[0], uncond[0])
    streamed.streaming = True
    assert run(dense, streamed) == run(dense, speech_job(tiny_model, cond[0], uncond[0]))
    got = Collector()
    long = speech_job(tiny_model, cond[0], uncond[0])
    long.max_new_tokens = 400
    job_id = dense.submit(long, got)
    state, wait_for = dense._jobs[job_id], time.monotonic() + 60
    while not (len(state.keys) == 2 and set(state.keys.values()) <= dense.pairing.started):   # both twins running
        assert time.monotonic() < wait_for
        time.sleep(0.01)
    dense.cancel(job_id)
    final = got.wait(job_id)[-1]
    assert final.final and final.finish_reason == "cancelled" and len(final.tokens) < 400
    deadline = time.monotonic() + 60
    while (dense.pending() or dense.pairing.tracker.pairs) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dense.pending() == 0 and dense.pairing.tracker.pairs == {}
