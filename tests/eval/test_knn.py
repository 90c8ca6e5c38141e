"""Weighted kNN: parity with scikit-learn's KNeighborsClassifier on real digits, and the multi-setting pass."""

import numpy as np
import pytest
import torch
from eval_fixtures import _one_thread  # noqa: F401
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier

from mmssl.eval.knn import knn_accuracy, knn_scores, knn_scores_multi, topk_accuracy


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    # a fixed random projection: continuous features (no distance ties) that are not the pixels themselves
    proj = np.random.default_rng(0).normal(size=(64, 32))
    x = (d.data @ proj).astype(np.float32)
    return train_test_split(x, d.target, test_size=0.3, stratify=d.target, random_state=0)


@pytest.mark.parametrize("k, t", [(20, 0.07), (200, 0.1), (1, 0.1)])
def test_predictions_match_sklearn_weighted_knn(digits, k, t):
    xtr, xte, ytr, yte = digits
    # sklearn's cosine distance is 1 - cos, so weight exp(cos / T) = exp((1 - d) / T)
    oracle = KNeighborsClassifier(
        k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / t)
    )
    expected = oracle.fit(xtr, ytr).predict(xte)
    scores = knn_scores(torch.tensor(xtr), torch.tensor(ytr), torch.tensor(xte), k, t, num_classes=10)
    ours = scores.argmax(1).numpy()
    assert (ours == expected).mean() == 1.0
    acc = knn_accuracy(torch.tensor(xtr), torch.tensor(ytr), torch.tensor(xte), torch.tensor(yte), [(k, t)])
    assert acc[0]["top1"] == pytest.approx(100 * (expected == yte).mean())
    assert acc[0]["top1"] > 80  # digits are easy; a broken similarity would sit near 10%


def test_several_settings_in_one_pass_equal_separate_runs(digits):
    xtr, xte, ytr, _ = digits
    args = (torch.tensor(xtr), torch.tensor(ytr), torch.tensor(xte))
    multi = knn_scores_multi(*args, [(20, 0.07), (200, 0.1)], num_classes=10, chunk_size=97)
    for (k, t), scores in zip([(20, 0.07), (200, 0.1)], multi, strict=True):
        torch.testing.assert_close(scores, knn_scores(*args, k, t, num_classes=10))


def test_k_larger_than_the_bank_uses_every_sample():
    bank = torch.eye(3)
    scores = knn_scores(
        bank, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.1, 0.0]]), k=50, temperature=1.0, num_classes=2
    )
    assert scores.shape == (1, 2) and scores[0, 0] > 0 and scores[0, 1] > 0


def test_topk_accuracy_counts_hits():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(scores, torch.tensor([1, 1, 0]), ks=(1, 2))
    assert acc["top1"] == pytest.approx(100 / 3) and acc["top2"] == pytest.approx(200 / 3)


def test_wu_et_al_setting_is_lemniscates_k200_at_the_nce_temperature(digits):
    """The default 'Wu et al.' setting scores as zhirongw/lemniscate.pytorch test.py ``kNN`` does when main.py
    calls it: K=200 neighbours weighted exp(sim / sigma) with sigma = ``--nce-t`` (default 0.07)."""
    from mmssl.eval.knn import SETTINGS

    xtr, xte, ytr, _ = digits
    bank = torch.nn.functional.normalize(torch.tensor(xtr), dim=1)
    queries = torch.nn.functional.normalize(torch.tensor(xte), dim=1)
    # lemniscate's kNN, step by step: topk over the memory, one-hot votes weighted by exp(sim / sigma)
    K, sigma, C = 200, 0.07, 10
    yd, yi = (queries @ bank.T).topk(K, dim=1, largest=True, sorted=True)
    retrieval = torch.tensor(ytr)[yi]  # (Q, K)
    one_hot = torch.zeros(len(queries) * K, C).scatter_(1, retrieval.view(-1, 1), 1)
    probs = (one_hot.view(len(queries), K, C) * (yd / sigma).exp().view(len(queries), K, 1)).sum(1)
    ours = dict(zip(SETTINGS, knn_scores_multi(torch.tensor(xtr), torch.tensor(ytr), torch.tensor(xte),
                                               list(SETTINGS), num_classes=C), strict=True))  # fmt: skip
    wu = [s for s in SETTINGS if s[0] == K]
    assert wu, f"no k={K} setting in {SETTINGS}"
    torch.testing.assert_close(ours[wu[0]], probs, rtol=1e-4, atol=0)
