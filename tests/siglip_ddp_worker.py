"""Worker for test_siglip.py's DDP test: spawned processes import only this light module (no Lightning)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from clip_ddp_worker import TEXT, global_batch
from torch.nn.parallel import DistributedDataParallel

from mmssl.backbones import create_backbone
from mmssl.objectives.clip import CLIP, open_clip_text_tower
from mmssl.objectives.siglip import siglip


def tiny_siglip() -> CLIP:
    """The same weights in every process: a 1-block timm ViT image tower and a 1-layer open_clip text tower."""
    torch.manual_seed(0)
    vit = create_backbone(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2
    )
    # bias 0, not the paper's -10: there the negatives' terms are ~e^-10 each, and a test that leaves out the
    # other rank's texts could not tell the difference
    return siglip(vit, open_clip_text_tower("ViT-B-32", embed_dim=32, text_cfg=TEXT), logit_bias=0.0)


def run(rank: int, world: int, init_file: str, out: str) -> None:
    """One DDP rank: its slice of the global batch, loss, backward (DDP averages gradients), save results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        objective = tiny_siglip()
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
