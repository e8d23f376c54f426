"""Paired-row CFG (eq. (3)) equals a naive two-pass reference; lambda = 1 equals plain decoding."""

import copy

import pytest
import torch

from audex.inference.cfg import CfgPairBatch, cfg_mix
from audex.inference.decoding import AudexDecoder
from audex.inference.sampling import SamplingParams, TokenSampler
from audex.prompts import AudexPromptFormatter, tts_user_content


@pytest.fixture(scope="module")
def lm64(tiny_model):
    """The tiny backbone in float64, so that batched and unbatched forwards agree to ~1e-15."""
    return copy.deepcopy(tiny_model.backbone).double().eval()


@pytest.fixture(scope="module")
def tts_pairs(tiny_model):
    tok = tiny_model.tokenizer
    fmt = AudexPromptFormatter(tok)
    texts = ["Hello, how are you today?", "Birds sing."]

    def prompt(content):
        return fmt.encode_dialog([{"role": "user", "content": content}])["input_ids"].tolist()

    cond = [prompt(tts_user_content(t)) for t in texts]
    uncond = [prompt(tts_user_content(num_pads=len(tok.encode(t)))) for t in texts]
    return cond, uncond


def test_cfg_mix_is_eq3_and_matches_transformers_musicgen_processor():
    from transformers.generation.logits_process import ClassifierFreeGuidanceLogitsProcessor

    cond, uncond = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[1.0, 0.0, 1.0]])
    assert cfg_mix(cond, uncond, 3.0).tolist() == [[4.0, 0.0, -5.0]]
    assert torch.equal(cfg_mix(cond, uncond, 1.0), cond)
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g)
    ref = ClassifierFreeGuidanceLogitsProcessor(1.5)(torch.zeros(4, 1, dtype=torch.long), torch.cat([c, u]))
    torch.testing.assert_close(cfg_mix(c, u, 1.5), ref)
    with pytest.raises(ValueError, match="one unconditional twin"):
        cfg_mix(c, u[:3], 1.5)


def test_unconditional_twin_replaces_only_the_transcript_by_pads(tiny_model, tts_pairs):
    tok = tiny_model.tokenizer
    cond, uncond = tts_pairs
    for c, u, text in zip(cond, uncond, ["Hello, how are you today?", "Birds sing."]):
        n = len(tok.encode(text))
        assert u.count(tok.pad_id) == n and tok.pad_id not in c
        assert tok.decode(u).replace("<pad>" * n, text) == tok.decode(c)


def naive_cfg_reference(lm, cond, uncond, lam, params, steps):
    """Each step: run every cond and every uncond prompt alone, from scratch; mix; sample; append to both."""
    sampler = TokenSampler(params)
    cond, uncond = [list(p) for p in cond], [list(p) for p in uncond]
    out = [[] for _ in cond]
    for _ in range(steps):
        c = torch.stack([lm(input_ids=torch.tensor([p])).logits[0, -1] for p in cond])
        u = torch.stack([lm(input_ids=torch.tensor([p])).logits[0, -1] for p in uncond])
        guided = c.float() + (lam - 1.0) * (c.float() - u.float())
        tokens = sampler(guided).tolist()
        for i, t in enumerate(tokens):
            out[i].append(t)
            cond[i].append(t)
            uncond[i].append(t)
    return out


@pytest.mark.parametrize("params", [
    SamplingParams(guidance_scale=3.0, max_new_tokens=10),
    SamplingParams(do_sample=True, temperature=1.0, top_k=80, guidance_scale=3.0, max_new_tokens=10, seed=3),
], ids=["greedy", "top-k-sampled"])
def test_paired_rows_equal_naive_two_pass_reference(lm64, tiny_model, tts_pairs, params):
    cond, uncond = tts_pairs
    dec = AudexDecoder(lm64, pad_token_id=tiny_model.tokenizer.pad_id, stop_token_ids=[-1])
    got = dec.generate(cond, params, uncond_prompts=uncond).token_ids
    assert got == naive_cfg_reference(lm64, cond, uncond, params.guidance_scale, params, 10)
    # and the guidance changes the result: without the uncond rows the tokens differ
    plain = dec.generate(cond, params.replace(guidance_scale=1.0)).token_ids
    assert plain != got


def test_lambda_one_reproduces_plain_decoding_exactly(tiny_model, tts_pairs):
    cond, uncond = tts_pairs
    dec = AudexDecoder(tiny_model.backbone, pad_token_id=tiny_model.tokenizer.pad_id, stop_token_ids=[-1])
    for params in (SamplingParams(max_new_tokens=12),
                   SamplingParams(do_sample=True, temperature=1.0, top_k=80, max_new_tokens=12, seed=11)):
        paired = dec.generate(cond, params, uncond_prompts=uncond)
        plain = dec.generate(cond, params)
        assert paired.token_ids == plain.token_ids


def test_cfg_requires_twins():
    with pytest.raises(ValueError, match="one unconditional prompt per conditional prompt"):
        CfgPairBatch([[1, 2]], [], guidance_scale=2.0)


def test_guidance_without_unconditional_prompts_is_an_error(tiny_model):
    dec = AudexDecoder(tiny_model.backbone, pad_token_id=0, stop_token_ids=[-1])
    with pytest.raises(ValueError, match="needs unconditional prompts"):
        dec.generate([[1, 2, 3]], SamplingParams(guidance_scale=3.0, max_new_tokens=2))
