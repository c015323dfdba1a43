"""Every metric equals scikit-learn's on random multi-class, binary (one sigmoid unit) and
regression data, and small cases worked out by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from netbuild import metrics

N, C = 300, 5


@pytest.fixture(scope="module")
def skm():
    """scikit-learn's metrics (a dev dependency); these comparisons skip without it."""
    return pytest.importorskip("sklearn.metrics")


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def multiclass(seed: int, absent: bool = False):
    """Class ids, their one-hot rows and softmax scores. ``absent``: class 4 is neither a target
    nor ever predicted, class 3 is predicted but never a target."""
    rng = np.random.default_rng(seed)
    scores = softmax(rng.normal(size=(N, C)) * 2.0).astype(np.float32)
    ids = rng.integers(0, C, size=N)
    if absent:
        ids = rng.integers(0, 3, size=N)
        scores[:, 4] = 0.0
    return ids, np.eye(C, dtype=np.float32)[ids], scores


def binary(seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=N).astype(np.float32)
    p = (1.0 / (1.0 + np.exp(-(rng.normal(size=N) + 0.8 * (y - 0.5))))).astype(np.float32)
    return y, p[:, None]


def test_every_higher_is_better_metric_is_registered():
    assert metrics.HIGHER_IS_BETTER <= set(metrics.REGISTRY)
    assert {"mse", "mae"}.isdisjoint(metrics.HIGHER_IS_BETTER)


@pytest.mark.parametrize("seed,absent", [(0, False), (1, False), (2, True)])
@pytest.mark.parametrize("one_hot", [False, True], ids=["ids", "one_hot"])
def test_multiclass_matches_sklearn(skm, seed, absent, one_hot):
    ids, rows, scores = multiclass(seed, absent)
    y = rows if one_hot else ids
    pred = scores.argmax(axis=1)
    labels = list(range(C))
    assert metrics.accuracy(y, scores) == pytest.approx(skm.accuracy_score(ids, pred))
    for k in (1, 2, 3, 4):
        assert metrics.top_k_accuracy(y, scores, k=k) == pytest.approx(
            skm.top_k_accuracy_score(ids, scores, k=k, labels=labels)), k
    assert metrics.top_k_accuracy(y, scores) == 1.0  # k = 5 = C
    for name, reference in [("precision", skm.precision_score), ("recall", skm.recall_score),
                            ("f1", skm.f1_score)]:
        expected = reference(ids, pred, average="macro", zero_division=0)
        assert metrics.REGISTRY[name](y, scores) == pytest.approx(expected, rel=1e-12), name
    np.testing.assert_array_equal(metrics.confusion_matrix(y, scores),
                                  skm.confusion_matrix(ids, pred, labels=labels))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("column", [False, True], ids=["flat", "column"])
