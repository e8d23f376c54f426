"""CFG pre-processing: exactly 10 % per generation task, seeded, only untrainable padding in place of the condition."""

from collections import Counter

import pytest
import torch
from data_scripts import load_script
from lhotse import CutSet

from audex.data import schema
from audex.data.cfg_uncond import UNCOND_SUFFIX, CfgUncondConfig, blend_cfg_uncond, num_selected
from audex.data.sequence import IGNORE_INDEX, SequenceBuilder
from audex.tokenizer import AudexTokenizer
from audex.vocab import AudexVocab


@pytest.fixture(scope="module")
def tok():
    return AudexTokenizer.build_tiny(AudexVocab(), bpe_size=512)


@pytest.fixture(scope="module")
def corpus():
    g = torch.Generator().manual_seed(0)
    tts = [schema.make_tts_cut(f"Sentence number {i}.", speech_codes=torch.randint(0, 65536, (20 + i % 7,), generator=g),
                               cut_id=f"tts{i}") for i in range(137)]
    tta = [schema.make_tta_cut(f"A dog barks {i} times.", audio_codes=torch.randint(0, 1024, (4, 500), generator=g),
                               cut_id=f"tta{i}") for i in range(45)]
    chats = [schema.make_text_cut(f"chat{i}", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
             for i in range(30)]
    return CutSet.from_cuts([c for group in zip(tts, tta + chats) for c in group] + tts[len(tta + chats):])


def test_round_half_up():
    assert [num_selected(n, 0.1) for n in (4, 5, 15, 45, 137, 1000)] == [0, 1, 2, 5, 14, 100]


def test_exactly_ten_percent_per_task(corpus):
    out = list(blend_cfg_uncond(corpus, CfgUncondConfig(seed=3)))
    originals = Counter(c.custom["task"] for c in out if "cfg_uncond_pads" not in c.custom)
    copies = Counter(c.custom["task"] for c in out if "cfg_uncond_pads" in c.custom)
    assert originals == {"tts": 137, "tta": 45, "text": 30}
    assert copies == {"tts": 14, "tta": 5}  # round(13.7), round(4.5)
    assert len(out) == len(corpus) + 19
    ids = [c.id for c in out]
    assert len(set(ids)) == len(ids)
    for i, cut in enumerate(out):  # each copy follows its original
        if "cfg_uncond_pads" in cut.custom:
            assert ids[i - 1] + UNCOND_SUFFIX == cut.id
            assert 1 <= cut.custom["cfg_uncond_pads"] <= 128


def test_seeded_reproducibility(corpus):
    def picks(seed):
        return [(c.id, c.custom["cfg_uncond_pads"]) for c in blend_cfg_uncond(corpus, CfgUncondConfig(seed=seed))
                if "cfg_uncond_pads" in c.custom]

    assert picks(7) == picks(7)
    assert picks(7) != picks(8)


def test_only_padding_replaces_the_condition(corpus, tok):
    builder = SequenceBuilder(tok, max_length=8192)
    out = list(blend_cfg_uncond(corpus, CfgUncondConfig(seed=1, min_pads=5, max_pads=9)))
    checked = Counter()
    for orig, copy in zip(out, out[1:]):
        if copy.id != orig.id + UNCOND_SUFFIX:
            continue
        k = copy.custom["cfg_uncond_pads"]
        task = schema.get_task(copy)
        condition = schema.get_transcript(orig) if task == "tts" else schema.get_caption(orig)
        # the copy carries no trace of its condition
        assert "caption" not in copy.custom and all(s.text is None for s in copy.supervisions)
        a, b = builder(orig), builder(copy)
        text_a, text_b = tok.decode(a.input_ids), tok.decode(b.input_ids)
        assert condition in text_a and condition not in text_b
        assert text_b == text_a.replace(condition, "<pad>" * k)
        pads = b.input_ids == tok.pad_id
        assert int(pads.sum()) == k and (b.labels[pads] == IGNORE_INDEX).all()
        # the target is the same, token for token
        assert torch.equal(a.labels[a.labels != IGNORE_INDEX], b.labels[b.labels != IGNORE_INDEX])
        checked[task] += 1
    assert checked == {"tts": 14, "tta": 5}


def test_refuses_generators_and_second_runs(corpus):
    with pytest.raises(TypeError, match="reads the cuts twice"):
        list(blend_cfg_uncond(iter(corpus)))
    once = CutSet.from_cuts(list(blend_cfg_uncond(corpus)))
    with pytest.raises(ValueError, match="already a CFG-unconditional copy"):
        list(blend_cfg_uncond(once))
    with pytest.raises(ValueError, match="generation tasks"):
        CfgUncondConfig(tasks=("asr",))


def test_script(corpus, tmp_path, capsys):
    script = load_script("make_cfg_uncond")
    src, dst = tmp_path / "in.jsonl.gz", tmp_path / "out.jsonl.gz"
    corpus.to_file(src)
    assert script.main([str(src), "-o", str(dst), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "tts: 137 examples, 14 unconditional copies (10.22 %)" in printed
    assert "tta: 45 examples, 5 unconditional copies (11.11 %)" in printed
    written = list(CutSet.from_file(dst))
    assert [c.id for c in written] == [c.id for c in blend_cfg_uncond(corpus, CfgUncondConfig(seed=3))]
    assert script.main([str(dst), "-o", str(tmp_path / "again.jsonl")]) == 1
    assert "already a CFG-unconditional copy" in capsys.readouterr().out
