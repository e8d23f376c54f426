"""Voice-prompted TTS: the manifest field, the VALL-E-style sequence (reference codes open the answer, untrained),
the CFG twin that keeps the voice, pipe.tts(voice=..., voice_text=...), and the eval suite's prompting mode end
to end on the tiny model (a few training steps, generation with a reference, SIM)."""

import pytest
import torch
from data_scripts import load_script
from hydra import compose, initialize_config_dir
from lhotse import CutSet

from audex import CONF_DIR
from audex.data import schema
from audex.data.cfg_uncond import make_uncond_copy
from audex.data.collate import collate_padded
from audex.data.sequence import IGNORE_INDEX, SequenceBuilder
from audex.data.voice_release import RELEASE_SUFFIX, voice_release_copies
from audex.eval.engine import EvalEngine
from audex.eval.samples import EvalSample
from audex.eval.suites import TtsSuite
from audex.inference.pipelines import AudexPipeline
from audex.models.audex_model import AudexModel
from audex.tokenizer import AudexTokenizer
from audex.voice_prompt import encode_voice_prompts, prompted_transcript

VOICE_TEXT = "he hoped there would be stew"
TEXT = "good evening"
VOICE = torch.tensor([5, 6, 7, 8, 9])
TARGET = torch.tensor([11, 12, 13])


@pytest.fixture(scope="module")
def tok():
    return AudexTokenizer.build_tiny()


def test_manifest_field_round_trip_and_errors():
    cut = schema.make_tts_cut(TEXT, speech_codes=TARGET, cut_id="p0", voice_codes=VOICE, voice_text=VOICE_TEXT)
    cut = type(cut).from_dict(cut.to_dict())
    codes, words = schema.get_voice_prompt(cut, codebook_size=256)
    assert codes.tolist() == VOICE.tolist() and words == VOICE_TEXT
    assert schema.get_voice_prompt(schema.make_tts_cut(TEXT, speech_codes=TARGET, cut_id="f")) is None
    with pytest.raises(ValueError, match="both voice_codes"):
        schema.make_tts_cut(TEXT, speech_codes=TARGET, cut_id="x", voice_codes=VOICE)
    with pytest.raises(ValueError, match="voice_text must be a non-empty string"):
        schema.make_tts_cut(TEXT, speech_codes=TARGET, cut_id="x", voice_codes=VOICE, voice_text=" ")


def test_sequence_reference_codes_open_the_answer_untrained(tok):
    vocab = tok.vocab
    builder = SequenceBuilder(tok, max_length=None)
    cut = schema.make_tts_cut(TEXT, speech_codes=TARGET, cut_id="p0", voice_codes=VOICE, voice_text=VOICE_TEXT)
    seq = builder(cut)
    ids = seq.input_ids.tolist()
    ref = [vocab.speechgen_start, *vocab.speech_codes_to_ids(VOICE).tolist()]
    target = [*vocab.speech_codes_to_ids(TARGET).tolist(), vocab.speechgen_end, tok.im_end]
    assert ids[-len(ref + target):] == ref + target
    trained = seq.labels[seq.labels != IGNORE_INDEX].tolist()
    assert trained == target                                     # only the target codes, the span end and im_end
    assert f"Generate speech for this transcription. {VOICE_TEXT} {TEXT}<|im_end|>" in tok.decode(ids)
    # the fixed-voice sequence is the same template without the prompt
    fixed = builder(schema.make_tts_cut(TEXT, speech_codes=TARGET, cut_id="f0"))
    assert fixed.labels[fixed.labels != IGNORE_INDEX].tolist() == [vocab.speechgen_start] + target
    # the CFG twin: the whole transcript becomes pads, the reference codes stay, the trained part is unchanged
    twin = builder(make_uncond_copy(cut, num_pads=4))
    twin_ids = twin.input_ids.tolist()
    assert twin_ids[-len(ref + target):] == ref + target and VOICE_TEXT not in tok.decode(twin_ids)
    assert twin_ids.count(tok.pad_id) == 4
    assert twin.labels[twin.labels != IGNORE_INDEX].tolist() == target


