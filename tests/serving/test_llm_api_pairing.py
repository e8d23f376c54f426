"""CFG twins through per-request logits processors (the LLM API's only hook): StepPairing rebuilds the engine's steps
from one call per request and equals CfgPairTracker fed whole steps, whatever the order of the calls, a twin starting
late, a static logits buffer (CUDA graphs) or a cancelled twin; and the reference LLM API is as strict as the real."""

import pytest
import torch

import audex.serving.reference_llm_api as ref
from audex.inference.sampling import SamplingParams
from audex.serving.cfg_pairing import COND, UNCOND, CfgPairTracker, PairRow
from audex.serving.llm_api_pairing import SESSIONS, StepPairing, TwinLogitsProcessor

VOCAB, END, PROMPT = 32, 31, [1, 2, 3]


def logits_of(pair, role, position):
    """Deterministic logits per (pair, role, position), the same for the engine simulation and the reference."""
    g = torch.Generator().manual_seed(1000 * pair + 100 * role + position)
    out = torch.randn(VOCAB, generator=g)
    out[END] = -1e4 if position < 6 else 1e4             # every pair ends at position 6
    return out


def tracker(sampling):
    t = CfgPairTracker(sampling, 3.0, [END], can_hold=False, max_lag_steps=3)
    for pair in (0, 1):
        t.register(pair)
    return t


def simulate(steps, sampling, static_buffer=False, cancel_at=None):
    """Run ``steps`` (each a list of (pair, role), in call order) through StepPairing as the engine would: one logits
    tensor per step, processors called one request at a time, then greedy sampling of the forced rows. Returns the
    tokens each request sampled, and the tracker fed the same rows a whole step at a time."""
    pairing, expected = StepPairing(tracker(sampling)), tracker(sampling)
    req_ids = {(p, r): 10 * p + r + 1 for p in (0, 1) for r in (COND, UNCOND)}
    generated = {key: [] for key in req_ids}
    buffer = torch.zeros(4, VOCAB)
    try:
        for step_no, step in enumerate(steps):
            if cancel_at is not None and step_no == cancel_at[0]:
                pairing.cancel(*cancel_at[1:])
                expected.cancel(*cancel_at[1:])
            step = [key for key in step if not (generated[key] and generated[key][-1] == END)]
            if not step:
                continue
            rows = torch.stack([logits_of(p, r, len(generated[(p, r)])) for p, r in step])
            has_context = any(not generated[key] for key in step)
            if static_buffer and not has_context:                      # a captured graph writes one buffer
                buffer[: len(step)].copy_(rows)
                rows = buffer[: len(step)]
            for i, (p, r) in enumerate(step):
                TwinLogitsProcessor(pairing.session, req_ids[(p, r)], p, r, len(PROMPT))(
                    req_ids[(p, r)], rows[i:i + 1].view(1, 1, -1), [PROMPT + generated[(p, r)]], None, None)
            sampled = rows.argmax(-1).tolist()                         # the engine runs top_k=1 on the forced rows
            want = {}
            for p in (0, 1):
                group = [(i, r) for i, (q, r) in enumerate(step) if q == p]
                if group:
                    actions = expected.step([PairRow(i, p, r, len(generated[(p, r)]),
                                                     logits_of(p, r, len(generated[(p, r)]))) for i, r in group])
                    want.update({i: a.token for (i, _), a in zip(group, actions)})
            assert sampled == [want[i] for i in range(len(step))], f"step {step_no}"
            for key, token in zip(step, sampled):
                generated[key].append(token)
        return generated, pairing.stats(), dict(expected.stats)
    finally:
        pairing.close()


def lockstep(n=7):
    return [[(0, COND), (0, UNCOND), (1, COND), (1, UNCOND)] for _ in range(n)]


@pytest.mark.parametrize("static_buffer", [False, True])
@pytest.mark.parametrize("sampling", [SamplingParams(do_sample=False),
                                      SamplingParams(do_sample=True, top_k=8, temperature=0.9, seed=5)])
