"""Linear probe: parity with scikit-learn's logistic regression, MAE's LARS step, and the one-pass grid."""

import numpy as np
import pytest
import torch
from eval_fixtures import _one_thread  # noqa: F401
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from mmssl.eval.features import Features
from mmssl.eval.linear_probe import best, make_head, make_optimizer, train_probes


def split(x, y):
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    return (
        Features({"f": torch.tensor(xtr, dtype=torch.float32)}, torch.tensor(ytr)),
        Features({"f": torch.tensor(xte, dtype=torch.float32)}, torch.tensor(yte)),
    )


@pytest.fixture(scope="module")
def pixels():
    d = load_digits()
    return split(d.data, d.target)


def test_mae_protocol_matches_sklearn_logistic_regression():
    """A known feature set that is not linearly separable (8 PCA components of the digits), so the
    unregularised maximum-likelihood solution is unique: the MAE probe (BatchNorm without affine + Linear,
    LARS, warmup + cosine, no weight decay) must reach sklearn's optimum. Tolerances: training log-loss within
    3% above sklearn's minimum (and never meaningfully below it), val top-1 within 1.5 points, >= 97% of val
    predictions identical."""
    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=0.3, stratify=d.target, random_state=0)
    pca = PCA(8, random_state=0).fit(xtr)
    train, val = split(np.concatenate([pca.transform(xtr), pca.transform(xte)]), np.concatenate([ytr, yte]))
    ftr, fte = train.features["f"].numpy(), val.features["f"].numpy()
    scaler = StandardScaler().fit(ftr)  # what BatchNorm(affine=False) computes with its running statistics
    oracle = LogisticRegression(C=np.inf, max_iter=20_000, tol=1e-10).fit(scaler.transform(ftr), train.labels)
    oracle_loss = log_loss(train.labels, oracle.predict_proba(scaler.transform(ftr)))
    oracle_pred = oracle.predict(scaler.transform(fte))

    (r,) = train_probes(
        train, val, base_lrs=[10.0], batch_size=256, epochs=300, warmup_epochs=10, progress=False
    )
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(r.head(train.features["f"]), train.labels).item()
    assert oracle_loss - 1e-3 <= loss <= 1.03 * oracle_loss, (loss, oracle_loss)
    assert r.top1 == pytest.approx(100 * (oracle_pred == val.labels.numpy()).mean(), abs=1.5)
    with torch.no_grad():
        ours = r.head(val.features["f"]).argmax(1).numpy()
    assert (ours == oracle_pred).mean() >= 0.97


def mae_lars_step(p, grad, mu, lr, momentum=0.9, trust=0.001, weight_decay=0.0):
    """facebookresearch/mae util/lars.py, written out: ndim > 1 gets decay and the trust ratio."""
    if p.ndim > 1:
        grad = grad + weight_decay * p
        pn, gn = p.norm(), grad.norm()
        q = torch.where(
            pn > 0, torch.where(gn > 0, trust * pn / gn, torch.ones_like(pn)), torch.ones_like(pn)
        )
        grad = grad * q
    mu = momentum * mu + grad
    return p - lr * mu, mu


