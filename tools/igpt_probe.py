"""Layer-wise linear probe of an iGPT checkpoint against the same network at random initialisation.

Chen et al. 2020, §"Linear Probing": features f^l = mean_i layer_norm(h^l)_i of every block l, a linear
classifier on each; the best layer sits near the middle of the network, not at the end. Here the classifier
is scikit-learn's L2-regularised LogisticRegression (lbfgs) on standardised features, trained on
``--train-shards`` and scored on ``--val-shards`` (labelled shards; the demo digits are scikit-learn's
``load_digits``, split 70/30 stratified). The random-init baseline is the checkpoint's own architecture and
initialisation (seeded), so the difference is what pretraining learned.

    python tools/igpt_probe.py runs/igpt_demo/checkpoints/last.ckpt \\
        --train-shards demo:digits/train --val-shards demo:digits/val
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from mmssl.build import objective_from_checkpoint
from mmssl.checkpoints import CheckpointError
from mmssl.data.module import resolve_shards
from mmssl.data.shards import SampleDecoder, eval_pipeline
from mmssl.data.transforms import eval_view


def load_labelled(spec: str, key: str, resolution: int, mean, std, interpolation: str = "bicubic"):
    """Labelled shards -> (images (N, 3, R, R) normalised like the run's data, labels (N,)) via the iGPT
    evaluation view (shorter side to R, centre crop)."""
    view = eval_view(resolution, crop_pct=1.0, interpolation=interpolation, mean=mean, std=std)
    decoder = SampleDecoder(require_label=True)
    pipeline = eval_pipeline(resolve_shards(spec, key), view, 256, rank=0, world_size=1, decoder=decoder)
    batches = list(pipeline)
    if not batches:
        raise ValueError(f"{key}={spec!r}: no labelled image could be read")
    return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])


@torch.no_grad()
def layer_features(objective, images: Tensor, batch_size: int = 256) -> Tensor:
    """(N, 3, R, R) -> (N, depth + 1, D) probe features of every layer (0 = embeddings)."""
    objective.eval()
    return torch.cat([objective.features_per_layer(x) for x in images.split(batch_size)])


def probe_accuracy(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, c: float = 1.0) -> float:
    """Top-1 accuracy of a logistic-regression probe on standardised features."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    clf.fit(train_x.numpy(), train_y.numpy())
    return float(clf.score(val_x.numpy(), val_y.numpy()))


def layerwise_probe(objective, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor]) -> list[float]:
    """Accuracy of a linear probe on each layer's features, from the embeddings (0) to the last block."""
    ftr, fval = layer_features(objective, train[0]), layer_features(objective, val[0])
    return [probe_accuracy(ftr[:, i], train[1], fval[:, i], val[1]) for i in range(ftr.shape[1])]


def table(rows: dict[str, list[float]]) -> str:
    depth = len(next(iter(rows.values())))
    lines = ["layer  " + "  ".join(f"{name:>12}" for name in rows)]
    for i in range(depth):
        lines.append(f"{i:>5}  " + "  ".join(f"{acc[i]:>12.3f}" for acc in rows.values()))
    best = {name: int(np.argmax(acc)) for name, acc in rows.items()}
    lines.append("best   " + "  ".join(f"{f'{max(rows[n]):.3f} @{best[n]}':>12}" for n in rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="Lightning checkpoint of an iGPT run (tools/pretrain.py)")
    p.add_argument("--train-shards", default="demo:digits/train")
    p.add_argument("--val-shards", default="demo:digits/val")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-initialisation baseline")
    a = p.parse_args(argv)
    try:
        trained, _ = objective_from_checkpoint(a.ckpt)
        if not hasattr(trained, "features_per_layer"):
            raise CheckpointError(f"checkpoint {a.ckpt}: not an iGPT run ({type(trained).__name__})")
        side = int(trained.transformer.seq_len**0.5)
        mean, std = trained.mean.flatten().tolist(), trained.std.flatten().tolist()
        train = load_labelled(a.train_shards, "--train-shards", side, mean, std)
        val = load_labelled(a.val_shards, "--val-shards", side, mean, std)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    random_init, _ = objective_from_checkpoint(a.ckpt, random_init=True, seed=a.seed)
    rows = {
        "pretrained": layerwise_probe(trained, train, val),
        "random init": layerwise_probe(random_init, train, val),
    }
    print(f"linear probe, {len(train[1])} train / {len(val[1])} val images, {side}x{side}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
