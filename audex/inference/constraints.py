"""Constrained generation: which tokens each row may sample next, from the grammar of Figure 2.

A per-row state machine follows every token (prompt and generated) of the current assistant turn:

* **text**: text tokens except the input-only ones (``<sound>``, ``<so_*>``, ``<pad>``), never a codec
  token; ``<speechgen_start>`` / ``<audiogen_start>`` only where the task generates speech / audio.
* **speech** (after ``<speechgen_start>``): ``<speechcodec_i>`` or ``<speechgen_end>``; only the end once
  ``max_speech_tokens`` codes were generated.
* **audio** (after ``<audiogen_start>``, t-th code): ``<audiocodec_i>`` of RVQ layer ``t mod 4`` while
  t < 2,000, then only ``<audiogen_end>`` (TTA is a fixed 10 s: 500 frames x 4 layers).
* **close** (after a span's end): ``<|im_end|>``, as the template closes the turn right after a span.

The mask is applied with ``masked_fill(-inf)`` to the *final* logits, i.e. after CFG mixing
(:func:`~audex.inference.cfg.cfg_mix`) and before temperature/top-k/top-p: the mixing never sees a
``-inf`` (so it cannot make a NaN or lift a masked entry back up), and top-k chooses among allowed tokens.
No library constrains by position inside an RVQ-flattened span (transformers' ``LogitsProcessor`` s see
whole sequences and would rescan them every step), hence a small vectorised state machine.

Example::

    >>> constraint = CodecConstraint.for_task(tokenizer, output="audio")
    >>> rows = constraint.begin(prompts)        # prompts end with <audiogen_start>
    >>> logits = rows.apply(logits)             # only layer-0 audio codes survive
    >>> rows.advance(next_tokens)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from audex.vocab import AudexVocab

TEXT, SPEECH, AUDIO, CLOSE = 0, 1, 2, 3
STATE_NAMES = {TEXT: "text", SPEECH: "speech", AUDIO: "audio", CLOSE: "close"}


@dataclass(frozen=True)
class CodecConstraint:
    """The token grammar of one task's assistant turn.

    Args:
        vocab: the extended vocabulary layout.
        im_end: id of ``<|im_end|>``.
        allow_speech: the turn may open a speech span (TTS).
        allow_audio: the turn may open an audio span (TTA).
        audio_tokens: codec tokens in an audio span (2,000 = 10 s x 50 Hz x 4 layers).
        max_speech_tokens: after this many speech tokens only ``<speechgen_end>`` may follow (None = no cap).
        input_only_ids: text ids that are never generated (``<sound>``, ``<so_start>``, ``<so_embedding>``,
            ``<so_end>``, ``<pad>``).
    """

    vocab: AudexVocab
    im_end: int
    allow_speech: bool = False
    allow_audio: bool = False
    audio_tokens: int = 2000
    max_speech_tokens: int | None = None
    input_only_ids: tuple[int, ...] = ()

    def __post_init__(self):
        n_q = self.vocab.audio_rvq_used
        if self.audio_tokens <= 0 or self.audio_tokens % n_q:
            raise ValueError(
                f"audio_tokens={self.audio_tokens} must be a positive multiple of the {n_q} RVQ layers "
                "(whole frames; 10 s = 500 frames x 4 = 2000)"
            )
        if self.max_speech_tokens is not None and self.max_speech_tokens < 1:
            raise ValueError(f"max_speech_tokens must be >= 1 or None, got {self.max_speech_tokens}")

    @classmethod
    def for_task(cls, tokenizer, output: str = "text", audio_seconds: float = 10.0,
                 max_speech_seconds: float | None = None) -> "CodecConstraint":
        """The constraint for a task whose assistant turn produces ``output`` ("text", "speech" or "audio")."""
        if output not in ("text", "speech", "audio"):
            raise ValueError(f"unknown task output {output!r}: use 'text', 'speech' or 'audio'")
        vocab = tokenizer.vocab
        return cls(
            vocab=vocab,
            im_end=tokenizer.im_end,
            allow_speech=output == "speech",
            allow_audio=output == "audio",
            audio_tokens=int(round(audio_seconds * vocab.tokens_per_second("audio"))),
            max_speech_tokens=None if max_speech_seconds is None
            else int(round(max_speech_seconds * vocab.tokens_per_second("speech"))),
            input_only_ids=tuple(sorted({tokenizer.sound, tokenizer.so_start, tokenizer.so_embedding,
                                         tokenizer.so_end, tokenizer.pad_id})),
        )

    # ---- the allowed-token tables ----------------------------------------------------------------
    @property
    def num_audio_layers(self) -> int:
        return self.vocab.audio_rvq_used

    # mask rows: 0 text, 1 speech, 2 speech-end only, 3 .. 3+n_q-1 audio layer q, 3+n_q audio-end, 4+n_q im_end
    def _mask_table(self, device) -> torch.Tensor:
        v, n_q = self.vocab, self.num_audio_layers
        table = torch.zeros(5 + n_q, v.size, dtype=torch.bool)
        table[0, : v.text_vocab_size] = True
        table[0, list(self.input_only_ids)] = False
        if self.allow_speech:
            table[0, v.speechgen_start] = True
        if self.allow_audio:
            table[0, v.audiogen_start] = True
        table[1, v.speech_offset : v.audio_offset] = True
        table[1, v.speechgen_end] = True
        table[2, v.speechgen_end] = True
        for q in range(n_q):
            layer = v.audio_layer_range(q)
            table[3 + q, layer.start : layer.stop] = True
        table[3 + n_q, v.audiogen_end] = True
        table[4 + n_q, self.im_end] = True
        return table.to(device)

    def begin(self, prompts: Sequence[Sequence[int]]) -> "ConstrainedRows":
        """Row states after reading each prompt's last assistant turn (a prompt may end inside a span)."""
        states, counts = [], []
        for prompt in prompts:
            state, count = TEXT, 0
            for token in _current_turn(prompt, self.im_end):
                state, count = self.step_one(state, count, int(token))
            states.append(state)
            counts.append(count)
        return ConstrainedRows(self, torch.tensor(states, dtype=torch.long), torch.tensor(counts, dtype=torch.long))

    def step_one(self, state: int, count: int, token: int) -> tuple[int, int]:
        """The transition for one token (scalar form, used on prompts and as the reference in tests)."""
        v = self.vocab
        if state == TEXT:
            if token == v.speechgen_start:
                return SPEECH, 0
            if token == v.audiogen_start:
                return AUDIO, 0
            return TEXT, 0
        if state == SPEECH:
            return (CLOSE, 0) if token == v.speechgen_end else (SPEECH, count + 1)
        if state == AUDIO:
            return (CLOSE, 0) if token == v.audiogen_end else (AUDIO, count + 1)
        return (TEXT, 0) if token == self.im_end else (CLOSE, 0)


