"""The paper's published numbers as data: transcription checked against the paper's own arithmetic."""

import statistics

import pytest

from audex.eval.reference import AUDEX_MODELS, METRICS, ReferenceTables, parse_value


@pytest.fixture(scope="module")
def refs():
    return ReferenceTables.load()


def test_every_table_is_there(refs):
    assert refs.tables() == ["Table 1", "Table 6", "Table 7", "Table 8", "Table 9", "Table 10", "Table 11", "Table 12", "Table 13"]
    assert {r.metric for r in refs.all_results()} <= set(METRICS)


@pytest.mark.parametrize("benchmark, metric, model, value", [
    ("openasr/librispeech_clean", "wer", "Audex 30B-A3B", 1.34),
    ("openasr/average", "wer", "Whisper-large-v3", 7.44),
    ("noisy_librispeech/snr_-5", "wer", "Audex 30B-A3B", 9.37),
    ("noisy_librispeech/average", "wer", "Audex 2B", 3.41),
    ("fleurs_asr/ko", "wer", "Audex 30B-A3B", 9.71),
    ("fleurs_ast/de", "bleu", "Voxtral-Small-24B-2507", 43.9),
    ("fleurs_ast/average", "comet", "Audex 30B-A3B", 86.9),
    ("mmau/sound", "accuracy", "Audex 30B-A3B", 81.5),
    ("cmm_hallucination", "accuracy", "Audio-Flamingo-3", 86.5),
    ("seed_tts_eval/en", "wer_fixed_voice", "Audex 30B-A3B", 1.70),
    ("seed_tts_eval/en", "speaker_similarity", "Audex 30B-A3B", 45.3),
    ("audiocaps", "fd_openl3", "Audex 2B", 79.3),
    ("songdescriber", "fd_openl3", "Magenta RealTime", 40.5),
    ("bigbenchaudio", "accuracy", "Audex 2B", 64.3),
    ("mmlu_pro", "accuracy", "Nemotron-Cascade-2-30B-A3B", 79.8),
    ("aime2025_tool", "accuracy", "Audex 30B-A3B", 98.3),
])
def test_spot_values(refs, benchmark, metric, model, value):
    assert refs.value(benchmark, metric, model) == pytest.approx(value)


def test_cell_parsing():
    assert parse_value(1.34) == (1.34, "")
    assert parse_value("7.91‡") == (7.91, "‡")
    assert parse_value("N/S") == (None, "N/S")
    assert parse_value(None) == (None, "")
    with pytest.raises(ValueError, match="not a number"):
        parse_value("n.a.")


# the paper's own arithmetic slips, kept as printed (each an "Average" that is not the mean of its row)
PAPER_AVERAGE_SLIPS = {
    ("openasr", "wer", "Kimi-Audio-Instruct"),           # 6.62 printed, the row's mean is 7.36
    ("noisy_librispeech", "wer", "Canary Qwen 2.5B"),    # 3.58 printed, mean 3.72
    ("fleurs_ast", "bleu", "Voxtral-Small-24B-2507"),    # 41.0 printed, mean 38.4
    ("fleurs_ast", "comet", "Voxtral-Small-24B-2507"),   # 88.5 printed, mean 87.8
}
AVERAGED = {
    "openasr": ["librispeech_clean", "librispeech_other", "ami", "earnings22", "gigaspeech", "spgispeech", "tedlium", "voxpopuli"],
    "noisy_librispeech": [f"snr_{s}" for s in (-5, 0, 5, 10, 25, 50, 100)],
    "fleurs_asr": ["de", "es", "fr", "it", "pt", "ru", "ko"],
    "fleurs_ast": ["de", "es", "fr", "it", "pt", "ru", "ko"],
    "mmau": ["sound", "music", "speech"],
    "audio_entailment": ["clotho_v2", "audiocaps"],
}


def test_averages_are_the_mean_of_their_rows(refs):
    """Any typo in a transcribed cell shows up here as a new mismatch."""
    checked, slips = 0, set()
    for group, parts in AVERAGED.items():
        for metric in {r.metric for r in refs.all_results() if r.benchmark == f"{group}/average"}:
            for avg in refs.results(f"{group}/average", metric):
                values = [refs.value(f"{group}/{p}", metric, avg.model) for p in parts]
                if None in values:
                    continue
                checked += 1
                # cells and printed mean are each rounded (to 0.1 at worst): they may differ by up to 0.1
                if abs(statistics.mean(values) - avg.value) > 0.1 + 1e-9:
                    slips.add((group, metric, avg.model))
    assert slips == PAPER_AVERAGE_SLIPS
    assert checked >= 45


# Table 1 repeats numbers of the detailed tables; these differ in the paper itself
PAPER_TABLE1_SLIPS = {
    ("openasr/librispeech_clean", "Qwen3-Omni-30B-A3B-Thinking"), ("openasr/librispeech_other", "Qwen3-Omni-30B-A3B-Thinking"),
    ("openasr/librispeech_clean", "Qwen3.5-Omni-Flash"), ("openasr/librispeech_other", "Qwen3.5-Omni-Flash"),
}


def test_table1_agrees_with_the_detailed_tables(refs):
    by_key = {}
    for r in refs.all_results():
        if r.value is not None:
            by_key.setdefault((r.benchmark, r.metric, r.model), {})[r.table] = r.value
    shared = {k: v for k, v in by_key.items() if "Table 1" in v and len(v) > 1}
    differ = {(k[0], k[2]) for k, v in shared.items() if len(set(v.values())) > 1}
    assert differ == PAPER_TABLE1_SLIPS
    assert len(shared) >= 25
    # every audio number of Audex in Table 1 is also in a detailed table (Audio Entailment_2 is only an average,
    # checked against its rows above)
    audio = ["mmau/average", "mmar", "mmsu", "openasr/average", "openasr/librispeech_clean", "openasr/librispeech_other",
             "noisy_librispeech/average", "fleurs_asr/average", "fleurs_ast/average", "seed_tts_eval/en", "audiocaps",
             "songdescriber", "bigbenchaudio"]
    for bench in audio:
        found = [v for k, v in by_key.items() if k[0] == bench and k[2] == AUDEX_MODELS[0] and "Table 1" in v]
        assert found and all(len(v) == 2 for v in found), bench


def test_compare_ranks_by_the_metric_direction(refs):
    rows = refs.compare("noisy_librispeech/average", "wer", ours=2.95)
    values = [r["value"] for r in rows]
    assert values == sorted(values)
    ours = next(i for i, r in enumerate(rows) if r["ours"])
    assert rows[ours - 1]["model"] == "Audex 30B-A3B" and rows[ours + 1]["model"] == "Voxtral-Small-24B-2507"
    acc = refs.compare("bigbenchaudio", "accuracy", ours=95.0)
    # behind three 97.6 (two from Table 13, Step-Audio-R1.1 33B from Table 1) and 96.6
    assert acc[0]["value"] == 97.6 and [r["ours"] for r in acc].index(True) == 4
    assert refs.compare("audiocaps", "fd_openl3", ours=None)[-1]["ours"]
    # the detailed table wins over Table 1 for the same model
    assert {r.table for r in refs.results("openasr/librispeech_clean", "wer")} == {"Table 8"}
