"""Issue 12, bugs 1-4, on the strict reference executor (audex.serving.reference_executor as strict as the pinned
TensorRT-LLM bindings): calls the pinned release refuses, a prompt table over the per-request cap, KV blocks reused
across clips, and CFG twins split by the shared-first-block skip or by the token budget."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import yaml
from test_guided_executor import Collector, engine_cfg, speech_job

import audex.serving.reference_executor as trtllm
from audex import config_path
from audex.export.frontend_onnx import prompt_tuning_inputs
from audex.export.trtllm_checkpoint import check_prompt_table, trtllm_config
from audex.inference.decoding import AudexDecoder
from audex.inference.pipelines import AudexPipeline
from audex.inference.sampling import SamplingParams
from audex.prompts import tts_user_content
from audex.serving.cfg_pairing import COND, UNCOND, CfgPairTracker, PairRow
from audex.serving.guided_executor import GuidedExecutor, LlmJob
from audex.serving.triton.pairing_metrics import PairingMetrics

EXPORT_YAML = config_path("export.yaml")


@pytest.fixture(scope="module")
def prompts(tiny_model):
    pipe = AudexPipeline(tiny_model)
    texts = ["Hello there.", "A longer sentence to speak aloud now.", "Short."]
    return pipe._generation_prompts(tts_user_content, texts, tiny_model.vocab.speechgen_start, False)


@pytest.fixture
def start(tiny_model):
    """``start(engine_kw, **config_kw) -> (GuidedExecutor, Collector)``; every executor is shut down afterwards."""
    started = []

    def make(engine=None, max_inflight=8, **config):
        engine = engine or trtllm.ReferenceEngine(tiny_model.backbone, max_batch_size=8, max_input_len=4096,
                                                  max_num_tokens=8192, max_prompt_embedding_table_size=8 * 800)
        started.append(GuidedExecutor.create(trtllm, engine, tiny_model.tokenizer, trtllm.ExecutorConfig(**config),
                                             max_inflight=max_inflight))
        return started[-1], Collector()
    yield make
    for guided in started:
        guided.shutdown()


def asr_inputs(model, wav):
    """Prompt ids with fake prompt-table ids for ``wav``, its table, and the PyTorch engine's greedy answer."""
    pipe = AudexPipeline(model)
    prompt = pipe._with_audio(pipe.prompt_ids(pipe.formatter.audio_content("Transcribe the speech in the input audio")),
                              [wav], "clip")
    with torch.no_grad():
        embeds = model.encode_audio([wav])
    ids, table = prompt_tuning_inputs(prompt, model.tokenizer.so_embedding, model.vocab.size, embeds)
    ref = AudexDecoder.for_model(model).generate([prompt], SamplingParams(do_sample=False, max_new_tokens=8),
                                                 audio_embeds=[embeds])
    return ids, table, ref.token_ids[0]


def text_job(model, ids, table=None, **sampling):
    tok = model.tokenizer
    return LlmJob(ids, 8, tok.im_end, tok.pad_id, SamplingParams(**(sampling or {"do_sample": False})),
                  prompt_table=table)


# ---- bug 1: calls of other releases -------------------------------------------------------------
def test_reference_refuses_what_the_pinned_bindings_refuse():
    for make, bad in ((lambda: trtllm.SamplingConfig(1, top_k=4, random_seed=3), "random_seed"),
                      (lambda: trtllm.Request([1, 2], 4, max_new_tokens=4), "max_new_tokens"),
                      (lambda: trtllm.ExecutorConfig(1, max_input_len=8), "max_input_len"),
                      (lambda: trtllm.KvCacheConfig(enable_kv_cache_reuse=False), "enable_kv_cache_reuse")):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{bad}'"):
            make()
    assert trtllm.KvCacheConfig().enable_block_reuse is True           # the bindings' default
    assert trtllm.SamplingConfig(1, top_k=4, seed=3).seed == 3
    with pytest.raises(ValueError, match="does not model"):
        trtllm.SamplingConfig(1, repetition_penalty=1.2)


def test_bug1_seeded_sampling_runs_on_the_pinned_bindings(tiny_model, prompts, start):
    """A sampled text job with a seed: SamplingConfig takes ``seed=`` in the pinned bindings."""
    guided, got = start()
    job = text_job(tiny_model, prompts[0][0], do_sample=True, temperature=1.0, top_k=50, seed=7)
    first, second = (guided.submit(job, got) for _ in range(2))
    a, b = got.wait(first)[-1], got.wait(second)[-1]
    assert a.error is None and a.tokens and a.tokens == b.tokens


def pinned_mapping(world_size=1, rank=0, gpus_per_node=8, *, cp_size=1, cp_config=None, tp_size=1, pp_size=1,
                   moe_cluster_size=-1, moe_tp_size=-1, moe_ep_size=-1, attn_tp_size=-1, attn_cp_size=-1,
                   enable_attention_dp=False, enable_lm_head_tp_in_adp=False):
    """The signature of ``tensorrt_llm.mapping.MappingBase.__init__`` at the pinned release (``from_dict`` is
    ``cls(**mapping)``): what ``trtllm-build`` does with the checkpoint's ``mapping``."""
    if tp_size * pp_size * cp_size != world_size:
        raise ValueError(f"world_size must equal to tp_size * pp_size * cp_size, but got {world_size}")
    return {"tp_size": tp_size, "pp_size": pp_size}


