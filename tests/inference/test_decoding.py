"""KV-cached decoding equals full recomputation, with left padding, audio, both backbone kinds, and stops."""

import pytest
import torch

from audex.inference.decoding import AudexDecoder, left_pad, positions_from_mask
from audex.inference.sampling import SamplingParams


def full_recompute_greedy(lm, prompt, steps, embed=None):
    """Reference: re-run the whole unpadded sequence every step, no cache."""
    seq, out = list(prompt), []
    for _ in range(steps):
        ids = torch.tensor([seq])
        logits = lm(inputs_embeds=embed(ids)).logits if embed else lm(input_ids=ids).logits
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        seq.append(nxt)
    return out


def tiny_nemotron_h(vocab_size):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    cfg = NemotronHConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=4,
                          layers_block_type=["mamba", "attention", "moe", "mamba"], num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16,
                          n_groups=1, intermediate_size=128, n_routed_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, chunk_size=16)
    return NemotronHForCausalLM(cfg).eval()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34, 35]]


def test_left_padding_masks_and_positions():
    ids, mask = left_pad([[4, 5, 6], [7]], pad_token_id=0)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions_from_mask(mask)[:, -1].tolist() == [2, 0]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        left_pad([[1], []], pad_token_id=0)


def test_kv_cached_equals_full_recomputation_dense(tiny_model):
    lm = tiny_model.backbone
    dec = AudexDecoder(lm, pad_token_id=tiny_model.tokenizer.pad_id, stop_token_ids=[-1])
    out = dec.generate(PROMPTS, SamplingParams(max_new_tokens=16))
    assert out.finish_reasons == ["length"] * 3
    for prompt, got in zip(PROMPTS, out.token_ids):
        assert got == full_recompute_greedy(lm, prompt, 16)


def test_kv_cached_equals_full_recomputation_hybrid_mamba():
    lm = tiny_nemotron_h(vocab_size=1536)
    dec = AudexDecoder(lm, pad_token_id=0, stop_token_ids=[-1])
    cache = dec.new_cache()
    assert {type(layer).__name__ for layer in cache.layers} >= {"LinearAttentionLayer", "DynamicLayer"}
    out = dec.generate(PROMPTS, SamplingParams(max_new_tokens=10))
    for prompt, got in zip(PROMPTS, out.token_ids):
        assert got == full_recompute_greedy(lm, prompt, 10)


def test_prompts_with_audio_decode_as_full_recomputation(tiny_model):
    tok = tiny_model.tokenizer
    lm = tiny_model.backbone
    torch.manual_seed(1)
    n1, n2 = 7, 4
    p1 = [tok.im_start, 40, tok.so_start] + [tok.so_embedding] * n1 + [tok.so_end, 41, 42]
    p2 = [tok.im_start, tok.so_start] + [tok.so_embedding] * n2 + [tok.so_end, 43]
    a1, a2 = torch.randn(n1, 128), torch.randn(n2, 128)
    dec = AudexDecoder.for_model(tiny_model)
    dec.stop_token_ids = torch.tensor([-1])
    out = dec.generate([p1, p2], SamplingParams(max_new_tokens=8), audio_embeds=[[a1], [a2]])
    for prompt, audio, got in ((p1, a1, out.token_ids[0]), (p2, a2, out.token_ids[1])):
        ref = full_recompute_greedy(lm, prompt, 8, embed=lambda ids, a=audio: tiny_model.embed_inputs(ids, [a]))
        assert got == ref
    # the audio matters: other embeddings give another continuation
    other = dec.generate([p1], SamplingParams(max_new_tokens=8), audio_embeds=[[a1 * -3.0]])
    assert other.token_ids[0] != out.token_ids[0]


def test_each_row_stops_at_its_own_stop_token(tiny_model):
    lm = tiny_model.backbone
    free = AudexDecoder(lm, pad_token_id=0, stop_token_ids=[-1]).generate(PROMPTS, SamplingParams(max_new_tokens=12))
    stop = free.token_ids[0][4]  # row 0 produces this token at step 5
    out = AudexDecoder(lm, pad_token_id=0, stop_token_ids=[stop]).generate(PROMPTS, SamplingParams(max_new_tokens=12))
    assert out.finish_reasons[0] == "stop"
    assert out.token_ids[0] == free.token_ids[0][: free.token_ids[0].index(stop)]
    for row in (1, 2):
        ref = free.token_ids[row]
        if stop in ref:
            assert out.finish_reasons[row] == "stop" and out.token_ids[row] == ref[: ref.index(stop)]
        else:
            assert out.finish_reasons[row] == "length" and out.token_ids[row] == ref


def test_seeded_sampling_is_reproducible(tiny_model):
    dec = AudexDecoder(tiny_model.backbone, pad_token_id=0, stop_token_ids=[-1])
    params = SamplingParams(do_sample=True, temperature=1.5, top_k=200, top_p=0.95, max_new_tokens=12, seed=7)
    a = dec.generate(PROMPTS, params).token_ids
    b = dec.generate(PROMPTS, params).token_ids
    c = dec.generate(PROMPTS, params.replace(seed=8)).token_ids
    assert a == b
    assert a != c


def test_sampling_params_reject_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(KeyError, match="unknown sampling parameter"):
        SamplingParams().replace(topk=3)