class _RecordingDecoder:
    def __init__(self, decoder):
        self.decoder, self.calls = decoder, []

    def generate(self, prompts, params, **kwargs):
        self.calls.append((prompts, kwargs.get("uncond_prompts"), kwargs.get("constraint")))
        return self.decoder.generate(prompts, params, **kwargs)


def test_pipeline_prompts_and_cfg_twin(tiny_model):
    pipe = AudexPipeline(tiny_model)
    vocab, tok = pipe.vocab, pipe.tokenizer
    pipe.decoder = _RecordingDecoder(pipe.decoder)
    out = pipe.tts([TEXT, "see you"], voice=VOICE, voice_text=VOICE_TEXT, max_new_tokens=8, seed=0)
    prompts, uncond, constraint = pipe.decoder.calls[0]
    opener = [vocab.speechgen_start, *vocab.speech_codes_to_ids(VOICE).tolist()]
    for cond_row, uncond_row in zip(prompts, uncond):
        assert cond_row[-len(opener):] == opener and uncond_row[-len(opener):] == opener
        assert len(cond_row) == len(uncond_row)                # token-synchronised CFG rows
        assert VOICE_TEXT in tok.decode(cond_row) and VOICE_TEXT not in tok.decode(uncond_row)
    assert f"{VOICE_TEXT} {TEXT}<|im_end|>" in tok.decode(prompts[0])
    # the speech cap counts the span's codes: the prompt's 5 codes come on top of the preset's 120 s
    assert constraint.max_speech_tokens == 120 * 50 + round(5 / 50 * 50)
    assert all(r.codes.numel() <= 8 for r in out)
    with pytest.raises(ValueError, match="both voice"):
        pipe.tts([TEXT], voice=VOICE)
    with pytest.raises(ValueError, match="one per text"):
        pipe.tts([TEXT, TEXT], voice=[VOICE], voice_text=[VOICE_TEXT])


def test_encode_voice_prompts_encodes_each_waveform_once(tiny_model, tone):
    calls = []

    class Codec:
        def encode(self, wav):
            calls.append(wav.numel())
            return tiny_model.speech_codec.encode(wav)

    wav = tone(0.4)
    prompts = encode_voice_prompts(Codec(), 3, wav, VOICE_TEXT)
    assert calls == [6400] and [len(c) for c, _ in prompts] == [20, 20, 20]     # 0.4 s at 50 codes/s
    assert prompted_transcript(VOICE_TEXT, TEXT) == f"{VOICE_TEXT} {TEXT}"


def test_prompted_tts_end_to_end_train_generate_and_sim(tiny_yaml, tone, speaker_model_dir, tmp_path):
    torch.manual_seed(0)
    model = AudexModel.from_config_file(str(tiny_yaml)).train()  # its own copy: the session's model stays untouched
    codec = model.speech_codec
    voices = {f: tone(0.4, freq=f) for f in (220.0, 330.0)}
    codes = {f: codec.encode(w) for f, w in voices.items()}
    builder = SequenceBuilder(model.tokenizer, model.frames_for_samples, max_length=None)
    cuts = [schema.make_tts_cut(text, speech_codes=codes[f][:12], cut_id=f"c{i}", voice_codes=codes[f],
                                voice_text=f"a voice at {int(f)}")
            for i, (text, f) in enumerate([("one two", 220.0), ("three four", 330.0), ("five six", 220.0)])]
    batch = collate_padded([builder(c) for c in cuts], model.tokenizer.pad_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, _ = model.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]                               # it learns the prompted form
    model.eval()
    result = AudexPipeline(model).tts(["one two"], voice=voices[220.0], voice_text="a voice at 220",
                                      max_new_tokens=14, seed=0)[0]
    assert result.waveform.numel() == result.codes.numel() * 320 and result.codes.numel() > 0
    # the eval suite, prompting mode: each sample's audio is the prompt and SIM's reference
    audio = {f: (lambda w=w: w) for f, w in voices.items()}
    samples = [EvalSample("s0", {"text": "one two", "voice_text": "a voice at 220"}, "v220.wav", audio[220.0]),
               EvalSample("s1", {"text": "three four", "voice_text": "a voice at 330"}, "v330.wav", audio[330.0]),
               EvalSample("s2", {"text": "five six"}, "v220.wav", audio[220.0])]          # no voice_text: an error
    engine = EvalEngine(model, seed=0, generation={"tts": {"max_new_tokens": 14}})
    suite = TtsSuite({"mode": "prompting", "benchmark": "seed_tts_eval/en", "speaker_model": str(speaker_model_dir),
                      "compare_fixed_voice": True}, engine=engine)
    summary = suite.run(samples, tmp_path, "tiny", progress=False)
    assert summary.counts == {"total": 3, "scored": 2, "errors": 1}
    m = summary.metrics
    assert isinstance(m["speaker_similarity"], float) and -100.0 <= m["speaker_similarity"] <= 100.0
    # the release stage's check: prompted speech's SIM to its prompt against fixed-voice speech's SIM to it
    assert m["prompting_sim_gain"] == pytest.approx(m["speaker_similarity"] - m["speaker_similarity_fixed_voice"])
    assert [c.metric for c in summary.comparisons][:1] == ["wer_prompting"]


