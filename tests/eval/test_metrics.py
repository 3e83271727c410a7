"""Text metrics: normalisation and matching against hand-worked cases; BLEU and ROUGE against sacrebleu and
rouge-score called directly."""

import pytest
from references import require

from loraforge.eval.metrics import (
    Normalization,
    bleu,
    contains_match,
    exact_match,
    generation_scores,
    rouge,
)

ANSWERS = ["The cat sat on the mat.", "a dog barked loudly at night", "Paris is the capital", "", "blue sky today"]
REFERENCES = ["The cat sat on a mat.", "the dog barked at night", "Paris", "nothing", "a blue sky today"]


@pytest.mark.parametrize("options, text, expected", [
    (Normalization(), "  Hello,\n  World!  ", "Hello, World!"),
    (Normalization(case=True), "  Hello,\n  World!  ", "hello, world!"),
    (Normalization(case=True, punctuation=True), "  Hello,\n  World!  ", "hello world"),
    (Normalization(strip=False), "  Hi  there ", "  Hi  there "),
    (Normalization(strip=False, punctuation=True), " a.b ", " ab "),
])
def test_normalization(options, text, expected):
    assert options(text) == expected


def test_exact_and_contains_match_by_hand():
    answers = ["Paris.", " paris", "It is Paris!", "Rome", "PARIS"]
    references = ["Paris"] * 5
    assert exact_match(answers, references, Normalization()) == [False, False, False, False, False]
    assert exact_match(answers, references, Normalization(case=True)) == [False, True, False, False, True]
    assert exact_match(answers, references, Normalization(case=True, punctuation=True)) == [True, True, False,
                                                                                            False, True]
    assert contains_match(answers, references, Normalization()) == [True, False, True, False, False]
    assert contains_match(answers, references, Normalization(case=True)) == [True, True, True, False, True]
    assert contains_match(["anything"], [""], Normalization()) == [False]  # an empty reference matches nothing


def test_bleu_equals_sacrebleu_called_directly():
    sacrebleu = require("sacrebleu")
    expected = sacrebleu.corpus_bleu(ANSWERS, [REFERENCES]).score
    assert 0 < expected < 100
    assert bleu(ANSWERS, REFERENCES) == pytest.approx(expected, abs=1e-9)


def test_rouge_equals_rouge_score_called_directly():
    rouge_scorer = require("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per_pair = [scorer.score(r, a) for a, r in zip(ANSWERS, REFERENCES)]
    expected = {k: sum(s[k].fmeasure for s in per_pair) / len(per_pair) for k in ("rouge1", "rouge2", "rougeL")}
    assert 0 < expected["rouge2"] < expected["rouge1"] < 1
    assert rouge(ANSWERS, REFERENCES) == pytest.approx(expected, abs=1e-12)


def test_generation_scores_computes_only_what_is_asked():
    scores = generation_scores(["contains", "bleu"], ANSWERS, REFERENCES, Normalization(case=True))
    assert set(scores) == {"contains", "bleu"}
    assert scores["contains"] == pytest.approx(1 / 5)  # only "paris" is inside its answer
