"""Online evaluation callbacks: the probe learns from detached features, keeps its state across a resume, stays
identical on every DDP rank, and the kNN monitor agrees with the offline kNN."""

from __future__ import annotations

import contextlib
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from eval_fixtures import _one_thread  # noqa: F401

from mmssl.backbones import create_backbone
from mmssl.data.module import resolve_shards
from mmssl.data.shards import SampleDecoder, eval_pipeline
from mmssl.data.transforms import eval_view
from mmssl.eval.features import Features, extract, labelled_loader
from mmssl.eval.knn import knn_accuracy
from mmssl.eval.online import KNNMonitor, OnlineLinearProbe


def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    return create_backbone(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2
    )


def fake_module(backbone, reduce=None, world_size=1):
    """What the callbacks touch of a LightningModule and its Trainer, nothing more."""
    logged = {}
    trainer = SimpleNamespace(
        world_size=world_size,
        current_epoch=0,
        strategy=SimpleNamespace(reduce=reduce),
        precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext),
    )
    module = SimpleNamespace(
        objective=SimpleNamespace(backbone=backbone), device=torch.device("cpu"), trainer=trainer,
        log=lambda name, value, **kw: logged.setdefault(name, []).append(float(value)),
    )  # fmt: skip
    return trainer, module, logged


@pytest.fixture(scope="module")
def digits_batches(demo_root):
    urls = resolve_shards("demo:digits/train", "test", demo_root)
    pipeline = eval_pipeline(
        urls, eval_view(32, crop_pct=1.0), 64, rank=0, world_size=1, decoder=SampleDecoder()
    )
    return list(pipeline)


def test_online_probe_learns_from_detached_features(digits_batches):
    backbone = tiny_vit()
    trainer, module, logged = fake_module(backbone)
    probe = OnlineLinearProbe(num_classes=10, lr=1e-2)
    probe.on_fit_start(trainer, module)
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    for _ in range(3):
        for i, batch in enumerate(digits_batches[:-1]):
            probe.on_train_batch_end(trainer, module, None, batch, i)
    # the encoder is untouched (no gradient reaches it) and stays in training mode
    assert all(p.grad is None and torch.equal(p, before[n]) for n, p in backbone.named_parameters())
    assert backbone.training
    acc = logged["train/online_top1"]
    assert sum(acc[:5]) / 5 < 40 < sum(acc[-5:]) / 5  # chance is 10%; each value is measured before its step


def test_online_probe_state_round_trips(digits_batches):
    trainer, module, _ = fake_module(tiny_vit())
    probe = OnlineLinearProbe(num_classes=10)
    probe.on_fit_start(trainer, module)
    for i, batch in enumerate(digits_batches[:3]):
        probe.on_train_batch_end(trainer, module, None, batch, i)
    state = probe.state_dict()
    resumed = OnlineLinearProbe(num_classes=10)
    resumed.load_state_dict(state)  # Lightning may restore callbacks before on_fit_start builds the head
    resumed.on_fit_start(trainer, module)
    for a, b in zip(probe.head.state_dict().values(), resumed.head.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 3


def test_unlabelled_batches_name_the_problem():
    trainer, module, _ = fake_module(tiny_vit())
    probe = OnlineLinearProbe(num_classes=10)
    probe.on_fit_start(trainer, module)
    with pytest.raises(ValueError, match="eval.online_probe needs labelled training data"):
        probe.on_train_batch_end(trainer, module, None, {"image": torch.randn(2, 3, 32, 32)}, 0)


def _rank(rank: int, port: int, batches, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)

    def reduce(t, reduce_op="mean"):
        dist.all_reduce(t)
        return t / 2

    trainer, module, _ = fake_module(tiny_vit(), reduce=reduce, world_size=2)
    probe = OnlineLinearProbe(num_classes=10, lr=1e-2)
    probe.on_fit_start(trainer, module)
    for i, batch in enumerate(batches[rank::2][:4]):  # every rank sees different data
        probe.on_train_batch_end(trainer, module, None, batch, i)
    out[rank] = torch.cat([p.detach().flatten() for p in probe.head.parameters()])
    dist.destroy_process_group()


@pytest.mark.slow  # spawns two interpreters
def test_ddp_ranks_keep_identical_heads(digits_batches):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    # fork: the children inherit the imports instead of re-importing torch, timm and mmssl (seconds each)
    mp.start_processes(_rank, args=(port, digits_batches[:8], out), nprocs=2, join=True, start_method="fork")
    assert torch.equal(out[0], out[1])
    # and they really were trained on different data: a rank alone ends elsewhere
    trainer, module, _ = fake_module(tiny_vit())
    alone = OnlineLinearProbe(num_classes=10, lr=1e-2)
    alone.on_fit_start(trainer, module)
    for i, batch in enumerate(digits_batches[:8][0::2][:4]):
        alone.on_train_batch_end(trainer, module, None, batch, i)
    assert not torch.allclose(torch.cat([p.detach().flatten() for p in alone.head.parameters()]), out[0])


def test_knn_monitor_agrees_with_offline_knn(demo_root):
    backbone = tiny_vit()
    urls = {s: resolve_shards(f"demo:digits/{s}", "test", demo_root) for s in ("train", "val")}
    view = eval_view(32, crop_pct=1.0)
    monitor = KNNMonitor(
        urls["train"], urls["val"], view, every_n_epochs=2, k=20, temperature=0.07, batch_size=128
    )
    trainer, module, logged = fake_module(backbone)
    monitor.on_train_epoch_end(trainer, module)  # epoch 0 of every 2: nothing
    assert "val/knn_top1" not in logged
    trainer.current_epoch = 1
    monitor.on_train_epoch_end(trainer, module)

    def feats(split) -> Features:
        spec = "::".join(urls[split])
        loader, _ = labelled_loader(spec, view, batch_size=128, num_workers=0)
        return extract(backbone, loader)

    train, val = feats("train"), feats("val")
    (expected,) = knn_accuracy(
        train.features["layer0"], train.labels, val.features["layer0"], val.labels, [(20, 0.07)]
    )
    assert logged["val/knn_top1"] == [pytest.approx(expected["top1"])]
    assert expected["top1"] > 30  # even a random tiny ViT sorts digits well above chance


def test_eval_config_validation():
    from mmssl import config as C

    with pytest.raises(C.ConfigError, match="eval.num_classes"):
        C.load("mae_demo", ["eval.online_probe=true"])
    with pytest.raises(C.ConfigError, match="eval.knn_train_shards"):
        C.load("mae_demo", ["eval.knn_every_n_epochs=1"])
