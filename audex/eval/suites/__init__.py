"""Evaluation suites, one per benchmark family of section 5; ``SUITES[name]`` is the class.

=============  ===============================================  ========================  ==========
suite          benchmark (paper)                                metric                    table
=============  ===============================================  ========================  ==========
asr            Open ASR leaderboard, FLEURS multilingual        WER                       8, 10
noisy_asr      LibriSpeech test-clean + noise at 7 SNR levels   WER per level, average    9
ast            FLEURS X -> English                              BLEU, COMET               11
mcq            MMAU, MMAR, MMSU                                 accuracy                  12
entailment     Audio Entailment (Clotho v2, AudioCaps)          accuracy                  12
hallucination  CMM                                              accuracy                  12
tts            Seed-TTS-Eval (English)                          WER, SIM                  6
tta            AudioCaps, SongDescriber                         Fréchet distance          7
s2s            BigBenchAudio                                    cascade accuracy          13
text           any text set, two checkpoints                    loss / accuracy deltas    1
=============  ===============================================  ========================  ==========
"""

from audex.eval.suites.asr import AsrSuite
from audex.eval.suites.ast import AstSuite
from audex.eval.suites.base import ResumeMismatchError, Suite
from audex.eval.suites.noisy_asr import NoisyAsrSuite
from audex.eval.suites.qa import EntailmentSuite, HallucinationSuite, McqSuite
from audex.eval.suites.s2s import SpeechToSpeechSuite
from audex.eval.suites.text import TextRetentionSuite
from audex.eval.suites.tta import TtaSuite
from audex.eval.suites.tts import TtsSuite

SUITES: dict[str, type[Suite]] = {cls.name: cls for cls in (
    AsrSuite, NoisyAsrSuite, AstSuite, McqSuite, EntailmentSuite, HallucinationSuite, TtsSuite, TtaSuite,
    SpeechToSpeechSuite, TextRetentionSuite)}


def suite_class(name: str) -> type[Suite]:
    try:
        return SUITES[name]
    except KeyError:
        raise KeyError(f"unknown eval suite {name!r}; known: {sorted(SUITES)}") from None


__all__ = ["SUITES", "Suite", "ResumeMismatchError", "suite_class", *(cls.__name__ for cls in SUITES.values())]
