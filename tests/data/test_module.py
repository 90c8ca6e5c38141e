"""ShardDataModule: epoch arithmetic, early config errors, demo specs, and Lightning's view of the loaders."""

import io
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from mmssl.data.module import ShardDataModule
from mmssl.data.shards import write_shards
from mmssl.data.transforms import eval_view, mae_view


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path):
    """48 train samples in shards of 20, 20, 8 and 10 val samples in shards of 4, 4, 2; cls = sample id."""
    write_shards(({"__key__": f"t{i}", "jpg": jpeg(i), "cls": i} for i in range(48)), tmp_path, "train", 20)
    write_shards(({"__key__": f"v{i}", "jpg": jpeg(i), "cls": i} for i in range(10)), tmp_path, "val", 4)
    return tmp_path


def module(d, val="", **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 0)
    return ShardDataModule(
        f"{d}/train-{{000000..000002}}.tar", val, train_view=mae_view(16), val_view=eval_view(16), **kw
    )


def test_epoch_arithmetic_from_manifest(shards):
    dm = module(shards, num_workers=4)
    assert dm.samples_per_epoch == 48
    assert dm.batches_per_rank(1) == 12  # 48 // 4
    assert dm.batches_per_rank(2) == 4  # 6, rounded down to a multiple of 4 workers
    assert dm.batches_per_rank(8) == 4  # 1, raised to one batch per worker
    assert dm.steps_per_epoch(1, accumulate_grad_batches=5) == 3  # Lightning steps on the last 2 as well
    assert module(shards, num_workers=0).batches_per_rank(2) == 6
    assert module(shards, samples_per_epoch=100).batches_per_rank(1) == 25


def test_missing_manifest_needs_samples_per_epoch(shards):
    (shards / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"data\.samples_per_epoch"):
        module(shards)
    assert module(shards, samples_per_epoch=10).batches_per_rank(1) == 2


def test_bad_patterns_fail_early_naming_the_key(shards):
    with pytest.raises(FileNotFoundError, match=r"data\.train_shards.*nope-\*\.tar"):
        ShardDataModule(f"{shards}/nope-*.tar", train_view=mae_view(16), batch_size=4)
    with pytest.raises(FileNotFoundError, match=r"data\.val_shards.*7 shard.*val-000003\.tar"):
        module(shards, val=f"{shards}/val-{{000000..000009}}.tar")
    with pytest.raises(ValueError, match=r"data\.train_shards.*split must be one of"):
        ShardDataModule("demo:digits/tset", train_view=mae_view(16), batch_size=4, demo_root=str(shards))


def test_demo_specs_resolve(tmp_path):
    dm = ShardDataModule(
        "demo:digits/train",
        "demo:digits/val",
        train_view=mae_view(32),
        val_view=eval_view(32),
        batch_size=64,
        num_workers=0,
        demo_root=str(tmp_path),
    )
    assert len(dm.train_urls) == 3 and len(dm.val_urls) == 2
    assert dm.samples_per_epoch == 1257
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (64, 3, 32, 32) and batch["label"].dtype == torch.int64


def test_loader_length_matches_batches_with_workers(shards):
    dm = module(shards, num_workers=2, batch_size=3)
    loader = dm.train_dataloader()
    assert len(loader) == dm.batches_per_rank(1) == 16
    first = [b["label"].tolist() for b in loader]
    second = [b["label"].tolist() for b in loader]
    assert len(first) == len(second) == 16 and all(len(b) == 3 for b in first)
    assert first != second, "iterating the same loader again must draw a new stream"
    assert first == [
        b["label"].tolist() for b in module(shards, num_workers=2, batch_size=3).train_dataloader()
    ]


def test_stream_depends_on_rank_and_global_step(shards):
    def labels(rank=0, world_size=1, step=0):
        dm = module(shards, batch_size=3)
        cpu = SimpleNamespace(root_device=torch.device("cpu"))
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, global_step=step, strategy=cpu)
        loader = dm.train_dataloader()
        out = [b["label"].tolist() for b in loader]
        assert len(out) == len(loader) == dm.batches_per_rank(world_size)
        return out

    base = labels()
    assert labels() == base
    assert labels(step=100) != base, "a run resumed at another step draws another stream"
    assert labels(rank=1, world_size=2) != labels(rank=0, world_size=2)