def test_binary_sigmoid_matches_sklearn(skm, seed, column):
    y, p = binary(seed)
    target = y[:, None] if column else y
    pred = (p[:, 0] > 0.5).astype(int)
    assert metrics.accuracy(target, p) == pytest.approx(skm.accuracy_score(y, pred))
    assert metrics.top_k_accuracy(target, p, k=1) == pytest.approx(skm.top_k_accuracy_score(y, p[:, 0], k=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that k >= n_classes always hits
        assert metrics.top_k_accuracy(target, p, k=2) == skm.top_k_accuracy_score(y, p[:, 0], k=2) == 1.0
    for name, reference in [("precision", skm.precision_score), ("recall", skm.recall_score),
                            ("f1", skm.f1_score)]:
        expected = reference(y, pred, average="macro", labels=[0, 1], zero_division=0)
        assert metrics.REGISTRY[name](target, p) == pytest.approx(expected, rel=1e-12), name
    np.testing.assert_array_equal(metrics.confusion_matrix(target, p),
                                  skm.confusion_matrix(y, pred, labels=[0, 1]))


@pytest.mark.parametrize("shape", [(N,), (N, 1), (N, 3)])
def test_regression_matches_sklearn(skm, shape):
    rng = np.random.default_rng(3)
    y = rng.normal(size=shape)
    p = (y.reshape(N, -1) + rng.normal(scale=0.7, size=(N, int(np.prod(shape[1:]))))).astype(np.float32)
    assert metrics.mse(y, p) == pytest.approx(skm.mean_squared_error(y.reshape(p.shape), p), rel=1e-6)
    assert metrics.mae(y, p) == pytest.approx(skm.mean_absolute_error(y.reshape(p.shape), p), rel=1e-6)
    assert metrics.r2(y, p) == pytest.approx(skm.r2_score(y.reshape(p.shape), p), rel=1e-9)


def test_r2_of_constant_columns_matches_sklearn(skm):
    y = np.array([[1.0, 2.0, 5.0], [1.0, 2.0, 6.0], [1.0, 2.0, 8.0]])
    p = np.array([[1.0, 2.5, 5.0], [1.0, 2.0, 7.0], [1.0, 2.0, 8.0]])
    # columns: constant and exact (1), constant and missed (0), 1 - 1 / (14/3) = 11/14
    assert metrics.r2(y, p) == pytest.approx((1.0 + 0.0 + 11 / 14) / 3)
    assert metrics.r2(y, p) == pytest.approx(skm.r2_score(y, p))


def test_sequence_outputs_count_every_position(skm):
    ids, _, scores = multiclass(4)
    y, s = ids.reshape(60, 5), scores.reshape(60, 5, C)
    pred = scores.argmax(axis=1)
    assert metrics.f1(y, s) == pytest.approx(skm.f1_score(ids, pred, average="macro"))
    assert metrics.top_k_accuracy(y, s, k=2) == pytest.approx(
        skm.top_k_accuracy_score(ids, scores, k=2, labels=list(range(C))))


def test_small_multiclass_case_by_hand():
    # true 0 0 1 2 2, predicted 0 1 1 1 2: tp 1 1 1, fp 0 2 0, fn 1 0 1
    y = np.array([0, 0, 1, 2, 2])
    scores = np.eye(3)[[0, 1, 1, 1, 2]]
    np.testing.assert_array_equal(metrics.confusion_matrix(y, scores),
                                  [[1, 1, 0], [0, 1, 0], [0, 1, 1]])
    assert metrics.precision(y, scores) == pytest.approx((1 + 1 / 3 + 1) / 3)  # 7/9
    assert metrics.recall(y, scores) == pytest.approx((0.5 + 1 + 0.5) / 3)  # 2/3
    assert metrics.f1(y, scores) == pytest.approx((2 / 3 + 2 / 4 + 2 / 3) / 3)  # 11/18
    assert metrics.accuracy(y, scores) == pytest.approx(0.6)


def test_small_top_k_case_by_hand():
    scores = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]])
    y = np.array([2, 1, 0, 1])  # true class ranks 2, 3, 3 and tied first
    assert [metrics.top_k_accuracy(y, scores, k=k) for k in (1, 2, 3, 5)] == [0.25, 0.5, 1.0, 1.0]


def test_single_unit_always_has_two_classes():
    # every target and prediction 0: class 1 scores 0 in each (zero division), class 0 scores 1
    y, p = np.zeros(3), np.array([[0.1], [0.2], [0.3]])
    assert metrics.precision(y, p) == metrics.recall(y, p) == metrics.f1(y, p) == 0.5
    np.testing.assert_array_equal(metrics.confusion_matrix(y, p), [[3, 0], [0, 0]])


def test_r2_by_hand():
    assert metrics.r2(np.array([1.0, 2.0, 3.0]), np.array([[1.0], [2.0], [4.0]])) == pytest.approx(0.5)


def test_entries_are_names_or_mappings():
    y = np.array([2, 1, 0, 1])
    scores = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]])
    entries = [{"type": "top_k_accuracy", "k": 2}, "accuracy", {"type": "f1"}]
    assert [metrics.metric_name(e) for e in entries] == ["top_k_accuracy", "accuracy", "f1"]
    out = metrics.compute(entries, y, scores)
    assert list(out) == ["top_k_accuracy", "accuracy", "f1"]
    assert out["top_k_accuracy"] == 0.5
    assert metrics.compute(["top_k_accuracy"], y, scores)["top_k_accuracy"] == 1.0  # k = 5
    with pytest.raises(ValueError, match="'top_k_accuracy' is listed twice"):
        metrics.compute(["top_k_accuracy", {"type": "top_k_accuracy", "k": 1}], y, scores)


def test_unknown_metric_suggests_the_closest():
    with pytest.raises(KeyError, match="unknown metric 'recal'.*did you mean 'recall'"):
        metrics.get({"type": "recal"})


def test_class_ids_out_of_range_are_named():
    with pytest.raises(ValueError, match=r"0\.\.2 .* received 0\.\.3"):
        metrics.confusion_matrix(np.array([0, 3]), np.eye(3)[[0, 1]])
