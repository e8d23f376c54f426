"""Metrics against hand computation and the reference libraries called directly."""

import math

import jiwer
import numpy as np
import pytest
import sacrebleu

from audex.eval.metrics import (
    NotComputed,
    WordErrorCounts,
    comet_score,
    corpus_bleu,
    corpus_wer,
    cosine_similarity,
    frechet_distance,
    frechet_distance_between,
    gaussian_statistics,
    sentence_bleu,
    word_errors,
)


def test_word_errors_by_hand():
    # "a b c d" -> "a x c": b->x is a substitution, d is deleted
    c = word_errors("a b c d", "a x c")
    assert (c.substitutions, c.deletions, c.insertions, c.reference_words) == (1, 1, 0, 4)
    assert c.wer == 0.5
    # an insertion on top: 3 errors over 2 words
    c = word_errors("hello world", "hello big wide world")
    assert (c.insertions, c.errors) == (2, 2) and c.wer == 1.0
    # an empty hypothesis is all deletions
    assert word_errors("one two three", "").deletions == 3


def test_corpus_wer_is_total_errors_over_total_words_and_matches_jiwer():
    refs = ["the cat sat on the mat", "hello world", "a b c d e f g h i j"]
    hyps = ["the cat sat on mat", "hello there world", "a b c d e f g h i j"]
    counts = [word_errors(r, h) for r, h in zip(refs, hyps)]
    # by hand: 1 deletion / 6 words, 1 insertion / 2 words, 0 / 10 -> 2 / 18
    assert corpus_wer(counts) == pytest.approx(2 / 18)
    assert corpus_wer(counts) == pytest.approx(jiwer.wer(refs, hyps))
    # not the mean of sentence WERs
    assert corpus_wer(counts) != pytest.approx(np.mean([c.wer for c in counts]))
    assert sum(counts, WordErrorCounts()).reference_words == 18


def test_empty_reference_is_refused():
    with pytest.raises(ValueError, match="empty reference"):
        word_errors("", "something")
    with pytest.raises(ValueError, match="undefined"):
        corpus_wer([])


def test_bleu_matches_sacrebleu_and_hand_values():
    hyps = ["the cat is on the mat", "there is a dog in the garden", "it rains"]
    refs = ["the cat sat on the mat", "there is a dog in the garden", "it is raining today"]
    assert corpus_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    # one 4-word hypothesis against 5 reference words, by hand with sacrebleu's "exp" smoothing (each n-gram
    # order with no match gets 1 / (2^k * total), k counting the zero orders so far):
    # p1 = 3/4, p2 = 1/3, p3 = 0/2 -> 1/(2*2), p4 = 0/1 -> 1/(4*1); brevity penalty exp(1 - 5/4)
    bleu = sentence_bleu("a b x d", "a b c d e")
    by_hand = 100 * math.exp(1 - 5 / 4) * math.exp((math.log(3 / 4) + math.log(1 / 3) + math.log(1 / 4) + math.log(1 / 4)) / 4)
    assert bleu == pytest.approx(by_hand, rel=1e-6)
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_bleu(["a", "b"], ["a"])


def test_comet_without_local_checkpoint_is_not_computed(tmp_path):
    result = comet_score(["Hallo"], ["Hello"], ["Hello"], None)
    assert isinstance(result, NotComputed) and "no local COMET checkpoint" in result.reason
    missing = comet_score(["Hallo"], ["Hello"], ["Hello"], str(tmp_path / "model.ckpt"))
    assert isinstance(missing, NotComputed) and "does not exist" in missing.reason


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + s1 + s2 - 2 sqrt(s1 s2)
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 4 + 9 - 2 * 6)
    # diagonal covariances: sum over dimensions of the 1-D formula
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 3.0]), np.array([4.0, 2.0, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected)


def test_frechet_distance_between_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(loc=[2.0, 0.0, 0.0], scale=[1.0, 1.0, 3.0], size=(4000, 3))
    mu_a, cov_a = gaussian_statistics(a)
    assert np.allclose(mu_a, a.mean(0)) and np.allclose(cov_a, np.cov(a.T))
    assert frechet_distance_between(a, a) == pytest.approx(0.0, abs=1e-6)
    # the population value is 2^2 + (1 + 9 - 2*3) = 8; the sample estimate is close
    assert frechet_distance_between(a, b) == pytest.approx(8.0, abs=0.4)
    # symmetric
    assert frechet_distance_between(a, b) == pytest.approx(frechet_distance_between(b, a), rel=1e-6)


def test_frechet_distance_safeguards():
    rng = np.random.default_rng(1)
    few = rng.normal(size=(5, 16))  # fewer samples than dimensions: singular covariances
    other = rng.normal(size=(5, 16)) + 1.0
    value = frechet_distance_between(few, other)
    assert math.isfinite(value) and value > 0
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        gaussian_statistics(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_cosine_similarity():
    assert cosine_similarity([1, 0], [1, 0]) == pytest.approx(1.0)
    assert cosine_similarity([1, 0], [0, 2]) == pytest.approx(0.0)
    assert cosine_similarity([1, 1], [-2, -2]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="zero vector"):
        cosine_similarity([0, 0], [1, 1])
