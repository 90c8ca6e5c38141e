"""Learning check on real images: frozen-feature probes on the demo digits, before and after pretraining.

    python tools/pretrain.py --cfg simclr_digits          # ResNet-18, about 5 minutes on 2 CPU cores
    python benchmarks/probe_digits.py runs/simclr_digits/checkpoints/last.ckpt
    python tools/pretrain.py --cfg simclr_digits_vit      # a small ViT, same data
    python benchmarks/probe_digits.py runs/simclr_digits_vit/checkpoints/last.ckpt

Loads the checkpoint's encoder (``factory.load_encoder``: its config travels inside) and scores the backbone's
pooled features (``forward_pooled``) on ``demo:digits`` (scikit-learn's 1797 real 8x8 digits at 32 px; the
stratified 70/30 split of ``mmssl.data.demo``): a logistic-regression probe and a weighted cosine kNN (k=20,
T=0.07) fitted on the 70% and scored on the held-out 30%, for the trained weights and for a random
initialisation of the same model (the objective's own, seeded).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mmssl.data import demo
from mmssl.data.shards import SampleDecoder, eval_pipeline, expand_shards
from mmssl.data.transforms import eval_view
from mmssl.eval.knn import knn_accuracy
from mmssl.factory import load_encoder


def digits(split: str, img_size: int, mean, std, root: str | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """All images of one demo-digits split, (N, 3, S, S) normalised, and their labels (N,)."""
    urls = expand_shards(demo.resolve(f"demo:digits/{split}", root))
    view = eval_view(img_size, crop_pct=1.0, mean=tuple(mean), std=tuple(std))  # 32 px digits: no crop
    batches = list(eval_pipeline(urls, view, 512, rank=0, world_size=1, decoder=SampleDecoder()))
    images = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["label"] for b in batches]).numpy()
    return images, labels


@torch.no_grad()
def features(backbone: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Pooled backbone features h (N, D) in eval mode (BN running statistics)."""
    backbone.eval()
    return torch.cat([backbone.forward_pooled(x) for x in images.split(batch_size)]).float().numpy()


@torch.no_grad()
def recalibrate_bn(backbone: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``images`` (cumulative average), weights untouched.

    A randomly initialised network's running statistics are the defaults (mean 0, variance 1), which can make
    its eval-mode features degenerate; this baseline separates what pretraining learned from what mere BN
    calibration gives.
    """
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    backbone.train()
    for x in images.split(batch_size):
        backbone.forward_pooled(x)
    return backbone.eval()


def linear_probe(train: np.ndarray, y_train: np.ndarray, val: np.ndarray, y_val: np.ndarray) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    return float(clf.fit(train, y_train).score(val, y_val))


def knn(train: np.ndarray, y_train: np.ndarray, val: np.ndarray, y_val: np.ndarray) -> float:
    """Weighted cosine kNN, k=20, T=0.07 (DINO's setting, ``mmssl.eval.knn``), top-1 as a fraction."""
    t = torch.from_numpy
    result = knn_accuracy(t(train), t(y_train), t(val), t(y_val), settings=((20, 0.07),))
    return result[0]["top1"] / 100


def scores(backbone: torch.nn.Module, data: dict) -> dict[str, float]:
    tr, va = features(backbone, data["train"][0]), features(backbone, data["val"][0])
    y_tr, y_va = data["train"][1], data["val"][1]
    return {"linear_probe": linear_probe(tr, y_tr, va, y_va), "knn": knn(tr, y_tr, va, y_va)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ckpt", type=Path, help="a pretraining run's checkpoint (RUN/checkpoints/last.ckpt)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    args = parser.parse_args()
    pretrained, info = load_encoder(args.ckpt)
    random_init, _ = load_encoder(args.ckpt, random_init=True, seed=args.seed)
    data = {s: digits(s, info["img_size"], info["mean"], info["std"]) for s in ("train", "val")}
    result = {"backbone": info["architecture"], "random_init": scores(random_init, data)}
    bns = [m for m in random_init.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if bns:
        # timm zero-inits each residual block's last BN scale, so a random ResNet's features pass through
        # skip connections only; a stronger baseline turns every branch on and calibrates BN on the data.
        for m in bns:
            if m.weight is not None and not m.weight.any():
                torch.nn.init.ones_(m.weight)
        calibrated = recalibrate_bn(random_init, data["train"][0])
        result["random_init_all_branches_bn_recalibrated"] = scores(calibrated, data)
    result["pretrained"] = scores(pretrained, data)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
