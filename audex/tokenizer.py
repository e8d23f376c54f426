"""Text tokenizer of an Audex model, aware of the extended vocabulary.

Text ids come from a Hugging Face tokenizer (the backbone's own, loaded from a local folder, or a small
byte-level BPE the project trains from ``audex/assets/tiny_corpus.txt`` for the tiny model: no download).
Codec tokens and the generation specials are *not* in the text tokenizer: they live above
``text_vocab_size`` in :class:`~audex.vocab.AudexVocab` and are rendered as ``<speechcodec_i>`` /
``<audiocodec_i>`` strings by :meth:`AudexTokenizer.decode`.

The chat markers and the audio-input tokens of Figure 2 (``<|im_start|>``, ``<|im_end|>``, ``<think>``,
``</think>``, ``<sound>``, ``<so_start>``, ``<so_embedding>``, ``<so_end>``) and ``<pad>`` must be single
text tokens. A real tokenizer that lacks one may map it onto one of its reserved tokens with
``special_token_map`` (e.g. ``{"<sound>": "<SPECIAL_20>"}``); otherwise it is added, as long as the
tokenizer still fits in ``text_vocab_size``.

Example::

    >>> tok = AudexTokenizer.build_tiny()
    >>> ids = tok.encode("<|im_start|>user\\nHello<|im_end|>")
    >>> tok.decode(ids)
    '<|im_start|>user\\nHello<|im_end|>'
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from audex.vocab import TEXT_SPECIALS, AudexVocab

TINY_CORPUS = Path(__file__).parent / "assets" / "tiny_corpus.txt"


class AudexTokenizer:
    """Wraps a ``PreTrainedTokenizerFast`` plus the :class:`AudexVocab` layout above it."""

    def __init__(self, hf_tokenizer, vocab: AudexVocab, special_token_map: dict[str, str] | None = None):
        self.hf = hf_tokenizer
        self.vocab = vocab
        self.special_token_map = dict(special_token_map or {})
        missing = [t for t in TEXT_SPECIALS if self._lookup(t) is None]
        if missing:
            self.hf.add_special_tokens({"additional_special_tokens": missing})
        if len(self.hf) > vocab.text_vocab_size:
            raise ValueError(
                f"the text tokenizer has {len(self.hf)} tokens but text_vocab_size is {vocab.text_vocab_size}: "
                "raise model.vocab.text_vocab_size, or map the Audex specials onto reserved tokens with "
                "model.tokenizer.special_token_map"
            )
        # cache the special ids (validated above)
        self.special_ids = {t: self._lookup(t) for t in TEXT_SPECIALS}

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, vocab: AudexVocab, special_token_map=None) -> "AudexTokenizer":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"tokenizer folder {str(path)!r} does not exist: set model.tokenizer.pretrained_path to a local "
                "Hugging Face tokenizer folder (no downloads happen at run time)"
            )
        return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True), vocab, special_token_map)

    @classmethod
    def build_tiny(cls, vocab: AudexVocab | None = None, bpe_size: int = 512) -> "AudexTokenizer":
        """Byte-level BPE trained deterministically on the bundled corpus (the tiny model's tokenizer)."""
        vocab = vocab or AudexVocab(text_vocab_size=bpe_size, speech_codebook_size=256, audio_codebook_size=64,
                                    pad_to_multiple_of=64)
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=bpe_size,
            special_tokens=list(TEXT_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(TINY_CORPUS.read_text().splitlines(), trainer=trainer)
        hf = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>")
        return cls(hf, vocab)

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(folder))
        (folder / "audex_vocab.json").write_text(json.dumps(
            {"vocab": self.vocab.to_dict(), "special_token_map": self.special_token_map}, indent=2))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "AudexTokenizer":
        meta = json.loads((Path(folder) / "audex_vocab.json").read_text())
        vocab = AudexVocab(**meta["vocab"])
        return cls.from_pretrained(folder, vocab, meta.get("special_token_map"))

    # ---- lookups -------------------------------------------------------------------------------
    def _lookup(self, token: str) -> int | None:
        name = self.special_token_map.get(token, token)
        idx = self.hf.convert_tokens_to_ids(name)
        if idx is None or idx == self.hf.unk_token_id and name != self.hf.unk_token:
            return None
        return int(idx)

    def token_to_id(self, token: str) -> int:
        if token in self.special_ids:
            return self.special_ids[token]
        if token in self.vocab.specials:
            return self.vocab.special_id(token)
        idx = self._lookup(token)
        if idx is None:
            raise KeyError(f"{token!r} is not a single token of this tokenizer")
        return idx

    @cached_property
    def im_start(self) -> int:
        return self.special_ids["<|im_start|>"]

    @cached_property
    def im_end(self) -> int:
        return self.special_ids["<|im_end|>"]

    @cached_property
    def think_start(self) -> int:
        return self.special_ids["<think>"]

    @cached_property
    def think_end(self) -> int:
        return self.special_ids["</think>"]

    @cached_property
    def sound(self) -> int:
        return self.special_ids["<sound>"]

    @cached_property
    def so_start(self) -> int:
        return self.special_ids["<so_start>"]

    @cached_property
    def so_embedding(self) -> int:
        return self.special_ids["<so_embedding>"]

    @cached_property
    def so_end(self) -> int:
        return self.special_ids["<so_end>"]

    @cached_property
    def pad_id(self) -> int:
        return self.special_ids["<pad>"]

    @property
    def text_vocab_size(self) -> int:
        return self.vocab.text_vocab_size

    # ---- encode / decode -----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text (special tokens written literally are parsed as single tokens) -> ids."""
        for src, dst in self.special_token_map.items():
            text = text.replace(src, dst)
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text. Codec ids and generation specials are rendered as their token strings
        (or dropped with ``skip_special_tokens``)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out, run = [], []
        for i in ids:
            i = int(i)
            if i < self.vocab.text_vocab_size:
                run.append(i)
                continue
            if run:
                out.append(self.hf.decode(run, skip_special_tokens=skip_special_tokens))
                run = []
            if not skip_special_tokens:
                out.append(self.vocab.id_to_token(i))
        if run:
            out.append(self.hf.decode(run, skip_special_tokens=skip_special_tokens))
        text = "".join(out)
        for src, dst in self.special_token_map.items():
            text = text.replace(dst, src)
        return text