def _fixed_and_references():
    fixed = [schema.make_tts_cut(f"fixed {i}", speech_codes=torch.arange(5) + i, cut_id=f"f{i}") for i in range(6)]
    fixed.append(make_uncond_copy(fixed[0], num_pads=3))
    refs = [schema.make_tts_cut(f"speaker {k} talks", speech_codes=torch.full((4,), 100 + k), cut_id=f"r{k}")
            for k in range(3)]
    return fixed, refs


def test_voice_release_copies_keep_the_fixed_voice_target():
    fixed, refs = _fixed_and_references()
    copies = list(voice_release_copies(fixed, refs, seed=0))
    assert [c.id for c in copies] == [f"f{i}{RELEASE_SUFFIX}" for i in range(6)]   # the CFG twin gets no copy
    for i, c in enumerate(copies):
        assert torch.equal(schema.get_speech_codes(c), schema.get_speech_codes(fixed[i]))  # still the fixed voice
        codes, text = schema.get_voice_prompt(c)
        k = int(codes[0]) - 100
        assert codes.tolist() == [100 + k] * 4 and text == f"speaker {k} talks"
    assert [c.custom["voice_text"] for c in copies] == [c.custom["voice_text"]
                                                        for c in voice_release_copies(fixed, refs, seed=0)]
    assert len({c.custom["voice_text"] for c in copies}) > 1                      # drawn among the speakers
    with pytest.raises(ValueError, match="no reference cuts"):
        list(voice_release_copies(fixed, [], seed=0))
    with pytest.raises(ValueError, match="not a fixed-voice TTS cut"):
        list(voice_release_copies(copies[:1], refs))


def test_make_voice_release_script_and_stage_config(tmp_path):
    fixed, refs = _fixed_and_references()
    CutSet.from_cuts(fixed).to_file(tmp_path / "fixed.jsonl")
    CutSet.from_cuts(refs).to_file(tmp_path / "refs.jsonl")
    script = load_script("make_voice_release")
    code = script.main([str(tmp_path / "fixed.jsonl"), str(tmp_path / "refs.jsonl"), "-o", str(tmp_path / "out.jsonl")])
    ids = [c.id for c in CutSet.from_file(tmp_path / "out.jsonl")]
    assert code == 0 and ids[:2] == ["f0", f"f0{RELEASE_SUFFIX}"] and ids[-1] == "f0_cfg_uncond"
    assert len(ids) == 7 + 6 and ids[1::2][:6] == [f"f{i}{RELEASE_SUFFIX}" for i in range(6)]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="stage_release")
    assert list(cfg.model.stage.trainable) == ["llm"] and cfg.data.blend_epochs.tts == 1.0
    assert cfg.data.blend_epochs.text > 0 and cfg.model.optim.lr < 2e-5     # text kept; a gentle corrective pass
