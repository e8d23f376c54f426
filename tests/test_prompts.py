"""Figure 2 and appendix A templates, character for character, and their label masks."""

import pytest
import torch
from nemo.collections.common.data.prompt_fn import apply_prompt_format_fn
from nemo.collections.common.prompts.formatter import PromptFormatter

from audex import prompts
from audex.prompts import AudexPromptFormatter, AudexSoundLastPromptFormatter, get_prompt_formatter
from audex.tokenizer import AudexTokenizer
from audex.vocab import AudexVocab

SYSTEM = ("<|im_start|>system\nYou are a helpful and harmless assistant.\n"
          "You are not allowed to use any tools<|im_end|>\n")


@pytest.fixture(scope="module")
def tok():
    # the paper's vocabulary layout (205,312 rows) above the tiny BPE text tokenizer
    return AudexTokenizer.build_tiny(AudexVocab(), bpe_size=512)


@pytest.fixture(scope="module")
def fmt(tok):
    return AudexPromptFormatter(tok)


def _user_assistant(user, answer, **assistant):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer, **assistant}]


def test_vocab_is_the_papers(tok):
    assert tok.vocab.size == 205312 and tok.vocab.unpadded_size == 204805
    assert tok.vocab.speech_offset == 131072


def test_figure2a_thinking_mode(fmt, tok):
    turns = _user_assistant("User contents.", "Model outputs.", thinking="Model thinking contents.")
    golden = (SYSTEM + "<|im_start|>user\nUser contents.<|im_end|>\n<|im_start|>assistant\n"
              "<think>\nModel thinking contents.\n</think>\nModel outputs.<|im_end|>")
    assert fmt.render_text(turns, thinking=True) == golden
    enc = fmt.encode_dialog(turns, thinking=True)
    assert tok.decode(enc["input_ids"]) == golden
    # per-turn tokenisation equals tokenising the whole string at once
    assert enc["input_ids"].tolist() == tok.encode(golden)
    # trainable: what the model generates after "<|im_start|>assistant\n<think>\n"
    assert tok.decode(enc["input_ids"][enc["mask"]]) == "Model thinking contents.\n</think>\nModel outputs.<|im_end|>"
    assert tok.decode(enc["context_ids"]).endswith("<|im_start|>assistant\n<think>\n")


def test_figure2a_instruct_mode_puts_think_end_right_after_think(fmt, tok):
    turns = _user_assistant("User contents.", "Model outputs.")
    golden = (SYSTEM + "<|im_start|>user\nUser contents.<|im_end|>\n<|im_start|>assistant\n"
              "<think></think>\nModel outputs.<|im_end|>")
    enc = fmt.encode_dialog(turns)
    assert fmt.render_text(turns) == golden == tok.decode(enc["input_ids"])
    assert enc["input_ids"].tolist() == tok.encode(golden)
    assert tok.decode(enc["answer_ids"]) == "Model outputs.<|im_end|>"
    assert tok.decode(enc["input_ids"][enc["mask"]]) == "Model outputs.<|im_end|>"


@pytest.mark.parametrize("thinking", [False, True])
def test_context_ids_are_the_generation_prompt(fmt, thinking):
    turns = _user_assistant("Hi there", "Hello!", **({"thinking": "greet back"} if thinking else {}))
    trained = fmt.encode_dialog(turns, thinking=thinking)
    prompt = fmt.encode_dialog(turns[:1], thinking=thinking)
    assert "mask" not in prompt
    assert torch.equal(trained["context_ids"], prompt["input_ids"])
    assert torch.equal(torch.cat([trained["context_ids"], trained["answer_ids"]]), trained["input_ids"])


def test_figure2b_audio_qa_sound_after_question(tok):
    fmt = get_prompt_formatter("audex-sound-last", tok)
    assert isinstance(fmt, AudexSoundLastPromptFormatter)
    q = "Where is the communication likely taking place?"
    turns = _user_assistant(fmt.audio_content(q), "Model outputs.")
    assert fmt.render_text(turns) == (
        SYSTEM + "<|im_start|>user\nWhere is the communication likely taking place?\n<sound><|im_end|>\n"
        "<|im_start|>assistant\n<think></think>\nModel outputs.<|im_end|>")


def test_figure2c_text_to_speech(fmt, tok):
    codes = torch.tensor([123, 456])
    answer = [tok.vocab.speechgen_start, *tok.vocab.speech_codes_to_ids(codes).tolist(), tok.vocab.speechgen_end]
    turns = _user_assistant(prompts.tts_user_content("Hello, how are you today?"), answer)
    golden = (SYSTEM + "<|im_start|>user\n<|text to speech|> Generate speech for this transcription. "
              "Hello, how are you today?<|im_end|>\n<|im_start|>assistant\n<think></think>\n"
              "<speechgen_start><speechcodec_123><speechcodec_456><speechgen_end><|im_end|>")
    enc = fmt.encode_dialog(turns)
    assert fmt.render_text(turns) == golden == tok.decode(enc["input_ids"])
    assert enc["answer_ids"].tolist() == [204800, 131072 + 123, 131072 + 456, 204801, tok.im_end]
    assert enc["mask"].sum() == 5