def test_bug1_checkpoint_mapping_is_accepted_by_the_pinned_mapping(tiny_model):
    config = trtllm_config(tiny_model.backbone.config, dtype="float32", tp_size=2, pp_size=1)
    assert pinned_mapping(**config["mapping"]) == {"tp_size": 2, "pp_size": 1}


# ---- bug 2: the per-request prompt-table cap ------------------------------------------------------
def test_bug2_a_30s_clip_fits_the_configured_prompt_table(tiny_model, tone, start):
    """The conf/export.yaml build sizes serve a 30 s clip (750 rows) to each of max_batch_size requests."""
    build = yaml.safe_load(EXPORT_YAML.read_text())["trtllm"]["build"]
    ids, table, want = asr_inputs(tiny_model, tone(30.0))
    assert table.shape[0] == 750                                      # 3 windows x 250 frames of the tiny encoder
    engine = trtllm.ReferenceEngine.from_build(tiny_model.backbone, build)
    guided, got = start(engine, kv_cache_config=trtllm.KvCacheConfig(enable_block_reuse=False))
    event = got.wait(guided.submit(text_job(tiny_model, ids, table), got))[-1]
    assert event.error is None, event.error
    assert event.tokens == want


def test_bug2_start_up_check_names_the_prompt_table_that_cannot_hold_a_clip():
    build = {"max_batch_size": 64, "max_prompt_embedding_table_size": 24000}
    with pytest.raises(ValueError, match=r"max_prompt_embedding_table_size.*375 rows.*750"):
        check_prompt_table(build, max_audio_seconds=30.0, frames_per_window=750, window_seconds=30.0)
    assert check_prompt_table({"max_batch_size": 64, "max_prompt_embedding_table_size": 48000}, 30.0, 750, 30.0) == 750


# ---- bug 3: KV blocks reused across clips ---------------------------------------------------------
def test_reference_reuses_blocks_by_ids_not_embeddings(tiny_model, tone):
    """What makes bug 3: under block reuse, a clip with the fake ids and extra ids of an earlier clip decodes
    against the earlier clip's cache; different extra ids (or no reuse) give each clip its own answer."""
    ids_a, table_a, want_a = asr_inputs(tiny_model, tone(1.0, 440.0))
    ids_b, table_b, want_b = asr_inputs(tiny_model, tone(1.0, 1900.0, amp=0.9))
    assert ids_a == ids_b and want_a != want_b
    engine = trtllm.ReferenceEngine(tiny_model.backbone, max_batch_size=4, max_prompt_embedding_table_size=4 * 250,
                                    tokens_per_block=16)
    executor = trtllm.Executor(engine, trtllm.ModelType.DECODER_ONLY, trtllm.ExecutorConfig())
    tok = tiny_model.tokenizer

    def run(table, extra):
        request = trtllm.Request(ids_a, 8, end_id=tok.im_end, pad_id=tok.pad_id,
                                 output_config=trtllm.OutputConfig(exclude_input_from_output=True),
                                 prompt_tuning_config=trtllm.PromptTuningConfig(table, extra))
        [response] = executor.await_responses(executor.enqueue_request(request))
        return response.error_msg if response.has_error() else response.result.output_token_ids[0]

    try:
        assert "Input token extra ids must be provided" in run(table_a, None)
        assert run(table_a, [0] * len(ids_a)) == want_a
        assert run(table_b, [0] * len(ids_a)) == want_a                # B got A's cached keys/values
        assert executor.blocks.reused_blocks > 0
        assert run(table_b, [1 if t >= tiny_model.vocab.size else 0 for t in ids_a]) == want_b
    finally:
        executor.shutdown()


def test_bug3_two_different_clips_in_a_row_get_their_own_answers(tiny_model, tone, start):
    """Block reuse on (the bindings' default): two ASR clips with the same fake ids, one after the other."""
    guided, got = start(trtllm.ReferenceEngine(tiny_model.backbone, max_batch_size=8,
                                               max_prompt_embedding_table_size=8 * 250, tokens_per_block=16))
    for freq, amp in ((440.0, 0.3), (1900.0, 0.9), (440.0, 0.3)):
        ids, table, want = asr_inputs(tiny_model, tone(1.0, freq, amp=amp))
        event = got.wait(guided.submit(text_job(tiny_model, ids, table), got))[-1]
        assert event.error is None, event.error
        assert event.tokens == want


