"""mmssl/linear.py: the oneDNN fp32 linear against torch's ``F.linear`` (values and every gradient), the paths
that must stay ``F.linear`` (autocast, bf16, the ``blas`` mode), the mode switch, and which modules change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmssl.linear as L
from mmssl import config as C
from mmssl.factory import build_objective
from mmssl.linear import Linear, use_fast_linear


@pytest.fixture
def onednn(monkeypatch):
    if not torch.backends.mkldnn.is_available():  # every x86 / arm64 wheel of torch has it
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setenv("MMSSL_CPU_LINEAR", "onednn")


def refuse_onednn(monkeypatch):
    def refuse(*args):
        raise AssertionError("the oneDNN path ran")

    monkeypatch.setattr(L._OneDNNLinear, "apply", refuse)


@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24), (2, 3, 4, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_f_linear_with_gradients(onednn, shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    grad = torch.randn(*shape[:-1], 40)
    ref = F.linear(x, layer.weight, layer.bias)
    ref_grads = torch.autograd.grad(ref, [x, *layer.parameters()], grad)
    use_fast_linear(layer)
    out = layer(x)
    assert out.grad_fn is not None and "OneDNN" in type(out.grad_fn).__name__  # the oneDNN path ran
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(torch.autograd.grad(out, [x, *layer.parameters()], grad), ref_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_and_partial_gradients(onednn):
    torch.manual_seed(1)
    layer = Linear(16, 8)
    layer.weight.requires_grad_(False)  # a frozen weight: only x and the bias get gradients
    x = torch.randn(16, 6, requires_grad=True)
    out = layer(x.t())  # (6, 16) transposed view
    gx, gb = torch.autograd.grad(out.square().sum(), [x, layer.bias])
    ref = F.linear(x.t(), layer.weight, layer.bias)
    rx, rb = torch.autograd.grad(ref.square().sum(), [x, layer.bias])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-5)


def test_autocast_bf16_and_the_blas_mode_keep_f_linear(onednn, monkeypatch):
    layer = Linear(8, 4)
    x = torch.randn(3, 8)
    refuse_onednn(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast's bf16 product (already oneDNN in torch)
    assert layer.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16
    monkeypatch.setenv("MMSSL_CPU_LINEAR", "blas")
    assert torch.equal(layer.float()(x), F.linear(x, layer.weight, layer.bias))


def test_mode_is_checked_and_auto_measures(monkeypatch):
    monkeypatch.setenv("MMSSL_CPU_LINEAR", "mkl")
    with pytest.raises(ValueError, match="MMSSL_CPU_LINEAR='mkl'"):
        Linear(4, 4)(torch.randn(2, 4))
    monkeypatch.setenv("MMSSL_CPU_LINEAR", "auto")
    assert L.onednn_speedup() > 0  # torch's CPU build has oneDNN; the figure is this machine's
    assert L.use_onednn() == (L.onednn_speedup() >= L.MIN_SPEEDUP)
    assert ("onednn" if L.use_onednn() else "blas") in L.describe()


def test_only_plain_linear_layers_change_and_the_state_dict_stays():
    class Special(nn.Linear):  # a subclass computes something else: left alone
        pass

    model = nn.Sequential(nn.Linear(4, 4), Special(4, 4), nn.Sequential(nn.Linear(4, 2)), nn.ReLU())
    keys = list(model.state_dict())
    assert use_fast_linear(model) == 2
    assert [type(m).__name__ for m in model.modules() if isinstance(m, nn.Linear)] == [
        "Linear",
        "Special",
        "Linear",
    ]
    assert type(model[0]) is Linear and list(model.state_dict()) == keys


def test_a_built_objective_trains_the_same_on_either_library(monkeypatch):
    """build_objective makes every plain linear layer a ``Linear``; one MAE step's loss and gradients on
    oneDNN match the BLAS's to fp32 rounding."""
    cfg = C.load("mae_demo", ["backbone.depth=2", "mae.decoder_depth=1"])
    images = torch.randn(2, 3, cfg.backbone.img_size, cfg.backbone.img_size)
    noise = torch.rand(2, (cfg.backbone.img_size // cfg.backbone.patch_size) ** 2)
    runs = []
    for library in ("blas", "onednn"):
        monkeypatch.setenv("MMSSL_CPU_LINEAR", library)
        torch.manual_seed(0)
        model = build_objective(cfg)
        assert not any(type(m) is nn.Linear for m in model.modules())
        loss = model({"image": images}, noise=noise)["loss"]
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_flop_counter_counts_the_onednn_product_and_compile_keeps_f_linear(onednn):
    from torch.utils.flop_counter import FlopCounterMode

    layer = Linear(64, 192)
    x = torch.randn(8, 5, 64, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * 40 * 64 * 192  # forward, input and weight gradients
    compiled = torch.compile(layer, backend="eager")  # dynamo traces the F.linear branch
    torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