class Counting(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3 * 16 * 16, 1)
        self.train_batches, self.train_labels, self.val_labels = [], [], []

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.train_batches.append(0)
            self.train_labels.append([])
        self.train_batches[-1] += 1
        self.train_labels[-1] += batch["label"].tolist()
        return self.layer(batch["image"].flatten(1)).mean()

    def validation_step(self, batch, batch_idx):
        self.val_labels += batch["label"].tolist()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize(("with_val", "reload"), [(False, 0), (True, 1)])
def test_lightning_fit_uses_epoch_length_and_validation(shards, with_val, reload):
    dm = module(shards, val=f"{shards}/val-*.tar" if with_val else "", batch_size=8)
    model = Counting()
    trainer = L.Trainer(
        max_epochs=2,
        reload_dataloaders_every_n_epochs=reload,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert model.train_batches == [6, 6] and trainer.global_step == 12
    assert sorted(model.val_labels) == (sorted(list(range(10)) * 2) if with_val else [])
    assert model.train_labels[0] != model.train_labels[1], "each epoch draws a fresh stream"


def photo_shards(tmp_path, n: int = 12):
    """JPEGs of real photos (different crops of scikit-image's chelsea) at 120x90."""
    import skimage.data

    cat = Image.fromarray(skimage.data.chelsea())
    samples = []
    for i in range(n):
        buf = io.BytesIO()
        cat.crop((i * 10, 0, i * 10 + 300, 225)).resize((120, 90)).save(buf, "JPEG", quality=90)
        samples.append({"__key__": f"p{i}", "jpg": buf.getvalue(), "cls": i})
    write_shards(samples, tmp_path, "photo", 5)
    return f"{tmp_path}/photo-{{000000..000002}}.tar"


def test_normalising_on_the_device_gives_the_same_batches(tmp_path):
    """normalize_on_device: uint8 batches from the workers, and after on_after_batch_transfer exactly the
    tensors the per-picture normalisation makes (same crops, flips and values)."""
    spec = photo_shards(tmp_path)

    def batches(on_device: bool):
        dm = ShardDataModule(
            spec, train_view=mae_view(48), batch_size=4, num_workers=0, seed=3, normalize_on_device=on_device
        )
        torch.manual_seed(0)
        return dm, list(dm.train_dataloader())

    _, reference = batches(False)
    dm, deferred = batches(True)
    assert [b["image"].dtype for b in deferred] == [torch.uint8] * 3 and reference[0][
        "image"
    ].dtype == torch.float32
    for want, got in zip(reference, deferred, strict=True):
        out = dm.on_after_batch_transfer(got, 0)
        assert out["label"].tolist() == want["label"].tolist()
        assert out["image"].dtype == torch.float32 and torch.allclose(out["image"], want["image"], atol=1e-6)
    assert (reference[0]["image"] - reference[1]["image"]).abs().mean() > 0.1  # different pictures: can fail
    # a float batch (a validation view's) passes untouched
    val = {"image": reference[0]["image"]}
    assert dm.on_after_batch_transfer(val, 0)["image"] is val["image"]


def test_lightning_hands_the_step_normalised_batches(tmp_path):
    """Lightning calls the data module's on_after_batch_transfer: training steps see float, normalised images."""
    spec = photo_shards(tmp_path)
    dm = ShardDataModule(spec, train_view=mae_view(32), batch_size=4, num_workers=0, normalize_on_device=True)
    assert dm.batch_transform is not None
    seen = []

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            seen.append((batch["image"].dtype, float(batch["image"].min())))
            return (self.w - batch["image"].mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Probe(), datamodule=dm)
    assert len(seen) == 2 and all(dtype == torch.float32 and low < 0 for dtype, low in seen)