def test_lars_groups_equal_mae_lars():
    torch.manual_seed(0)
    head = make_head(16, 5, "trunc_normal", torch.Generator().manual_seed(0), batchnorm=False)[1]
    ref = {n: (p.detach().clone(), torch.zeros_like(p)) for n, p in head.named_parameters()}
    opt = make_optimizer([head], [2.0], "lars", momentum=0.9, weight_decay=0.0, nesterov=False)
    for _ in range(4):
        x, y = torch.randn(32, 16), torch.randint(0, 5, (32,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        grads = {n: p.grad.clone() for n, p in head.named_parameters()}
        opt.step()
        ref = {n: mae_lars_step(p, grads[n], mu, lr=2.0) for n, (p, mu) in ref.items()}
    for n, p in head.named_parameters():
        torch.testing.assert_close(p.detach(), ref[n][0], rtol=1e-5, atol=1e-7)
    # the bias moved (plain momentum SGD), the weight moved by about lr x 0.001 of its norm per step
    assert not torch.equal(ref["bias"][0], torch.zeros(5))


def test_a_grid_trains_each_head_as_if_alone(pixels):
    train, val = pixels
    kw = dict(batch_size=128, epochs=6, warmup_epochs=1, progress=False)
    grid = train_probes(train, val, base_lrs=[1.0, 10.0, 1e9], **kw)
    alone = [train_probes(train, val, base_lrs=[b], **kw)[0] for b in (1.0, 10.0)]
    for g, a in zip(grid[:2], alone, strict=True):
        assert g.top1 == a.top1 and g.train_loss == pytest.approx(a.train_loss, rel=1e-6)
        for pg, pa in zip(g.head.parameters(), a.head.parameters(), strict=True):
            torch.testing.assert_close(pg, pa)
    assert grid[2].diverged and not grid[0].diverged  # lr 1e9 blew up without touching the others
    assert best(grid) in grid[:2]


def test_a_grid_of_layers_and_lrs_is_bit_for_bit_the_heads_trained_alone(pixels):
    """The grid shares each layer's BatchNorm between its heads: every head, running statistics included,
    must still be exactly (torch.equal) the one a separate run trains, for LARS and for SGD."""
    train, val = pixels
    two = Features({"a": train.features["f"], "b": train.features["f"][:, 8:40]}, train.labels)
    two_val = Features({"a": val.features["f"], "b": val.features["f"][:, 8:40]}, val.labels)
    for kw in (dict(), dict(optimizer="sgd", nesterov=True, weight_decay=1e-4)):
        kw |= dict(batch_size=128, epochs=3, warmup_epochs=1, progress=False)
        grid = train_probes(two, two_val, base_lrs=[0.5, 4.0], **kw)
        for g in grid:
            alone = Features({g.layer: two.features[g.layer]}, two.labels)
            alone_val = Features({g.layer: two_val.features[g.layer]}, two_val.labels)
            (a,) = train_probes(alone, alone_val, base_lrs=[g.base_lr], **kw)
            assert (g.top1, g.top5, g.train_loss) == (a.top1, a.top5, a.train_loss)
            ours, theirs = g.head.state_dict(), a.head.state_dict()
            assert list(ours) == list(theirs) and "0.running_var" in ours
            for name in ours:
                assert torch.equal(ours[name], theirs[name]), (g.layer, g.base_lr, name)


def test_simclr_protocol_learns(pixels):
    train, val = pixels
    (r,) = train_probes(
        train, val, base_lrs=[0.1], optimizer="sgd", nesterov=True, batchnorm=False, head_init="zeros",
        batch_size=256, epochs=30, warmup_epochs=0, progress=False,
    )  # fmt: skip
    assert r.top1 > 90 and r.top5 > 98


def test_layers_and_lrs_form_a_grid(pixels):
    train, val = pixels
    two = Features({"a": train.features["f"], "b": train.features["f"][:, :16]}, train.labels)
    two_val = Features({"a": val.features["f"], "b": val.features["f"][:, :16]}, val.labels)
    results = train_probes(two, two_val, base_lrs=[1.0, 10.0], batch_size=256, epochs=3, progress=False)
    assert [(r.layer, r.base_lr) for r in results] == [("a", 1.0), ("a", 10.0), ("b", 1.0), ("b", 10.0)]
    assert results[0].head[1].in_features == 64 and results[2].head[1].in_features == 16


def test_heads_are_the_published_ones():
    mae = make_head(768, 1000, "trunc_normal", torch.Generator().manual_seed(0))
    bn, linear = mae
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert [n for n, _ in mae.named_parameters()] == ["1.weight", "1.bias"]  # BatchNorm has nothing to train
    w = linear.weight.detach()
    # MAE: timm's trunc_normal_(std=0.01), whose cut-offs are absolute (+-2), so in effect N(0, 0.01)
    assert w.std().item() == pytest.approx(0.01, rel=0.02) and w.abs().max() < 0.07
    assert torch.equal(linear.bias.detach(), torch.zeros(1000))
    simclr = make_head(64, 10, "zeros", torch.Generator(), batchnorm=False)
    assert isinstance(simclr[0], torch.nn.Identity) and not simclr[1].weight.any()


def test_a_function_of_the_epoch_trains_like_the_list_of_its_copies(pixels):
    train, val = pixels
    gen = torch.Generator().manual_seed(0)
    copies = [Features({"f": train.features["f"] + torch.randn(train.features["f"].shape, generator=gen)},
                       train.labels) for _ in range(3)]  # fmt: skip
    calls = []

    def epoch(e: int) -> Features:
        calls.append(e)
        return copies[e % 3]

    kw = dict(base_lrs=[1.0, 10.0], batch_size=128, epochs=5, warmup_epochs=1, progress=False)
    from_list, from_function = train_probes(copies, val, **kw), train_probes(epoch, val, **kw)
    assert calls == [0, 1, 2, 3, 4]  # once per epoch, in order (epoch 0's features are reused, not redrawn)
    for a, b in zip(from_list, from_function, strict=True):
        assert a.top1 == b.top1 and a.train_loss == b.train_loss and a.train_samples == len(train) == 1257
    shuffled = Features(train.features, train.labels.flip(0))
    with pytest.raises(ValueError, match="epoch 1: the training features list the samples in another order"):
        train_probes(lambda e: train if e == 0 else shuffled, val, **kw)
