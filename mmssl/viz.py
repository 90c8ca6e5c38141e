"""Pictures: side-by-side image grids (MAE reconstructions and friends) written into the run directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as L
import matplotlib
import numpy as np
import torch
from torch import Tensor

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class Denormalize:
    """Normalised (B, 3, H, W) -> displayable [0, 1] (B, 3, H, W): undoes the data's mean/std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, images: Tensor) -> Tensor:
        m = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        s = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() * s + m).clamp(0, 1)


def _save_figure(
    fig, path: str | Path, title: str = "", title_size: int = 9, rect=(0, 0, 1, 1), dpi: int = 100
) -> Path:
    """Title, lay out, write (creating the folder) and close a matplotlib figure."""
    if title:
        fig.suptitle(title, fontsize=title_size)
    fig.tight_layout(rect=rect)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def save_grid(columns: dict[str, Tensor], path: str | Path, title: str = "") -> Path:
    """One row per sample, one titled column per entry; images in [0, 1], (B, 3, H, W)."""
    names = list(columns)
    rows = len(columns[names[0]])
    fig, axes = plt.subplots(rows, len(names), figsize=(2 * len(names), 2 * rows), squeeze=False)
    for col, name in enumerate(names):
        axes[0, col].set_title(name, fontsize=9)
        for row in range(rows):
            axes[row, col].imshow(columns[name][row].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            axes[row, col].axis("off")
    return _save_figure(fig, path, title)


class PictureCallback(L.Callback):
    """Every ``every_n_steps`` and at the end of training, draws ``objective.visualize(batch, denormalize,
    generator)`` for a fixed batch: the first validation batch (held-out images) when there is one, else the
    first training batch. Random choices inside (masks) come from a fresh generator seeded 0 for every
    picture, so pictures from different steps compare; the global generators of the training step are never
    read or reseeded (``torch.manual_seed`` would reseed every CUDA generator, which a CPU-only
    ``fork_rng`` does not restore)."""

    def __init__(
        self,
        out_dir: str | Path,
        mean: Sequence[float],
        std: Sequence[float],
        every_n_steps: int = 1000,
        num_images: int = 6,
    ):
        self.out_dir, self.denormalize = Path(out_dir), Denormalize(mean, std)
        self.every_n_steps, self.num_images = every_n_steps, num_images
        self.batch: dict[str, Tensor] | None = None
        self.held_out = False

    def _keep(self, batch: dict, held_out: bool) -> None:
        if self.batch is None or (held_out and not self.held_out):
            self.batch = {
                k: v[: self.num_images].detach().clone() for k, v in batch.items() if isinstance(v, Tensor)
            }
            self.held_out = held_out

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._keep(batch, held_out=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._keep(batch, held_out=False)
        step = trainer.global_step
        if step % self.every_n_steps == 0:
            self.draw(trainer, pl_module, f"step_{step:07d}.png")

    def on_train_end(self, trainer, pl_module) -> None:
        self.draw(trainer, pl_module, "final.png")

    def draw(self, trainer, pl_module, filename: str) -> Path | None:
        visualize = getattr(pl_module.objective, "visualize", None)
        if visualize is None or self.batch is None or not trainer.is_global_zero:
            return None
        was_training = pl_module.training
        pl_module.eval()
        batch = {k: v.to(pl_module.device) for k, v in self.batch.items()}
        generator = torch.Generator(device=pl_module.device).manual_seed(0)
        with trainer.precision_plugin.forward_context():
            columns = visualize(batch, self.denormalize, generator)
        pl_module.train(was_training)
        if self.held_out:
            split = "held-out images"
        elif trainer.limit_val_batches == 0:  # build_trainer: no data.val_shards
            split = "training images (data.val_shards not set)"
        else:  # validation first runs at the end of an epoch; pictures switch to its images from then on
            split = "training images (held-out from the first validation)"
        path = save_grid(columns, self.out_dir / filename, f"step {trainer.global_step}, {split}")
        log_picture(getattr(trainer, "loggers", ()), path, "pictures", trainer.global_step)
        return path


def log_picture(loggers: Sequence, path: str | Path, tag: str, step: int) -> int:
    """Send the PNG at ``path`` to every logger that takes images (TensorBoard ``add_image``, W&B
    ``log_image``, MLflow ``log_image``); CSV takes none. Returns how many took it."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
    from PIL import Image

    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("RGB"))  # (H, W, 3) uint8
    sent = 0
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, pixels, global_step=step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[str(path)], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, pixels, key=tag, step=step)
        else:
            continue
        sent += 1
    return sent


def save_embedding_plot(
    panels: dict[str, tuple[Tensor, Tensor]], path: str | Path, title: str = "", seed: int = 0
) -> Path:
    """t-SNE (van der Maaten & Hinton 2008; scikit-learn) of each panel's (N, D) features, points coloured by
    their (N,) integer labels; one panel per entry, side by side, sharing one legend."""
    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab10" if max(int(y.max()) for _, y in panels.values()) < 10 else "tab20")
    for ax, (name, (feats, labels)) in zip(axes[0], panels.items(), strict=True):
        x = feats.float().numpy()
        perplexity = min(30.0, (len(x) - 1) / 3)  # scikit-learn requires perplexity < n_samples
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
        y = labels.numpy()
        for c in sorted(set(y.tolist())):
            ax.scatter(*xy[y == c].T, s=5, color=cmap(c % cmap.N), label=str(c))
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0, -1].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", markerscale=3, fontsize=8, title="label")
    return _save_figure(fig, path, title, title_size=10, rect=(0, 0, 0.94, 1), dpi=110)  # legend at right


def save_answer_grid(
    images: Tensor, captions: Sequence[str], correct: Sequence[bool], path: str | Path, title: str = ""
) -> Path:
    """Pictures in [0, 1] (B, 3, H, W), each titled with its question and answer, green when right, red when
    wrong (e.g. a vision-language model's answers to held-out questions)."""
    cols = min(6, len(images))
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption, ok in zip(axes.flat, images, captions, correct, strict=False):
        ax.imshow(image.permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        ax.set_title(caption, fontsize=7, color="green" if ok else "red")
    return _save_figure(fig, path, title)


def save_histogram(
    groups: dict[str, Sequence[float]],
    path: str | Path,
    threshold: float | None = None,
    xlabel: str = "score",
    title: str = "",
    bins: int = 50,
) -> Path:
    """Stacked histogram of one score split into named groups (e.g. kept / dropped), with an optional
    threshold line."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    named = {name: list(values) for name, values in groups.items() if len(values)}
    ax.hist(list(named.values()), bins=bins, stacked=True, label=list(named))
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    return _save_figure(fig, path, title, title_size=10)
