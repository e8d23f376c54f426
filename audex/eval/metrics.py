"""Metrics of the paper's benchmarks: WER, BLEU, COMET, Fréchet distance, speaker similarity.

Each metric uses the library the community scores it with — jiwer for the WER alignment, sacrebleu for BLEU,
unbabel-comet for COMET, scipy's ``sqrtm`` for the Fréchet distance — and this module only adds what the harness
needs around them: corpus-level aggregation from per-sample counts (so that a resumed run scores exactly like an
uninterrupted one) and an explicit :class:`NotComputed` value for metrics whose model is not available locally.

Example::

    >>> counts = [word_errors("the cat sat", "the cat sat"), word_errors("a b c d", "a x c")]
    >>> corpus_wer(counts)          # (0 + 2) errors / (3 + 4) reference words
    0.2857142857142857
    >>> round(corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]), 1)
    100.0
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import jiwer
import numpy as np
import sacrebleu
from scipy import linalg

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NotComputed:
    """A metric that could not be computed, with the reason (printed in the summary instead of a number)."""

    reason: str

    def __str__(self) -> str:
        return f"not computed ({self.reason})"

    def to_json(self) -> dict:
        return {"not_computed": self.reason}


# ---- WER -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WordErrorCounts:
    """Edit operations of one (or many, once summed) reference/hypothesis pairs, from jiwer's alignment."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    reference_words: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        if self.reference_words == 0:
            raise ValueError("WER is undefined for an empty reference: drop samples whose normalised reference is empty")
        return self.errors / self.reference_words

    def __add__(self, other: "WordErrorCounts") -> "WordErrorCounts":
        return WordErrorCounts(self.substitutions + other.substitutions, self.deletions + other.deletions,
                               self.insertions + other.insertions, self.reference_words + other.reference_words)

    def to_json(self) -> dict:
        return asdict(self)


def word_errors(reference: str, hypothesis: str) -> WordErrorCounts:
    """Align two *already normalised* strings (see :mod:`audex.eval.normalize`) with jiwer."""
    if not reference.split():
        raise ValueError("the reference has no words: an empty reference cannot be scored (the Open ASR leaderboard drops such samples)")
    out = jiwer.process_words(reference, hypothesis)
    return WordErrorCounts(out.substitutions, out.deletions, out.insertions, len(reference.split()))


def corpus_wer(counts: Iterable[WordErrorCounts]) -> float:
    """Corpus-level WER as a fraction: total errors over total reference words (not a mean of sentence WERs)."""
    total = sum(counts, WordErrorCounts())
    return total.wer


# ---- BLEU / COMET --------------------------------------------------------------------------------
def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> float:
    """sacrebleu corpus BLEU (0-100) with one reference per segment; ``13a`` is sacrebleu's default for English."""
    if len(hypotheses) != len(references):
        raise ValueError(f"corpus_bleu got {len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("corpus_bleu got no segments")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tokenize).score)


def sentence_bleu(hypothesis: str, reference: str, tokenize: str = "13a") -> float:
    """sacrebleu sentence BLEU (0-100): per-sample diagnostics only; the benchmark number is :func:`corpus_bleu`."""
    return float(sacrebleu.sentence_bleu(hypothesis, [reference], tokenize=tokenize).score)


def comet_score(sources: Sequence[str], hypotheses: Sequence[str], references: Sequence[str],
                checkpoint_path: str | None, batch_size: int = 16, gpus: int = 0) -> float | NotComputed:
    """System-level COMET (x100, as the paper prints it) from a *local* checkpoint, or :class:`NotComputed`.

    The paper uses unbabel-comet 2.2.7 with ``Unbabel/wmt22-comet-da``. Nothing is downloaded: without
    ``checkpoint_path`` (the ``checkpoints/model.ckpt`` of a local copy) or without the ``comet`` package, the
    result says why it was not computed.
    """
    if not checkpoint_path:
        return NotComputed("no local COMET checkpoint configured (set comet_checkpoint to a wmt22-comet-da model.ckpt)")
    if not Path(checkpoint_path).exists():
        return NotComputed(f"COMET checkpoint {checkpoint_path!r} does not exist")
    try:
        from comet import load_from_checkpoint
    except ImportError:
        return NotComputed("the unbabel-comet package is not installed (pip install unbabel-comet)")
    if not (len(sources) == len(hypotheses) == len(references)) or not hypotheses:
        raise ValueError(f"comet_score needs equally many sources/hypotheses/references (got {len(sources)}, "
                         f"{len(hypotheses)}, {len(references)}) and at least one")
    model = load_from_checkpoint(str(checkpoint_path))
    data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(sources, hypotheses, references)]
    out = model.predict(data, batch_size=batch_size, gpus=gpus, progress_bar=False)
    return float(out.system_score) * 100.0


# ---- Fréchet distance ----------------------------------------------------------------------------
def gaussian_statistics(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased, rows = observations) of an embedding set ``[N, D]``."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an [N >= 2, D] embedding set for a covariance, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("the embedding set contains NaN or inf values")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))``.

    The usual safeguards (as in the FID/FAD reference code): if ``sqrtm`` of the product is singular or not
    finite, ``eps`` is added to both diagonals and it is retried; a complex result whose imaginary part is
    numerical noise is reduced to its real part, a large imaginary part raises.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with np.errstate(all="ignore"):
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        log.warning("Fréchet distance: singular product of covariances; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: sqrtm has an imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_between(embeddings_a: np.ndarray, embeddings_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between two embedding sets ``[N_a, D]`` and ``[N_b, D]``."""
    return frechet_distance(*gaussian_statistics(embeddings_a), *gaussian_statistics(embeddings_b), eps=eps)


# ---- speaker similarity --------------------------------------------------------------------------
def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two embedding vectors (speaker similarity, SIM)."""
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"cosine_similarity of vectors of different sizes {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        raise ValueError("cosine_similarity of a zero vector is undefined")
    return float(a.dot(b) / (na * nb))
