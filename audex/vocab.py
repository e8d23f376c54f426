"""The extended Audex vocabulary: one explicit object for the id layout of section 3.3.

Layout (real 2B / 30B-A3B models)::

    [0, 131072)           text tokens of the backbone's tokenizer (chat markers, <think>, <sound>,
                          <so_start>, <so_embedding>, <so_end> live here)
    [131072, 196608)      65,536 <speechcodec_i>   (X-Codec2, single FSQ codebook)
    [196608, 204800)      8,192 <audiocodec_i>     (X-Codec RVQ 8 x 1,024; layer q, code c -> q*1024 + c)
    [204800, 204805)      <speechgen_start> <speechgen_end> <audiogen_start> <audiogen_end> <audiogen>
    [204805, 205312)      padding rows, so that the table is a multiple of 512 (Megatron TP)

Only the first ``audio_rvq_used`` (4) RVQ layers are generated; all 8 are reserved so that a model
may later use more depth without moving any id. RVQ codes ``[n_q, T]`` are flattened frame-major
(``t0q0 t0q1 t0q2 t0q3 t1q0 ...``, MusicGen's "flattening" pattern): 50 Hz x 4 = 200 tokens/s.

Example::

    >>> v = AudexVocab(text_vocab_size=131072)
    >>> v.size, v.speech_offset, v.audio_offset
    (205312, 131072, 196608)
    >>> v.audio_codes_to_ids(torch.tensor([[5, 6], [7, 8], [1, 2], [3, 4]])).tolist()
    [196613, 197639, 198657, 199683, 196614, 197640, 198658, 199684]

No library holds this layout (it is the paper's own), hence a hand-written module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

GENERATION_SPECIALS: tuple[str, ...] = (
    "<speechgen_start>",
    "<speechgen_end>",
    "<audiogen_start>",
    "<audiogen_end>",
    "<audiogen>",
)

# Tokens of Figure 2 that must exist in the *text* tokenizer (they sit in the text id range).
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
SOUND = "<sound>"
SO_START = "<so_start>"
SO_EMBEDDING = "<so_embedding>"
SO_END = "<so_end>"
PAD = "<pad>"
TEXT_SPECIALS: tuple[str, ...] = (IM_START, IM_END, THINK_START, THINK_END, SOUND, SO_START, SO_EMBEDDING, SO_END, PAD)


@dataclass(frozen=True)
class AudexVocab:
    """Id layout of the extended vocabulary.

    Args:
        text_vocab_size: rows of the backbone's text vocabulary (131,072 for the real tokenizer).
        speech_codebook_size: X-Codec2 FSQ codebook (65,536 = 4^8).
        audio_codebook_size: X-Codec codebook per RVQ layer (1,024).
        audio_rvq_reserved: RVQ layers reserved in the vocabulary (8).
        audio_rvq_used: RVQ layers generated (4).
        pad_to_multiple_of: embedding table padding (512, for tensor parallelism).
    """

    text_vocab_size: int = 131072
    speech_codebook_size: int = 65536
    audio_codebook_size: int = 1024
    audio_rvq_reserved: int = 8
    audio_rvq_used: int = 4
    pad_to_multiple_of: int = 512
    codec_frame_rate_hz: int = 50
    specials: tuple[str, ...] = field(default=GENERATION_SPECIALS)

    def __post_init__(self):
        for name in ("text_vocab_size", "speech_codebook_size", "audio_codebook_size", "audio_rvq_reserved",
                     "audio_rvq_used", "pad_to_multiple_of"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"AudexVocab.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.audio_rvq_used > self.audio_rvq_reserved:
            raise ValueError(
                f"AudexVocab.audio_rvq_used={self.audio_rvq_used} exceeds audio_rvq_reserved={self.audio_rvq_reserved}: "
                "reserve at least as many RVQ layers as are generated"
            )
        object.__setattr__(self, "specials", tuple(self.specials))

    # ---- offsets -------------------------------------------------------------------------------
    @property
    def speech_offset(self) -> int:
        return self.text_vocab_size

    @property
    def audio_offset(self) -> int:
        return self.speech_offset + self.speech_codebook_size

    @property
    def special_offset(self) -> int:
        return self.audio_offset + self.audio_codebook_size * self.audio_rvq_reserved

    @property
    def unpadded_size(self) -> int:
        return self.special_offset + len(self.specials)

    @property
    def size(self) -> int:
        m = self.pad_to_multiple_of
        return int(math.ceil(self.unpadded_size / m) * m)

    def special_id(self, token: str) -> int:
        try:
            return self.special_offset + self.specials.index(token)
        except ValueError:
            raise KeyError(f"{token!r} is not an Audex generation special; known: {list(self.specials)}") from None

    @property
    def speechgen_start(self) -> int:
        return self.special_id("<speechgen_start>")

    @property
    def speechgen_end(self) -> int:
        return self.special_id("<speechgen_end>")

    @property
    def audiogen_start(self) -> int:
        return self.special_id("<audiogen_start>")

    @property
    def audiogen_end(self) -> int:
        return self.special_id("<audiogen_end>")

    @property
    def audiogen(self) -> int:
        return self.special_id("<audiogen>")

    @property
    def speech_range(self) -> range:
        return range(self.speech_offset, self.audio_offset)

    @property
    def audio_range(self) -> range:
        """All reserved audio-codec ids (8 layers)."""
        return range(self.audio_offset, self.special_offset)

    def audio_layer_range(self, layer: int) -> range:
        if not 0 <= layer < self.audio_rvq_reserved:
            raise ValueError(f"RVQ layer {layer} outside [0, {self.audio_rvq_reserved})")
        start = self.audio_offset + layer * self.audio_codebook_size
        return range(start, start + self.audio_codebook_size)

    @property
    def new_token_range(self) -> range:
        """Rows added to the text vocabulary (codec tokens, generation specials and padding)."""
        return range(self.text_vocab_size, self.size)

    def tokens_per_second(self, kind: str) -> int:
        if kind == "speech":
            return self.codec_frame_rate_hz
        if kind == "audio":
            return self.codec_frame_rate_hz * self.audio_rvq_used
        raise ValueError(f"unknown codec kind {kind!r}: use 'speech' or 'audio'")

    # ---- masks ---------------------------------------------------------------------------------
    def text_row_mask(self, device=None) -> torch.Tensor:
        """Bool [size]: True for rows of the original text vocabulary."""
        m = torch.zeros(self.size, dtype=torch.bool, device=device)
        m[: self.text_vocab_size] = True
        return m

    def is_speech(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.speech_offset) & (ids < self.audio_offset)

    def is_audio(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.audio_offset) & (ids < self.special_offset)

    # ---- speech codec (single codebook) --------------------------------------------------------
    def speech_codes_to_ids(self, codes: torch.Tensor | Sequence[int]) -> torch.Tensor:
        codes = torch.as_tensor(codes, dtype=torch.long)
        self._check_range(codes, self.speech_codebook_size, "speech codec code")
        return codes + self.speech_offset

    def ids_to_speech_codes(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if not bool(self.is_speech(ids).all()):
            bad = ids[~self.is_speech(ids)][:5].tolist()
            raise ValueError(f"ids {bad} are not <speechcodec_i> tokens (expected [{self.speech_offset}, {self.audio_offset}))")
        return ids - self.speech_offset

    # ---- audio codec (RVQ) ---------------------------------------------------------------------
    @staticmethod
    def flatten_rvq(codes: torch.Tensor) -> torch.Tensor:
        """``[n_q, T]`` -> ``[T * n_q]`` frame-major (all layers of frame 0, then frame 1, ...)."""
        if codes.dim() != 2:
            raise ValueError(f"RVQ codes must be [n_q, T], got shape {tuple(codes.shape)}")
        return codes.t().reshape(-1)

    @staticmethod
    def unflatten_rvq(flat: torch.Tensor, n_q: int) -> torch.Tensor:
        """Inverse of :meth:`flatten_rvq`: ``[T * n_q]`` -> ``[n_q, T]``."""
        flat = torch.as_tensor(flat)
        if flat.dim() != 1 or flat.numel() % n_q:
            raise ValueError(f"cannot unflatten {tuple(flat.shape)} RVQ tokens into {n_q} layers: length must be a multiple of {n_q}")
        return flat.reshape(-1, n_q).t().contiguous()

    def audio_codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """RVQ codes ``[n_q, T]`` (n_q <= reserved) -> flattened token ids ``[T * n_q]``."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.dim() != 2 or codes.shape[0] > self.audio_rvq_reserved:
            raise ValueError(f"audio codes must be [n_q<={self.audio_rvq_reserved}, T], got {tuple(codes.shape)}")
        self._check_range(codes, self.audio_codebook_size, "audio codec code")
        layer = torch.arange(codes.shape[0]).unsqueeze(1)
        return self.flatten_rvq(codes + self.audio_offset + layer * self.audio_codebook_size)

    def ids_to_audio_codes(self, ids: torch.Tensor | Sequence[int], n_q: int | None = None) -> torch.Tensor:
        """Flattened ids -> RVQ codes ``[n_q, T]``; checks each id belongs to its layer."""
        n_q = n_q or self.audio_rvq_used
        ids = torch.as_tensor(ids, dtype=torch.long)
        grid = self.unflatten_rvq(ids, n_q)
        rel = grid - self.audio_offset
        layer = torch.arange(n_q).unsqueeze(1)
        expected_layer = rel.div(self.audio_codebook_size, rounding_mode="floor")
        if bool((rel < 0).any()) or bool((expected_layer != layer).any()):
            raise ValueError(
                "audio token ids are not in frame-major RVQ layer order "
                f"(position t*{n_q}+q must hold an <audiocodec_i> of layer q)"
            )
        return rel - layer * self.audio_codebook_size

    def audio_layer_of_position(self, position: int) -> int:
        """RVQ layer due at the ``position``-th generated audio token (frame-major order)."""
        return position % self.audio_rvq_used

    # ---- tokens as strings ---------------------------------------------------------------------
    def id_to_token(self, idx: int) -> str | None:
        """String form of a non-text id, or None for text ids (the tokenizer owns those)."""
        if idx < self.text_vocab_size:
            return None
        if idx < self.audio_offset:
            return f"<speechcodec_{idx - self.speech_offset}>"
        if idx < self.special_offset:
            return f"<audiocodec_{idx - self.audio_offset}>"
        if idx < self.unpadded_size:
            return self.specials[idx - self.special_offset]
        return f"<vocab_pad_{idx - self.unpadded_size}>"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["specials"] = list(self.specials)
        return d

    @staticmethod
    def _check_range(codes: torch.Tensor, n: int, what: str):
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n):
            raise ValueError(f"{what} out of range: got min {int(codes.min())}, max {int(codes.max())}, expected [0, {n})")