def test_step_pairing_equals_whole_steps_in_any_call_order(static_buffer, sampling):
    orders = [[(1, UNCOND), (0, COND), (1, COND), (0, UNCOND)], [(0, UNCOND), (1, UNCOND), (1, COND), (0, COND)]]
    steps = [orders[i % 2] for i in range(7)]
    tokens, stats, expected = simulate(steps, sampling, static_buffer)
    assert stats == expected and stats["unguided"] == 0 and stats["guided"] == 2 * 2 * 7
    assert tokens[(0, COND)] == tokens[(0, UNCOND)] and tokens[(0, COND)][-1] == END


@pytest.mark.parametrize("static_buffer", [False, True])
def test_a_twin_starting_late_replays_and_a_lone_row_decides_unguided(static_buffer):
    """Pair 1's unconditional twin enters one step late, its context row called first in its step (contexts come
    first): the trial must not pair it with its partner's row of the step before."""
    steps = [[(0, COND), (0, UNCOND), (1, COND)]] + [[(1, UNCOND), (0, COND), (0, UNCOND), (1, COND)]] * 7
    tokens, stats, expected = simulate(steps, SamplingParams(do_sample=False), static_buffer)
    assert stats == expected and stats["unguided"] >= 1 and stats["split"] == 1
    assert tokens[(1, UNCOND)][-1] == END                                # replayed, then retired after the lag


def test_a_cancelled_twin_leaves_its_partner_solo():
    tokens, stats, expected = simulate(lockstep(), SamplingParams(do_sample=False), cancel_at=(2, 0, UNCOND))
    assert stats == expected and stats["retire"] >= 1
    assert len(tokens[(0, UNCOND)]) == 3 and tokens[(0, UNCOND)][-1] == END


def test_unseeded_sampled_pairs_and_foreign_sessions_are_refused():
    pairing = StepPairing(CfgPairTracker(SamplingParams(), 3.0, [END], can_hold=False))
    try:
        with pytest.raises(ValueError, match="needs SamplingParams.seed"):
            pairing.register(0, sampling=SamplingParams(do_sample=True, top_k=4))
        with pytest.raises(RuntimeError, match="TLLM_WORKER_USE_SINGLE_PROCESS"):
            TwinLogitsProcessor("elsewhere", 1, 0, COND, 3)(1, torch.zeros(1, 1, VOCAB), [PROMPT], None, None)
    finally:
        pairing.close()
    assert pairing.session not in SESSIONS
    with pytest.raises(ValueError, match="can_hold=False"):
        StepPairing(CfgPairTracker(SamplingParams(), 3.0, [END], can_hold=True))


def test_reference_llm_api_refuses_what_the_pinned_release_refuses():
    for make, bad in ((lambda: ref.SamplingParams(max_new_tokens=4), "max_new_tokens"),
                      (lambda: ref.SamplingParams(random_seed=3), "random_seed"),
                      (lambda: ref.KvCacheConfig(enable_kv_cache_reuse=False), "enable_kv_cache_reuse"),
                      (lambda: ref.SchedulerConfig(policy="x"), "policy")):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{bad}'"):
            make()
    with pytest.raises(ValueError, match="does not model"):
        ref.SamplingParams(repetition_penalty=1.2)
    with pytest.raises(ValueError, match="enable_block_reuse=False"):
        ref.KvCacheConfig()                                          # the real default (reuse on) is not modelled
    assert ref.SamplingParams(top_k=4, seed=3).seed == 3
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_prompt_embedding_table_size'"):
        ref.LLM("unused", skip_tokenizer_init=True, max_prompt_embedding_table_size=48000)
    with pytest.raises(ValueError, match="does not model"):
        ref.LLM("unused", skip_tokenizer_init=True, cuda_graph_config={"max_batch_size": 8})