def _current_turn(prompt: Sequence[int], im_end: int) -> Iterable[int]:
    """Tokens after the last ``<|im_end|>``: the open turn whose grammar applies to the next token."""
    prompt = list(prompt)
    last_end = max((i for i, t in enumerate(prompt) if int(t) == im_end), default=-1)
    return prompt[last_end + 1 :]


class ConstrainedRows:
    """The live state of a batch under a :class:`CodecConstraint`: ``apply`` before sampling, ``advance`` after."""

    def __init__(self, constraint: CodecConstraint, states: torch.Tensor, counts: torch.Tensor):
        self.constraint = constraint
        self.states = states
        self.counts = counts
        self._table: torch.Tensor | None = None

    def mask_rows(self) -> torch.Tensor:
        """Index into the mask table for every row, ``[B]``."""
        c, n_q = self.constraint, self.constraint.num_audio_layers
        speech = torch.ones_like(self.counts)  # speech codes or end
        if c.max_speech_tokens is not None:
            speech = torch.where(self.counts >= c.max_speech_tokens, 2, 1)
        audio = torch.where(self.counts < c.audio_tokens, 3 + self.counts % n_q, 3 + n_q)
        idx = torch.zeros_like(self.states)
        idx = torch.where(self.states == SPEECH, speech, idx)
        idx = torch.where(self.states == AUDIO, audio, idx)
        return torch.where(self.states == CLOSE, 4 + n_q, idx)

    def allowed(self, device=None) -> torch.Tensor:
        """Bool ``[B, V]``: True where a token may be sampled next."""
        device = device or self.states.device
        if self._table is None or self._table.device != torch.device(device):
            self._table = self.constraint._mask_table(device)
        return self._table.index_select(0, self.mask_rows().to(device))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Final logits ``[B, V]`` -> the same with every forbidden entry set to ``-inf``."""
        if logits.shape[-1] != self.constraint.vocab.size:
            raise ValueError(f"logits have {logits.shape[-1]} entries but the vocabulary has {self.constraint.vocab.size}")
        return logits.masked_fill(~self.allowed(logits.device), float("-inf"))

    def advance(self, tokens: torch.Tensor) -> None:
        """Move every row past its sampled token ``[B]``."""
        v, im_end = self.constraint.vocab, self.constraint.im_end
        tokens = tokens.to(self.states.device)
        s, n = self.states, self.counts
        text, speech, audio, close = s == TEXT, s == SPEECH, s == AUDIO, s == CLOSE
        opens_speech = text & (tokens == v.speechgen_start)
        opens_audio = text & (tokens == v.audiogen_start)
        closes = (speech & (tokens == v.speechgen_end)) | (audio & (tokens == v.audiogen_end))
        new_state = s.clone()
        new_state[opens_speech] = SPEECH
        new_state[opens_audio] = AUDIO
        new_state[closes] = CLOSE
        new_state[close & (tokens == im_end)] = TEXT
        in_span = (speech | audio) & ~closes
        self.counts = torch.where(in_span, n + 1, torch.zeros_like(n))
        self.states = new_state
