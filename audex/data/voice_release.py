"""The release stage's data (footnote 4 of the paper): remove voice prompting before a model is released.

The paper measures voice-prompted TTS on its SFT checkpoint, then runs "an extra stage to remove speech prompting
abilities for responsible model release" and keeps only fixed-voice TTS (Table 6). It does not give the recipe.
Audex's: fine-tune on fixed-voice examples that *carry a voice prompt of another speaker* while their target
stays the fixed voice (``conf/stage_release.yaml``). The model learns that the prompt no longer changes the voice;
the fixed-voice examples and text keep the rest in place. :class:`~audex.eval.suites.tts.TtsSuite` with
``mode: prompting`` and ``compare_fixed_voice: true`` measures the result: the speaker similarity to the prompt of
prompted speech falls to that of fixed-voice speech (``prompting_sim_gain`` near 0).

Here: each fixed-voice TTS cut (one without a voice prompt) gets one copy with a reference drawn, seeded, from
``references`` (TTS cuts of other speakers: their speech codes and transcript become ``voice_codes`` /
``voice_text``); the copy's id gets :data:`RELEASE_SUFFIX`. ``scripts/make_voice_release.py`` is the command line.

Example::

    >>> copies = list(voice_release_copies(fixed_voice_cuts, prompt_speaker_cuts, seed=0))
    >>> get_voice_prompt(copies[0])[1]          # a prompt speaker's transcript; the target is the fixed voice
"""

from __future__ import annotations

import random
from typing import Iterable, Iterator, Sequence

from lhotse.cut import Cut
from lhotse.utils import fastcopy

from audex.data import schema

RELEASE_SUFFIX = "_voice_release"


def voice_release_copies(fixed_voice: Iterable[Cut], references: Sequence[Cut], seed: int = 0) -> Iterator[Cut]:
    """One copy per fixed-voice TTS cut, with a voice prompt drawn from ``references``; targets unchanged."""
    prompts = []
    for ref in references:
        if schema.get_task(ref) != schema.TTS:
            raise ValueError(f"reference {ref.id!r} is a {schema.get_task(ref)!r} cut; references are TTS cuts of "
                             "the prompt speakers (speech codes + transcript)")
        prompts.append((schema.encode_speech_codes(schema.get_speech_codes(ref)), schema.get_transcript(ref)))
    if not prompts:
        raise ValueError("no reference cuts: give TTS cuts of other speakers to draw voice prompts from")
    rng = random.Random(seed)
    for cut in fixed_voice:
        if schema.get_task(cut) != schema.TTS or schema.get_voice_prompt(cut) is not None:
            raise ValueError(f"cut {cut.id!r} is not a fixed-voice TTS cut (task {schema.get_task(cut)!r}, or it already "
                             "has a voice prompt)")
        if (cut.custom or {}).get("cfg_uncond_pads") is not None:
            continue  # a CFG twin has no transcript to speak; the originals carry the release signal
        codes, text = prompts[rng.randrange(len(prompts))]
        custom = {**(cut.custom or {}), "voice_codes": codes, "voice_text": text}
        yield fastcopy(cut, id=cut.id + RELEASE_SUFFIX, custom=custom)
