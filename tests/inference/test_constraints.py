"""Constrained decoding never emits a token the Figure 2 grammar forbids, whatever the logits."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audex.inference.cfg import CfgPairBatch
from audex.inference.constraints import AUDIO, SPEECH, TEXT, CodecConstraint
from audex.inference.decoding import select_next_tokens
from audex.inference.sampling import SamplingParams, TokenSampler


def spec_allows(tok, output, turn, token, audio_tokens, max_speech):
    """Independent reading of the grammar: is ``token`` allowed after the assistant-turn tokens ``turn``?"""
    v = tok.vocab
    opens = [i for i, t in enumerate(turn) if t in (v.speechgen_start, v.audiogen_start)]
    if turn and turn[-1] in (v.speechgen_end, v.audiogen_end):
        return token == tok.im_end
    if opens and not any(t in (v.speechgen_end, v.audiogen_end) for t in turn[opens[-1]:]):
        k = len(turn) - opens[-1] - 1  # codes generated so far in the open span
        if turn[opens[-1]] == v.audiogen_start:
            if k >= audio_tokens:
                return token == v.audiogen_end
            layer = v.audio_layer_range(k % v.audio_rvq_used)
            return layer.start <= token < layer.stop
        if max_speech is not None and k >= max_speech:
            return token == v.speechgen_end
        return v.speech_offset <= token < v.audio_offset or token == v.speechgen_end
    input_only = {tok.sound, tok.so_start, tok.so_embedding, tok.so_end, tok.pad_id}
    if token < v.text_vocab_size:
        return token not in input_only
    return (output == "speech" and token == v.speechgen_start) or (output == "audio" and token == v.audiogen_start)


def prompt_tail(tok, kind, k, g):
    """A prompt whose last assistant turn is in text, or k codes into a speech/audio span."""
    v = tok.vocab
    head = [tok.im_start, 5, 6, tok.im_end, tok.im_start, 7]
    if kind == "text":
        return head
    if kind == "speech":
        return head + [v.speechgen_start] + [v.speech_offset + int(c) for c in torch.randint(0, 256, (k,), generator=g)]
    codes = [v.audio_layer_range(i % 4).start + int(torch.randint(0, 64, (1,), generator=g)) for i in range(k)]
    return head + [v.audiogen_start] + codes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**31 - 1),
    output=st.sampled_from(["text", "speech", "audio"]),
    kinds=st.lists(st.sampled_from(["text", "speech", "audio"]), min_size=1, max_size=3),
    start_codes=st.integers(0, 9),
    guidance_scale=st.sampled_from([1.0, 1.5, 3.0, 5.0]),
    do_sample=st.booleans(),
    temperature=st.floats(0.05, 2.0),
    top_k=st.sampled_from([None, 1, 80, 5000]),
    top_p=st.sampled_from([None, 0.5, 0.9, 1.0]),
    logit_scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    forbidden_boost=st.sampled_from([0.0, 50.0, 1e4]),
)
def test_constrained_decoding_never_emits_a_forbidden_token(tiny_model, seed, output, kinds, start_codes, guidance_scale,
                                                            do_sample, temperature, top_k, top_p, logit_scale,
                                                            forbidden_boost):
    tok = tiny_model.tokenizer
    v = tok.vocab
    audio_tokens, max_speech = 12, 6  # short spans so that the ends are reached within the steps
    constraint = CodecConstraint(vocab=v, im_end=tok.im_end, allow_speech=output == "speech",
                                 allow_audio=output == "audio", audio_tokens=audio_tokens, max_speech_tokens=max_speech,
                                 input_only_ids=(tok.sound, tok.so_start, tok.so_embedding, tok.so_end, tok.pad_id))
    g = torch.Generator().manual_seed(seed)
    prompts = [prompt_tail(tok, kind, min(start_codes, max_speech if kind == "speech" else audio_tokens), g)
               for kind in kinds]
    rows = constraint.begin(prompts)
    params = SamplingParams(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                            guidance_scale=guidance_scale, seed=seed)
    sampler = TokenSampler(params)
    pairs = CfgPairBatch([[0]] * len(prompts), [[0]] * len(prompts), guidance_scale)
    # logits that push hard towards what the grammar forbids: codec ids in text turns, text inside spans
    boost = torch.zeros(v.size)
    boost[v.text_vocab_size:] = forbidden_boost
    boost[: v.text_vocab_size] += forbidden_boost / 2
    turns = [list(p[p.index(tok.im_start, 4) + 1:]) for p in prompts]
    for _ in range(20):
        row_logits = torch.randn(2 * len(prompts), v.size, generator=g) * logit_scale + boost
        final = rows.apply(pairs.guide(row_logits))
        assert not torch.isnan(final).any()
        tokens = select_next_tokens(row_logits, sampler, pairs, rows)
        for i, t in enumerate(tokens.tolist()):
            assert spec_allows(tok, output, turns[i], t, audio_tokens, max_speech), (
                f"row {i} emitted {t} ({v.id_to_token(t) or tok.decode([t])}) after {turns[i][-3:]}")
            turns[i].append(t)
        rows.advance(tokens)
        if any(t == tok.im_end for t in tokens.tolist()):  # a finished turn: start a fresh assistant turn
            turns = [turn if turn[-1] != tok.im_end else [] for turn in turns]


def test_prompt_ending_inside_an_audio_span_resumes_at_the_right_layer(tiny_model):
    tok = tiny_model.tokenizer
    v = tok.vocab
    constraint = CodecConstraint.for_task(tok, output="audio")
    assert constraint.audio_tokens == 2000  # 10 s x 50 Hz x 4 layers
    g = torch.Generator().manual_seed(0)
    rows = constraint.begin([prompt_tail(tok, "audio", 5, g), prompt_tail(tok, "text", 0, g)])
    assert rows.states.tolist() == [AUDIO, TEXT] and rows.counts.tolist() == [5, 0]
    allowed = rows.allowed()
    layer1 = v.audio_layer_range(1)
    assert allowed[0].nonzero().reshape(-1).tolist() == list(layer1)  # frame 1, layer 1
    # a text turn of a TTA task: text (less the 5 input-only tokens) or <audiogen_start>, never a codec token
    assert allowed[1, v.text_vocab_size:].nonzero().reshape(-1).tolist() == [v.audiogen_start - v.text_vocab_size]
    assert int(allowed[1, :v.text_vocab_size].sum()) == v.text_vocab_size - 5


def test_speech_span_accepts_only_codes_or_its_end(tiny_model):
    tok = tiny_model.tokenizer
    v = tok.vocab
    constraint = CodecConstraint.for_task(tok, output="speech", max_speech_seconds=120)
    assert constraint.max_speech_tokens == 6000  # 120 s x 50 tokens/s
    rows = constraint.begin([[tok.im_start, 9, v.speechgen_start]])
    assert rows.states.tolist() == [SPEECH]
    allowed = rows.allowed()[0].nonzero().reshape(-1).tolist()
    assert allowed == list(range(v.speech_offset, v.audio_offset)) + [v.speechgen_end]
    rows.advance(torch.tensor([v.speechgen_end]))
    assert rows.allowed()[0].nonzero().reshape(-1).tolist() == [tok.im_end]


def test_bad_constraint_settings_are_rejected(tiny_model):
    tok = tiny_model.tokenizer
    with pytest.raises(ValueError, match="multiple of the 4 RVQ layers"):
        CodecConstraint(vocab=tok.vocab, im_end=tok.im_end, audio_tokens=2001)
    with pytest.raises(ValueError, match="unknown task output"):
        CodecConstraint.for_task(tok, output="video")