# ---- bug 4: CFG twins split by the scheduler ------------------------------------------------------
def test_bug4_a_pair_on_a_cold_cache_is_guided_throughout(tiny_model, prompts, start):
    """Block reuse on, cold cache: the twins share their first blocks (the system prompt), which must not make the
    scheduler skip the unconditional twin's context for a step."""
    cond, uncond = prompts
    guided, got = start()
    job = guided.submit(speech_job(tiny_model, cond[0], uncond[0]), got)
    assert got.wait(job)[-1].tokens == engine_cfg(tiny_model, cond[:1], uncond[:1])[0]
    assert guided.stats["unguided"] == 0 and guided.stats["retire"] == 0 and guided.stats["guided"] > 0
    assert guided.executor.skipped_for_shared_block == 0


def test_bug4_pair_admission_counts_the_token_budget(tiny_model, prompts, start):
    """max_num_tokens fits a text prompt and one twin but not both twins: the pair waits until both fit."""
    cond, uncond = prompts
    text_ids = cond[2][:-1]
    budget = len(text_ids) + len(cond[0]) + len(uncond[0]) - 1
    guided, got = start(kv_cache_config=trtllm.KvCacheConfig(enable_block_reuse=False), max_num_tokens=budget)
    with guided.executor._lock:                    # both reach the scheduler before its next step
        text = guided.submit(text_job(tiny_model, text_ids), got)
        pair = guided.submit(speech_job(tiny_model, cond[0], uncond[0]), got)
    assert got.wait(pair)[-1].tokens == engine_cfg(tiny_model, cond[:1], uncond[:1])[0]
    assert got.wait(text)[-1].error is None
    assert guided.stats["unguided"] == 0 and guided.stats["retire"] == 0


# ---- the split / unguided counts as Triton metrics ------------------------------------------------
class FakeMetricFamily:
    """``pb_utils.MetricFamily`` as the python backend has it: ``Metric(labels)`` with ``increment(value)``."""

    COUNTER, GAUGE = "counter", "gauge"
    families: dict = {}

    def __init__(self, name, description, kind):
        assert kind == self.COUNTER and description
        self.name, self.values = name, {}
        FakeMetricFamily.families[name] = self

    def Metric(self, labels):  # noqa: N802 - the python backend's name
        family, key = self, tuple(sorted(labels.items()))
        family.values[key] = 0

        class _Metric:
            def increment(self, value):
                assert value > 0
                family.values[key] += value
        return _Metric()


def test_split_and_unguided_counts_are_exported_as_triton_metrics():
    tracker = CfgPairTracker(SamplingParams(do_sample=False), 2.0, [7], can_hold=False, max_lag_steps=8)
    metrics = PairingMetrics(SimpleNamespace(MetricFamily=FakeMetricFamily), "tensorrt_llm")
    logits = torch.arange(10, dtype=torch.float32)
    tracker.step([PairRow("a", 0, COND, 0, logits), PairRow("b", 0, UNCOND, 0, logits)])     # guided
    tracker.step([PairRow("c", 1, COND, 0, logits)])                                        # twin not there
    tracker.step([PairRow("c", 1, COND, 1, logits), PairRow("d", 1, UNCOND, 0, logits)])    # one behind
    metrics.update(tracker.stats)
    metrics.update(tracker.stats)                                                           # no double count
    tokens = FakeMetricFamily.families["audex_cfg_tokens_total"].values
    pairs = FakeMetricFamily.families["audex_cfg_split_pairs_total"].values
    label = (("action", "unguided"), ("model", "tensorrt_llm"))
    assert tokens[label] == tracker.stats["unguided"] == 2
    assert tokens[(("action", "guided"), ("model", "tensorrt_llm"))] == 2
    assert pairs[(("model", "tensorrt_llm"),)] == tracker.stats["split"] == 1


def test_pair_admission_counts_kv_blocks_to_completion(tiny_model, prompts, start):
    """A bounded KV cache (KvCacheConfig.max_tokens) holds a running text job and one twin but not both twins: the
    guaranteed-no-evict scheduler would start the twins apart; the router waits until both twins' blocks are free."""
    cond, uncond = prompts
    text_ids, per_block = cond[2][:-1], 16
    engine = trtllm.ReferenceEngine(tiny_model.backbone, max_batch_size=8, tokens_per_block=per_block)
    need = [-(-(len(ids) + n) // per_block) for ids, n in ((text_ids, 8), (cond[0], 10), (uncond[0], 10))]
    kv = trtllm.KvCacheConfig(enable_block_reuse=False, max_tokens=(sum(need) - 1) * per_block)
    for router_sees_the_cache in (False, True):
        guided, got = start(engine, kv_cache_config=kv)
        assert guided.engine.kv_blocks == sum(need) - 1
        if not router_sees_the_cache:
            guided.engine = dataclasses.replace(guided.engine, kv_blocks=None)
        with guided.executor._lock:
            text = guided.submit(text_job(tiny_model, text_ids), got)
            pair = guided.submit(speech_job(tiny_model, cond[0], uncond[0]), got)
        assert got.wait(text)[-1].error is None and got.wait(pair)[-1].error is None
        split = guided.stats["unguided"] + guided.stats["retire"]
        assert (split == 0) == router_sees_the_cache, guided.stats
    assert got.wait(pair)[-1].tokens == engine_cfg(tiny_model, cond[:1], uncond[:1])[0]
