"""Metrics against hand-computed values and their reference definitions (scikit-learn's macro
F1, seqeval / conlleval entities, the official SQuAD v2.0 script)."""

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from functional_llm import metrics
from functional_llm.data import QAExample


def test_accuracy_and_macro_f1_by_hand():
    gold = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    assert metrics.accuracy(pred, gold) == pytest.approx(4 / 6)
    # class 0: P 1/2 R 1/2 F 1/2; class 1: P 2/3 R 1 F 4/5; class 2: P 1 R 1/2 F 2/3
    assert metrics.macro_f1(pred, gold) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # A class only ever predicted counts with F1 0 (scikit-learn's labels = union).
    assert metrics.macro_f1([3, 0], [0, 0]) == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(ValueError, match="2 predictions for 3"):
        metrics.accuracy([0, 1], [0, 1, 1])


@given(labels=st.lists(st.integers(0, 3), min_size=1, max_size=30))
def test_perfect_predictions_score_one(labels):
    assert metrics.accuracy(labels, labels) == 1.0
    assert metrics.macro_f1(labels, labels) == 1.0


def test_entities_follow_conlleval():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-ORG", "S-MISC", "B-X", "E-X"]
    assert metrics.entities(tags) == [
        ("PER", 0, 1),
        ("LOC", 3, 4),  # an I- after O starts an entity
        ("LOC", 5, 5),
        ("ORG", 6, 6),  # a type change starts one too
        ("MISC", 7, 7),
        ("X", 8, 9),
    ]


_BIOES = ["O", "B-A", "I-A", "E-A", "S-A", "B-B", "I-B", "E-B", "S-B", "B", "I", "E", "S"]


@given(tags=st.lists(st.sampled_from(_BIOES), max_size=12))
def test_entities_equal_seqevals_on_bio_and_bioes(tags):
    from seqeval.metrics.sequence_labeling import get_entities

    assert sorted(metrics.entities(tags)) == sorted(get_entities(tags))


@pytest.mark.parametrize("tag", ["X", "X-PER", "."])
def test_tags_outside_bio_and_bioes_are_rejected(tag):
    with pytest.raises(ValueError, match=rf"tag '{re.escape(tag)}' at position 1 is not O or B-"):
        metrics.entities(["B-PER", tag, "O"])


def test_entity_scores_match_seqevals_readme_example():
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert metrics.entity_scores(pred, gold) == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    )
    assert metrics.entity_scores([["O", "O"]], [["O", "O"]])["f1"] == 0.0


def test_squad_normalisation_and_f1_by_hand():
    assert metrics.normalize_answer("The  Cat's, hat!") == "cats hat"
    assert metrics.exact_match("the Normans", "Normans.") == 1.0
    # "cat sat" vs "cat sat on": P 1, R 2/3, F1 0.8
    assert metrics.squad_f1("the cat sat", "a cat sat on") == pytest.approx(0.8)
    assert metrics.squad_f1("", "") == 1.0 and metrics.squad_f1("x", "") == 0.0


def test_squad_scores_take_the_best_gold_and_split_has_and_no_answer():
    examples = [
        QAExample("a", "?", "c", ("France", "in France"), (0, 0)),
        QAExample("b", "?", "c", ("10th century",), (0,)),
        QAExample("c", "?", "c", (), (), impossible=True),
        QAExample("d", "?", "c", (), (), impossible=True),
    ]
    predictions = {"a": "in France", "b": "the 10th", "c": "", "d": "Rollo"}
    got = metrics.squad_scores(examples, predictions)
    assert got["exact"] == pytest.approx(100 * 2 / 4)
    assert got["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0) / 4)
    assert got["HasAns_total"] == 2 and got["NoAns_total"] == 2
    assert got["HasAns_exact"] == 50.0 and got["NoAns_exact"] == 50.0
    with pytest.raises(KeyError, match="'b'"):
        metrics.squad_scores(examples, {"a": ""})


def test_perplexity_is_exp_of_mean_nll():
    assert metrics.perplexity(math.log(65)) == pytest.approx(65)
