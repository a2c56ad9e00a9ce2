import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score, precision_score

from entrep.metrics import classification_metrics, f1_macro, retrieval_metrics


def test_retrieval_hand_computed():
    rankings = [["a", "b", "c"], ["x", "y", "z"], ["p", "q", "r"], ["m", "n", "o"]]
    relevant = [{"a"}, {"z", "y"}, {"nope"}, {"o"}]
    r = retrieval_metrics(rankings, relevant, ks=(1, 2, 3))
    assert r["recall@1"] == 0.25          # only query 0 at rank 1
    assert r["recall@2"] == 0.5           # + query 1 (y at rank 2)
    assert r["recall@3"] == 0.75          # + query 3 (o at rank 3)
    assert r["mrr"] == pytest.approx((1 + 1 / 2 + 0 + 1 / 3) / 4)
    assert r["n_queries"] == 4


def test_retrieval_per_group_weighs_each_group_once():
    """t2i per caption: caption A has three carriers (its three pair queries find 1 of them at rank
    1), caption B one (found at rank 1). Per pair 2/4; per caption (1/3 + 1) / 2."""
    ranking = ["a1", "a2", "a3", "b"]
    rankings = [ranking, ranking, ranking, ["b", "a1"]]
    relevant = [{"a1"}, {"a2"}, {"a3"}, {"b"}]
    pairs = retrieval_metrics(rankings, relevant, ks=(1,))
    per = retrieval_metrics(rankings, relevant, ks=(1,), groups=["A", "A", "A", "B"])
    assert pairs["recall@1"] == 0.5 and "n_groups" not in pairs
    assert per["recall@1"] == pytest.approx((1 / 3 + 1) / 2) and per["n_groups"] == 2 and per["n_queries"] == 4
    assert per["mrr"] == pytest.approx(((1 + 1 / 2 + 1 / 3) / 3 + 1) / 2)
    ones = retrieval_metrics(rankings, relevant, ks=(1,), groups=[0, 1, 2, 3])  # a group per query: per pair
    assert ones["recall@1"] == pytest.approx(pairs["recall@1"]) and ones["mrr"] == pytest.approx(pairs["mrr"])
    with pytest.raises(ValueError, match="group keys"):
        retrieval_metrics(rankings, relevant, groups=["A"])


def test_retrieval_rejects_queries_without_relevant_items():
    with pytest.raises(ValueError, match="no relevant item"):
        retrieval_metrics([["a"]], [set()])


def test_classification_hand_case():
    m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], ["a", "b"])
    assert m["accuracy"] == 0.75
    # class a: P=1, R=.5, F1=2/3; class b: P=2/3, R=1, F1=.8
    assert m["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["precision_macro"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["confusion"] == [[1, 1], [0, 2]]
    assert m["per_class"]["b"]["support"] == 2


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 7).flatmap(lambda k: st.tuples(st.just(k), st.lists(st.tuples(st.integers(0, k - 1),
                                                                                      st.integers(-1, k - 1)),
                                                                            min_size=1, max_size=40))))
def test_the_grids_f1_macro_is_the_reports(case):
    """What tuning and blending maximise is exactly the report's f1_macro (absent classes, a -1 prediction)."""
    k, pairs = case
    y, p = [a for a, _ in pairs], [b for _, b in pairs]
    assert f1_macro(y, p, k) == classification_metrics(y, p, [str(i) for i in range(k)])["f1_macro"]


def test_classification_matches_sklearn_with_absent_classes():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 6, 200), rng.integers(0, 7, 200)  # class 6 never true
    m = classification_metrics(y, p, [str(i) for i in range(7)])
    kw = dict(labels=list(range(7)), zero_division=0)
    assert m["f1_macro"] == pytest.approx(f1_score(y, p, average="macro", **kw))
    assert m["f1_weighted"] == pytest.approx(f1_score(y, p, average="weighted", **kw))
    assert m["precision_macro"] == pytest.approx(precision_score(y, p, average="macro", **kw))
