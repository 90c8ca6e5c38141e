"""Labelled image folders (one subfolder per class, torchvision ``ImageFolder``) as batch dicts, for training.

Shards are the main path (``module.py``); a folder of class folders is what many labelled sets look like on
disk, and fine-tuning reads it directly. Batches follow the shard contract (``{"image", "label"}``), so the
same objectives and Lightning module consume them.

Distributed: each rank draws its own part of every epoch through ``DistributedSampler`` (padded to equal size,
full batches only), so every rank takes the same number of steps (DESIGN.md §5); Lightning calls the sampler's
``set_epoch`` each epoch for a fresh order. Validation gives each rank a disjoint part, unpadded, so every
image is counted once (Lightning's ``UnrepeatedDistributedSampler``).
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import ImageFolder

from mmssl.data.transforms import View, to_rgb


def open_rgb(path: str) -> Image.Image:
    img = Image.open(path)
    img.load()  # PIL closes a file it opened by name once the pixels are read
    return to_rgb(img)


def folder_collate(items: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """ImageFolder items (view dict, class index) -> the shard batch contract ``{..., "label"}``."""
    out = {k: torch.stack([d[k] for d, _ in items]) for k in items[0][0]}
    out["label"] = torch.tensor([y for _, y in items], dtype=torch.int64)
    return out


def image_folder(root: str, view: View | None, config_key: str) -> ImageFolder:
    try:
        return ImageFolder(root, transform=view, loader=open_rgb)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or class folders without images
        raise FileNotFoundError(
            f"{config_key}={root!r}: not a folder of class folders with images ({e})"
        ) from e


class FolderDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_root: str,
        val_root: str,
        *,
        train_view: View,
        val_view: View,
        batch_size: int,
        num_workers: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_set = image_folder(train_root, train_view, "data.train_shards")
        self.val_set = image_folder(val_root, val_view, "data.val_shards")
        if self.train_set.classes != self.val_set.classes:
            raise ValueError(
                f"data.train_shards and data.val_shards: the class folders differ ({len(self.train_set.classes)} "
                f"vs {len(self.val_set.classes)}, e.g. {sorted(set(self.train_set.classes) ^ set(self.val_set.classes))[:3]})"
            )
        if len(self.train_set) < batch_size:
            raise ValueError(f"data.train_shards={train_root!r}: {len(self.train_set)} images < one batch")
        self.classes = self.train_set.classes
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def batches_per_rank(self, world_size: int) -> int:
        return -(-len(self.train_set) // world_size) // self.batch_size  # padded share, full batches

    def steps_per_epoch(self, world_size: int, accumulate_grad_batches: int = 1) -> int:
        return -(-self.batches_per_rank(world_size) // accumulate_grad_batches)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = DistributedSampler(
            self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed
        )
        return DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=folder_collate, drop_last=True, persistent_workers=False,
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = UnrepeatedDistributedSampler(self.val_set, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(
            self.val_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=folder_collate,
        )  # fmt: skip
