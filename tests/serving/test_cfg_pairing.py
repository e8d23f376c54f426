"""CFG pairing for in-flight batching: the tracker under split, reordered, dropped and cancelled arrivals equals a
naive lock-step CFG loop and the generation engine's own CFG (audex.inference), token for token."""

import random

import pytest
import torch

from audex.inference.constraints import CodecConstraint
from audex.inference.decoding import AudexDecoder
from audex.inference.pipelines import AudexPipeline
from audex.inference.sampling import SamplingParams
from audex.prompts import tts_user_content
from audex.serving.cfg_pairing import (
    COND,
    UNCOND,
    CfgLogitsPostProcessor,
    CfgPairTracker,
    PairRow,
    pair_client_id,
    split_client_id,
)

LAMBDA, MAX_NEW = 3.0, 10


class ToyInflightEngine:
    """Each request decodes alone with its own KV cache; the test decides who is in each step."""

    def __init__(self, lm):
        self.lm, self.state = lm, {}

    def add(self, key, prompt):
        from transformers import DynamicCache

        self.state[key] = {"pending": list(prompt), "cache": DynamicCache(config=self.lm.config), "logits": None}

    @torch.no_grad()
    def logits(self, key):
        s = self.state[key]
        if s["logits"] is None:  # a held row keeps its logits: its sequence did not change
            out = self.lm(input_ids=torch.tensor([s["pending"]]), past_key_values=s["cache"], use_cache=True)
            s["logits"], s["pending"] = out.logits[0, -1].float(), []
        return s["logits"]

    def advance(self, key, token):
        self.state[key]["pending"], self.state[key]["logits"] = [token], None


@pytest.fixture(scope="module")
def setup(tiny_model):
    pipe = AudexPipeline(tiny_model)
    texts = ["Hello there.", "A longer sentence to speak aloud now.", "Short."]
    cond, uncond = pipe._generation_prompts(tts_user_content, texts, tiny_model.vocab.speechgen_start, False)
    return tiny_model, cond, uncond


def constraint_for(model, cond):
    grammar = CodecConstraint.for_task(model.tokenizer, "speech")
    return lambda pair_id: grammar.begin([cond[pair_id]])


def run_paired(model, cond, uncond, tracker, schedule, cancel_at=None):
    engine, end = ToyInflightEngine(model.backbone), model.tokenizer.im_end
    keys = [(p, r) for p in range(len(cond)) for r in (COND, UNCOND)]
    for p, r in keys:
        engine.add((p, r), cond[p] if r == COND else uncond[p])
    out, active, cancel_at = {k: [] for k in keys}, set(keys), dict(cancel_at or {})
    for step in range(200):
        for key, at in cancel_at.items():
            if at == step and key in active:
                tracker.cancel(*key)
                active.discard(key)
        present = schedule(step, sorted(active))
        rows = [PairRow(k, k[0], k[1], len(out[k]), engine.logits(k)) for k in present]
        for k, action in zip(present, tracker.step(rows)):
            if action.kind == "hold":
                continue
            out[k].append(action.token)
            engine.advance(k, action.token)
            if action.token == end or len(out[k]) >= MAX_NEW or action.kind == "retire":
                active.discard(k)
        if not active:
            return out
    raise AssertionError("the paired decode did not finish")


def naive_lockstep(model, cond, uncond, solo_from=None):
    """Both rows every step, eq. (3) written out, greedy under the speech grammar; lambda = 1 from ``solo_from``."""
    engine, end, results = ToyInflightEngine(model.backbone), model.tokenizer.im_end, []
    for p in range(len(cond)):
        engine.add(("c", p), cond[p]), engine.add(("u", p), uncond[p])
        grammar = CodecConstraint.for_task(model.tokenizer, "speech").begin([cond[p]])
        tokens = []
        while len(tokens) < MAX_NEW and (not tokens or tokens[-1] != end):
            c = engine.logits(("c", p))
            lam = 1.0 if solo_from is not None and len(tokens) >= solo_from.get(p, MAX_NEW) else LAMBDA
            mixed = c + (lam - 1.0) * (c - engine.logits(("u", p)))
            token = int(grammar.apply(mixed.reshape(1, -1)).argmax())
            grammar.advance(torch.tensor([token]))
            tokens.append(token)
            engine.advance(("c", p), token), engine.advance(("u", p), token)
        results.append(tokens)
    return results


def strip_end(tokens, end):
    return tokens[: tokens.index(end)] if end in tokens else tokens