def test_figure2d_text_to_audio_frame_major(fmt, tok):
    v = tok.vocab
    codes = torch.tensor([[123, 7], [1, 8], [2, 9], [456, 10]])  # [n_q=4, T=2]
    answer = [v.audiogen_start, *v.audio_codes_to_ids(codes).tolist(), v.audiogen_end]
    turns = _user_assistant(prompts.tta_user_content("Birds chirping in a forest."), answer)
    flat = "".join(f"<audiocodec_{q * 1024 + int(codes[q, t])}>" for t in range(2) for q in range(4))
    golden = (SYSTEM + "<|im_start|>user\n<|text to audio|> Generate audio for this caption. Birds chirping in a "
              "forest.<|im_end|>\n<|im_start|>assistant\n<think></think>\n"
              f"<audiogen_start>{flat}<audiogen_end><|im_end|>")
    assert flat.startswith("<audiocodec_123><audiocodec_1025><audiocodec_2050><audiocodec_3528>")
    assert tok.decode(fmt.encode_dialog(turns)["input_ids"]) == golden


def test_appendix_a_prompts_exact(fmt):
    assert fmt.audio_content(prompts.asr_question()) == "<sound>\nTranscribe the speech in the input audio"
    assert fmt.audio_content(prompts.asr_question("de")) == \
        "<sound>\nTranscribe the speech in the input audio\nLanguage: de"
    assert fmt.audio_content(prompts.AST_PROMPT) == "<sound>\nTranslate the spoken content in the audio to English"
    assert fmt.audio_content(prompts.mcq_question("What is the dog doing?", ["barking", "sleeping", "eating",
                                                                             "running"])) == (
        "<sound>\nWhat is the dog doing? Choose the correct option from the following options:\n"
        "(A) barking\n(B) sleeping\n(C) eating\n(D) running")
    assert fmt.audio_content(prompts.entailment_question("A dog barks twice.")) == (
        "<sound>\nIs the following description true about the input audio? Answer in Yes, No or Maybe.\n"
        "Description: A dog barks twice.")
    assert fmt.audio_content(prompts.hallucination_question("a dog barking")) == \
        "<sound>\nDid you hear a dog barking in the audio?"
    assert prompts.tts_user_content("Hi") == "<|text to speech|> Generate speech for this transcription. Hi"
    assert prompts.tta_user_content("Rain.") == "<|text to audio|> Generate audio for this caption. Rain."
    assert prompts.s2s_reasoning_prompt("What is 2+2?") == (
        "What is 2+2? \n\n Conclude your response with the sentence \u2018The answer is \\boxed{X}.\u2019")
    assert prompts.s2s_answer_text("B") == "The answer is B"
    assert fmt.audio_content(prompts.CAPTION_PROMPT) == "<sound>\nDescribe the audio"


def test_cfg_unconditional_user_turns():
    assert prompts.tts_user_content(num_pads=3) == \
        "<|text to speech|> Generate speech for this transcription. <pad><pad><pad>"
    assert prompts.tta_user_content(num_pads=1) == "<|text to audio|> Generate audio for this caption. <pad>"
    with pytest.raises(ValueError, match="not both or neither"):
        prompts.tts_user_content("x", num_pads=2)


def test_speech_targets_and_parse_back():
    assert prompts.asr_target("en", "HELLO WORLD") == "Language: en\nTranscription: HELLO WORLD"
    ast = prompts.ast_target("de", "Guten Morgen", "Good morning")
    assert ast == "Language: de\nTranscription: Guten Morgen\nTranslation: Good morning"
    assert ast.startswith(prompts.speech_target_prefix("de"))
    assert prompts.parse_speech_target(ast) == {"language": "de", "transcription": "Guten Morgen",
                                                "translation": "Good morning"}
    assert prompts.parse_speech_target("just words") == {"language": None, "transcription": "just words",
                                                         "translation": None}


def test_multi_turn_masks(fmt, tok):
    turns = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "thinking": "r1"},
             {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "thinking": "r2"}]
    enc = fmt.encode_dialog(turns, thinking=True)
    text = tok.decode(enc["input_ids"])
    # latest-turn thought retention: the earlier turn loses its reasoning and is context only
    assert "<|im_start|>assistant\n<think></think>\nA1<|im_end|>\n<|im_start|>user\nQ2" in text
    assert "r1" not in text
    assert tok.decode(enc["input_ids"][enc["mask"]]) == "r2\n</think>\nA2<|im_end|>"
    # instruct mode trains every assistant turn, never the "\n" between turns
    plain = [{"role": t["role"], "content": t["content"]} for t in turns]
    enc = fmt.encode_dialog(plain)
    assert tok.decode(enc["input_ids"][enc["mask"]]) == "A1<|im_end|>A2<|im_end|>"


def test_own_system_turn_replaces_default(fmt):
    turns = [{"role": "system", "content": "Be brief."}] + _user_assistant("Hi", "Yo")
    assert fmt.render_text(turns).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    assert "helpful and harmless" not in fmt.render_text(turns)


def test_registered_in_nemo(tok):
    assert PromptFormatter.resolve("audex") is AudexPromptFormatter
    assert PromptFormatter.resolve("audex-sound-last") is AudexSoundLastPromptFormatter
    with pytest.raises(ValueError, match="not an Audex format"):
        get_prompt_formatter("qwen", tok)


def test_nemo_prompt_format_fn_matches_builder(tok, tmp_path):
    from audex.data.schema import make_text_cut
    from audex.data.sequence import IGNORE_INDEX, SequenceBuilder

    cut = make_text_cut("c", _user_assistant("What is 2+2?", "4"))
    enc = apply_prompt_format_fn(cut, AudexPromptFormatter(tok))
    seq = SequenceBuilder(tok)(cut)
    assert torch.equal(enc["input_ids"], seq.input_ids)
    assert torch.equal(enc["mask"], seq.labels.ne(IGNORE_INDEX))
    assert tok.decode(enc["answer_ids"]) == "4<|im_end|>"


def test_reasoning_in_instruct_mode_is_refused(fmt):
    with pytest.raises(ValueError, match="instruct mode"):
        fmt.pieces(_user_assistant("q", "a", thinking="secret"), thinking=False)
