"""Small shard sets and checkpoints for the curation tests: shapes pictures with some captions swapped, a tiny
CLIP trained for a few plain-PyTorch steps and saved in tools/pretrain.py's checkpoint layout."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from mmssl import config as C
from mmssl import factory
from mmssl.data import demo, shapes
from mmssl.data.demo import encode
from mmssl.data.module import resolve_shards
from mmssl.data.shards import SampleDecoder, write_shards
from mmssl.data.transforms import ApplyView, CaptionTokens

ROOT = Path(__file__).resolve().parents[2]
TINY_CLIP = [
    "backbone.img_size=32", "backbone.patch_size=8", "backbone.depth=1", "backbone.embed_dim=64",
    "backbone.num_heads=2", "clip.embed_dim=32", "clip.text_cfg={context_length: 16, width: 32, heads: 2, layers: 1}",
    "optim.warmup_steps=0",
]  # fmt: skip


def shapes_shards(
    out: Path, n: int, seed: int, per_shard: int, swap: float = 0.0, split: str = "train"
) -> tuple[str, dict[str, bool]]:
    """``n`` shapes samples in shards of ``per_shard`` (last one shorter); a ``swap`` share of them get the
    caption of another picture of a different colour-shape class. Returns (spec, key -> caption matches)."""
    rows = list(shapes.samples("train", n, seed))
    rng = np.random.default_rng(seed)
    swapped = set(rng.choice(n, size=round(swap * n), replace=False).tolist())
    matches, samples = {}, []
    for i, (key, img, caption, cls, _) in enumerate(rows):
        if i in swapped:
            j = int(rng.integers(n))
            while rows[j][3] == cls:
                j = int(rng.integers(n))
            caption = rows[j][2]
        matches[key] = i not in swapped
        samples.append({"__key__": key, "jpg": encode(img, quality=95), "txt": caption, "cls": cls})
    manifest = write_shards(samples, out, split, maxcount=per_shard, info={"classes": list(shapes.CLASSES)})
    count = manifest["splits"][split]["shards"]
    return str(out / f"{split}-{{000000..{count - 1:06d}}}.tar"), matches


def tiny_clip_checkpoint(path: Path, shards: str, steps: int, seed: int = 0) -> Path:
    """A tiny CLIP trained ``steps`` AdamW steps on ``shards``, saved as tools/pretrain.py saves checkpoints."""
    cfg = C.load("clip_demo", [*TINY_CLIP, f"data.train_shards={shards}"])
    torch.manual_seed(seed)
    objective = factory.build_objective(cfg)
    if steps:
        _train(objective, cfg, shards, steps, seed)
    return save_checkpoint(objective, cfg, path)


def _train(objective: torch.nn.Module, cfg, shards: str, steps: int, seed: int) -> None:
    view, _ = factory.build_views(cfg)
    prepare = ApplyView(view, CaptionTokens(factory.build_tokenizer(cfg)))
    decoder = SampleDecoder(require_text=True)
    urls = resolve_shards(shards, "shards")
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    samples = [prepare(s) for s in map(decoder, pipeline) if s is not None]
    opt = torch.optim.AdamW(objective.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    objective.train()
    for _ in range(steps):
        idx = torch.randperm(len(samples), generator=gen)[:64]
        batch = {k: torch.stack([torch.as_tensor(samples[i][k]) for i in idx]) for k in ("image", "tokens")}
        loss = objective(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        objective.after_optimizer_step()
    objective.eval()


def photo_tiles(size: int = 96) -> list[Image.Image]:
    """Distinct pictures: the four corner tiles of every bundled photo scaled to a 256 px short side."""
    tiles = []
    for _, pixels in sorted(demo.photo_sources().items()):
        img = Image.fromarray(pixels).convert("RGB")
        scale = 256 / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        tiles += [img.crop((x, y, x + size, y + size)) for x, y in ((0, 0), (128, 0), (0, 128), (128, 128))]
    return tiles


def save_checkpoint(objective: torch.nn.Module, cfg, path: Path) -> Path:
    """The layout tools/pretrain.py writes: ``objective.*`` weights and the run config."""
    state = {f"objective.{k}": v for k, v in objective.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"config": C.to_dict(cfg)}}, path)
    return path


def tool(name: str):
    """A script in tools/ as a module, so a test calls its ``main(argv)`` in process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