SCHEDULES = {
    "lockstep": lambda step, active: active,
    "split_admission": lambda step, active: [k for k in active if not (k == (1, UNCOND) and step < 3)
                                             and not (k == (2, COND) and step < 2)],
    "reordered": lambda step, active: sorted(active, key=lambda k: (-k[1], -k[0])),
    "random_drops": lambda step, active, rng=random.Random(0): [k for k in rng.sample(active, len(active))
                                                                if rng.random() < 0.7],
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_pairing_equals_naive_lockstep_and_the_engine_cfg(setup, schedule):
    model, cond, uncond = setup
    end = model.tokenizer.im_end
    tracker = CfgPairTracker(SamplingParams(do_sample=False), LAMBDA, [end], can_hold=True,
                             constraint_factory=constraint_for(model, cond))
    out = run_paired(model, cond, uncond, tracker, SCHEDULES[schedule])
    naive = naive_lockstep(model, cond, uncond)
    engine = AudexDecoder.for_model(model).generate(
        cond, SamplingParams(do_sample=False, guidance_scale=LAMBDA, max_new_tokens=MAX_NEW), uncond_prompts=uncond,
        constraint=CodecConstraint.for_task(model.tokenizer, "speech"))
    for p in range(len(cond)):
        assert out[(p, COND)] == out[(p, UNCOND)]                      # token-synchronised twins
        assert out[(p, COND)] == naive[p]
        assert strip_end(out[(p, COND)], end) == engine.token_ids[p]
    assert tracker.stats["unguided"] == 0 and tracker.stats["solo"] == 0
    if schedule in ("split_admission", "random_drops"):
        assert tracker.stats["hold"] > 0          # a lone row waited for its twin instead of advancing


def test_without_hold_a_late_twin_replays_then_is_retired(setup):
    """TensorRT-LLM mode (can_hold=False): pair 1's twin is admitted 3 steps late. The conditional row cannot wait, so
    it decides alone (lambda = 1, counted), the twin replays the decided tokens, and once it has lagged for
    max_lag_steps it is retired; pairs admitted together are still guided exactly."""
    model, cond, uncond = setup
    end = model.tokenizer.im_end
    tracker = CfgPairTracker(SamplingParams(do_sample=False), LAMBDA, [end], can_hold=False, max_lag_steps=4,
                             constraint_factory=constraint_for(model, cond))
    late = lambda step, active: [k for k in active if not (k == (1, UNCOND) and step < 3)]  # noqa: E731
    out = run_paired(model, cond, uncond, tracker, late)
    naive = naive_lockstep(model, cond, uncond, solo_from={1: 0})
    assert out[(0, COND)] == naive[0] and out[(2, COND)] == naive[2]
    assert out[(1, COND)] == naive[1]
    assert out[(1, UNCOND)][:-1] == naive[1][: len(out[(1, UNCOND)]) - 1] and out[(1, UNCOND)][-1] == end
    assert tracker.stats["unguided"] > 0 and tracker.stats["replay"] > 0 and tracker.stats["retire"] == 1


def test_seeded_sampling_pair_equals_the_engine(setup):
    model, cond, uncond = setup
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=80, guidance_scale=1.5, seed=11, max_new_tokens=MAX_NEW)
    tracker = CfgPairTracker(params, 1.5, [model.tokenizer.im_end], constraint_factory=constraint_for(model, cond[:1]))
    out = run_paired(model, cond[:1], uncond[:1], tracker, SCHEDULES["split_admission"])
    engine = AudexDecoder.for_model(model).generate(cond[:1], params, uncond_prompts=uncond[:1],
                                                    constraint=CodecConstraint.for_task(model.tokenizer, "speech"))
    assert strip_end(out[(0, COND)], model.tokenizer.im_end) == engine.token_ids[0]


def test_cancelled_twins(setup):
    model, cond, uncond = setup
    end = model.tokenizer.im_end
    tracker = CfgPairTracker(SamplingParams(do_sample=False), LAMBDA, [end], constraint_factory=constraint_for(model, cond))
    # pair 0 loses its unconditional twin at step 4 (4 tokens decided): it goes on alone with lambda = 1;
    # pair 1 loses its conditional row at step 3: its twin is retired with the end token
    out = run_paired(model, cond, uncond, tracker, SCHEDULES["lockstep"], cancel_at={(0, UNCOND): 4, (1, COND): 3})
    naive = naive_lockstep(model, cond, uncond, solo_from={0: 4})
    assert out[(0, COND)] == naive[0]
    assert out[(0, UNCOND)] == naive[0][:4]
    assert out[(1, COND)] == naive[1][:3]
    assert out[(1, UNCOND)] == naive[1][:3] + [end]
    assert out[(2, COND)] == out[(2, UNCOND)] == naive[2]
    assert tracker.stats["solo"] > 0 and tracker.stats["retire"] == 1


