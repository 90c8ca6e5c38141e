"""Worker for test_clip_ddp.py: spawned processes import only this light module (no Lightning)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mmssl.backbones import create_backbone
from mmssl.data import shapes
from mmssl.objectives.clip import CLIP, clip_tokenizer, open_clip_text_tower

TEXT = {"context_length": 16, "width": 32, "heads": 2, "layers": 1}


def tiny_clip() -> CLIP:
    """The same weights in every process: a 1-block timm ViT image tower and a 1-layer open_clip text tower."""
    torch.manual_seed(0)
    vit = create_backbone(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2
    )
    return CLIP(vit, open_clip_text_tower("ViT-B-32", embed_dim=32, text_cfg=TEXT))


def global_batch(n: int = 8) -> dict[str, torch.Tensor]:
    captions = [caption for _, _, caption, _, _ in shapes.samples("train", n, 0)]
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return {"image": images, "tokens": clip_tokenizer("ViT-B-32", TEXT["context_length"])(captions)}


def run(rank: int, world: int, init_file: str, out: str) -> None:
    """One DDP rank: its slice of the global batch, loss, backward (DDP averages gradients), save results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        objective = tiny_clip()
        model = DistributedDataParallel(objective)
        full = global_batch()
        n = len(full["image"]) // world
        local = {k: v[rank * n : (rank + 1) * n] for k, v in full.items()}
        loss = model(local)["loss"]
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        grads = {name: p.grad for name, p in objective.named_parameters()}
        torch.save(
            {"loss": mean_loss / world, "local_loss": loss.detach(), "grads": grads}, f"{out}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()
