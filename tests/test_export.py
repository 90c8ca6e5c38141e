"""Export: Lightning checkpoint -> timm weights that reproduce the features exactly (ViT and CNN), and the
bad inputs: another architecture, a malicious pickle, a file that is not a pretraining checkpoint."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import timm
import torch
from conftest import tiny_cfg
from torch import nn
from torch.utils.data import DataLoader

from mmssl import config as C
from mmssl import factory, linear
from mmssl.checkpoints import CheckpointError, load_exported, read_checkpoint
from mmssl.lit import PretrainModule
from mmssl.ops import sincos_2d

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import export as export_tool  # noqa: E402


def reported(stdout: str) -> dict[str, float]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("round trip"))
    return json.loads(line.split(": ", 1)[1])


class FeatureNorm(nn.Module):
    """A stand-in objective around a CNN (no CNN objective has landed yet): shrink the pooled features."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, batch):
        return {"loss": self.backbone.forward_pooled(batch["image"]).pow(2).mean()}


def lightning_checkpoint(cfg, objective, path: Path, steps: int = 2) -> Path:
    """Train ``steps`` real Lightning steps (so BatchNorm statistics move too) and save the checkpoint."""
    module = PretrainModule(objective, lr=1e-3, total_steps=steps, config=C.to_dict(cfg))
    images = [{"image": torch.randn(4, 3, 32, 32)} for _ in range(steps)]
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=path.parent,
    )  # fmt: skip
    trainer.fit(module, DataLoader(images, batch_size=None))
    trainer.save_checkpoint(path, weights_only=True)
    return path


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory) -> Path:
    cfg = tiny_cfg()
    return lightning_checkpoint(
        cfg, factory.build_objective(cfg), tmp_path_factory.mktemp("vit") / "last.ckpt"
    )


@pytest.fixture(scope="module")
def cnn_ckpt(tmp_path_factory) -> Path:
    vit_sizes = ("patch_size", "embed_dim", "depth", "num_heads")
    cfg = tiny_cfg("backbone.name=resnet10t", *(f"backbone.{k}=null" for k in vit_sizes))
    objective = FeatureNorm(factory.build_backbone(cfg))
    return lightning_checkpoint(cfg, objective, tmp_path_factory.mktemp("cnn") / "last.ckpt")


@pytest.mark.parametrize("which", ["vit_ckpt", "cnn_ckpt"])
def test_export_then_timm_gives_identical_features(which, request, tmp_path, capsys):
    ckpt = request.getfixturevalue(which)
    out = tmp_path / "enc"
    assert export_tool.main([str(ckpt), "--out", str(out), "--formats", "timm,hf"]) == 0, (
        capsys.readouterr().err
    )
    diffs = reported(capsys.readouterr().out)  # the tool checks itself, through timm and transformers
    assert diffs == {"timm": 0.0, "hf": 0.0, "hf (transformers)": 0.0}

    trained, _ = factory.load_encoder(ckpt)  # the encoder as the checkpoint holds it
    sidecar = json.loads(out.with_suffix(".json").read_text())
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad(), linear.library("blas"):  # plain timm's kernels (mmssl/linear.py): bit for bit
        expected = trained.forward_pooled(images)
        plain = timm.create_model(
            sidecar["architecture"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out) + ".safetensors"),
            **sidecar["model_args"],
        ).eval()  # fmt: skip
        hf = timm.create_model(f"local-dir:{out}_hf", pretrained=True).eval()
        assert (plain(images) - expected).abs().max().item() == 0.0
        assert (hf(images) - expected).abs().max().item() == 0.0
        for path in (out.with_suffix(".safetensors"), Path(f"{out}_hf")):
            backbone, info = factory.load_encoder(path)
            assert torch.equal(backbone.forward_pooled(images), expected) and info["img_size"] == 32
    assert list(hf.pretrained_cfg["mean"]) == C.IMAGENET_MEAN and sidecar["objective"] == "mae"
    state = plain.state_dict()
    if which == "vit_ckpt":  # MAE's fixed sin-cos position embedding travels with the weights
        torch.testing.assert_close(state["pos_embed"], sincos_2d(64, (4, 4), num_prefix_tokens=1))
    else:  # BatchNorm statistics moved during the two training steps and were exported
        assert state["bn1.num_batches_tracked"].item() == 2


def test_an_mae_run_exports_every_format_it_can_and_each_is_checked(vit_ckpt, tmp_path, capsys):
    out = tmp_path / "mae"
    assert export_tool.main([str(vit_ckpt), "--out", str(out)]) == 0, capsys.readouterr().err
    diffs = reported(capsys.readouterr().out)
    assert set(diffs) == {"timm", "hf", "hf (transformers)", "vit", "vitmae"}
    assert max(diffs.values()) < 1e-5
    for folder in ("mae_hf", "mae_vit", "mae_vitmae"):
        assert (tmp_path / folder / "config.json").is_file()
    # a format the run's objective does not offer (its spec), asked for by name, is refused naming what it offers
    assert export_tool.main([str(vit_ckpt), "--out", str(out), "--formats", "imagegpt"]) == 2
    err = capsys.readouterr().err
    assert "--formats imagegpt:" in err and "exports as timm, hf, vit, vitmae" in err, err
    assert export_tool.main([str(vit_ckpt), "--formats", "onnx"]) == 2
    assert "--formats onnx:" in capsys.readouterr().err


def test_weights_of_another_architecture_are_refused_clearly(vit_ckpt, cnn_ckpt, tmp_path):
    out = tmp_path / "enc"
    assert export_tool.main([str(cnn_ckpt), "--out", str(out), "--formats", "timm"]) == 0  # resnet10t
    sidecar = json.loads(out.with_suffix(".json").read_text())
    out.with_suffix(".json").write_text(json.dumps({**sidecar, "architecture": "resnet34"}))
    with pytest.raises(CheckpointError, match=r"resnet34.*another architecture.*missing"):
        load_exported(out.with_suffix(".safetensors"))

    ckpt = torch.load(vit_ckpt, weights_only=True)
    ckpt["hyper_parameters"]["config"]["backbone"]["embed_dim"] = 128  # a config that does not match
    torch.save(ckpt, tmp_path / "mixed.ckpt")
    with pytest.raises(
        CheckpointError, match=r"another architecture.*shape mismatch.*\(1, 17, 64\) vs \(1, 17, 128\)"
    ):
        factory.load_encoder(tmp_path / "mixed.ckpt")


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    Payload.marker = marker
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": {}}, "x": Payload()}, path)
    with pytest.raises(
        CheckpointError, match=r"refused.*would run code.*GLOBAL posix.system.*weights_only=True"
    ):
        read_checkpoint(path)
    assert export_tool.main([str(path)]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_files_that_are_not_pretraining_checkpoints(tmp_path):
    torch.save({"model": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        read_checkpoint(tmp_path / "other.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "nocfg.ckpt")
    with pytest.raises(CheckpointError, match="hyper_parameters.config"):
        read_checkpoint(tmp_path / "nocfg.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        read_checkpoint(tmp_path / "junk.ckpt")
    with pytest.raises(CheckpointError, match="no such file"):
        factory.load_encoder(tmp_path / "missing.ckpt")
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no sidecar w.json"):
        load_exported(tmp_path / "w.safetensors")