def test_trtllm_postprocessor_forces_one_token_per_pair_and_never_holds():
    vocab, end = 32, 31
    tracker = CfgPairTracker(SamplingParams(do_sample=False), 2.0, [end], can_hold=False, max_lag_steps=2)
    proc = CfgLogitsPostProcessor(tracker)
    gen = torch.Generator().manual_seed(0)
    cond, uncond, plain = (torch.randn(1, vocab, generator=gen) for _ in range(3))
    expected = int((cond + (cond - uncond)).argmax())
    logits = [uncond.clone(), plain.clone(), cond.clone()]                 # any order; one request is not a twin
    proc([7, 9, 5], logits, [[[1, 2, 3, 4]], [[1]], [[1, 2, 3]]], None,
         [pair_client_id(0, UNCOND), None, pair_client_id(0, COND)])
    for row in (logits[0], logits[2]):
        assert int(row.argmax()) == expected and torch.isinf(row).sum() == vocab - 1
    torch.testing.assert_close(logits[1], plain)                            # untouched
    # a conditional row alone at the frontier decides unguided; its late twin replays that token
    lone = torch.randn(1, vocab, generator=gen)
    proc([5], [lone_c := lone.clone()], [[[1, 2, 3, expected]]], None, [pair_client_id(0, COND)])
    assert tracker.stats["unguided"] == 1 and int(lone_c.argmax()) == int(lone.argmax())
    late = torch.randn(1, vocab, generator=gen)
    proc([7], [late], [[[1, 2, 3, 4, expected]]], None, [pair_client_id(0, UNCOND)])
    assert int(late.argmax()) == int(lone.argmax())                          # replay keeps the twins in sync
    # an unconditional row alone at the frontier is retired with the end token
    fresh = torch.randn(1, vocab, generator=gen)
    proc([11], [fresh], [[[4, 4]]], None, [pair_client_id(1, UNCOND)])
    assert int(fresh.argmax()) == end and tracker.stats["retire"] == 1
    assert split_client_id(pair_client_id(5, UNCOND)) == (5, UNCOND)
    with pytest.raises(ValueError, match="can_hold=False"):
        CfgLogitsPostProcessor(CfgPairTracker(SamplingParams(), 2.0, [end], can_hold=True))


def test_one_step_of_many_pairs_syncs_once_and_equals_each_pair_alone(setup, monkeypatch):
    """The host-side post-processor draws every pair's token on the device and copies them to the host together: one
    transfer per engine step (not one per pair), with the tokens each pair gets when it is decided on its own."""
    import audex.serving.cfg_pairing as cfg_pairing

    model, cond, uncond = setup
    sampling = SamplingParams(do_sample=True, temperature=0.9, top_k=40, seed=5)
    vocab = model.vocab.size

    def tracker():
        return CfgPairTracker(sampling, LAMBDA, [model.tokenizer.im_end], can_hold=False,
                              constraint_factory=constraint_for(model, cond))

    gen = torch.Generator().manual_seed(0)
    steps = [[torch.randn(vocab, generator=gen) for _ in range(2 * len(cond))] for _ in range(4)]
    transfers = []
    real = cfg_pairing.to_host
    monkeypatch.setattr(cfg_pairing, "to_host", lambda tokens: transfers.append(len(tokens)) or real(tokens))
    batched = tracker()
    together = []
    for step, logits in enumerate(steps):
        # pairs 0 and 1 guided, pair 2's conditional row alone (its twin is late): three decisions, one transfer
        rows = [PairRow((p, r), p, r, step, logits[2 * p + r]) for p in range(len(cond)) for r in (COND, UNCOND)
                if not (p == 2 and r == UNCOND)]
        together.append([(a.kind, a.token) for a in batched.step(rows)])
    assert transfers == [len(cond)] * len(steps)
    for p in range(len(cond)):
        alone = tracker()
        for step, logits in enumerate(steps):
            rows = [PairRow((p, r), p, r, step, logits[2 * p + r]) for r in ((COND, UNCOND) if p < 2 else (COND,))]
            got = [(a.kind, a.token) for a in alone.step(rows)]
            assert got == [t for t, row in zip(together[step], [(q, r) for q in range(len(cond)) for r in (COND, UNCOND)
                                                                 if not (q == 2 and r == UNCOND)]) if row[0] == p]
    assert batched.stats["unguided"] == len(steps) and batched.stats["guided"] == 2 * 2 * len(steps)
