"""End-to-end fine-tuning of a pretrained encoder with a new linear head (He et al. 2021, "Masked Autoencoders
Are Scalable Vision Learners", Appendix A.3; reference: facebookresearch/mae ``main_finetune.py``).

* :func:`classifier_from_encoder`: the encoder's timm architecture rebuilt as a classifier (new head of
  ``num_classes``, stochastic depth, the chosen pooling) with every encoder weight copied in. MAE's
  ``--global_pool`` (the default) averages the patch tokens and normalises them with a new ``fc_norm``; the
  pretrained final ``norm`` is then unused (timm: ``global_pool="avg", fc_norm=True``; MAE deletes the norm).
  The head is ``trunc_normal(std=2e-5)`` with zero bias, as main_finetune.py initialises it.
* :class:`Classifier`: the fine-tuning "objective" (same dict contract as the pretraining objectives, so the
  generic Lightning module trains it): timm's ``Mixup`` (mixup / cutmix with label smoothing folded into the soft
  targets) and ``SoftTargetCrossEntropy`` while training, ``LabelSmoothingCrossEntropy`` when nothing is mixed,
  plain cross-entropy and top-1 / top-5 (%) in evaluation (main_finetune.py ``criterion`` / engine ``evaluate``).
* :func:`finetune_views`: timm's ``create_transform`` (RandomResizedCrop, flip, RandAugment, random erasing) for
  training, the resize + centre crop evaluation view of the linear probe for the held-out split.
* :func:`check_shard_labels`: labels read from the tar headers before training (no image is decoded), so a
  shard set without labels or with labels beyond the head stops with a message instead of mid-run.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from mmssl.attention import use_self_attention
from mmssl.backbones import Backbone, ViTBackbone
from mmssl.checkpoints import CheckpointError
from mmssl.data.shards import read_manifest
from mmssl.data.transforms import ImageView, View, eval_view
from mmssl.export import timm_args
from mmssl.flops import TRAIN_PER_FORWARD
from mmssl.linear import use_fast_linear


def architecture(model: nn.Module) -> str:
    return model.default_cfg["architecture"]


def describe(model: nn.Module) -> dict:
    """What makes two timm encoders the same architecture: name, width, depth, patch size."""
    out = {"architecture": architecture(model), "embed_dim": model.num_features}
    if isinstance(model, VisionTransformer):
        out |= {"depth": len(model.blocks), "patch_size": model.patch_embed.patch_size[0]}
    return out


def check_architecture(model: nn.Module, expected: str, source: str) -> None:
    """``expected`` (a timm name, e.g. ``vit_base_patch16_224``) must describe ``model`` exactly, sizes included."""
    if expected not in timm.list_models():
        raise ValueError(f"config key 'arch': unknown timm model {expected!r}")
    with torch.device("meta"):  # no memory, no initialisation: only the shapes are compared
        reference = timm.create_model(expected, pretrained=False, num_classes=0)
    got, want = describe(model), describe(reference)
    if got != want:
        raise CheckpointError(
            f"{source}: an encoder of another architecture: {got}, but this recipe is for {want} "
            f"(config key 'arch'; set arch=null to fine-tune any architecture)"
        )


def classifier_from_encoder(
    backbone: Backbone,
    num_classes: int,
    *,
    global_pool: str = "avg",
    drop_path_rate: float = 0.1,
    head_init_std: float = 2e-5,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, list[str]]]:
    """The encoder's timm architecture as a classifier with the encoder's weights; and a report of the keys
    (``missing``: new parts, i.e. the head and fc_norm; ``unused``: encoder weights the classifier does not have,
    e.g. the final norm replaced by fc_norm). Any other difference is an error naming the keys."""
    model = backbone.model
    vit = isinstance(model, VisionTransformer)
    if global_pool == "token" and not vit:
        raise ValueError(f"model.global_pool=token needs a ViT with a CLS token, not {architecture(model)!r}")
    args = timm_args(model) | {
        "num_classes": num_classes,
        "drop_path_rate": drop_path_rate,
        "global_pool": "avg",
    }
    if vit:
        args |= {"global_pool": global_pool, "fc_norm": global_pool == "avg"}  # MAE: avg pool -> fc_norm
    try:
        classifier = timm.create_model(architecture(model), pretrained=False, **args)
    except TypeError as e:
        raise ValueError(f"{architecture(model)!r} cannot be rebuilt as a classifier by timm ({e})") from None
    use_self_attention(classifier)  # the kernels of the backbone it came from (mmssl/attention.py, linear.py)
    use_fast_linear(classifier)

    source, own = model.state_dict(), classifier.state_dict()
    head = classifier.get_classifier()
    head_name = next(name for name, m in classifier.named_modules() if m is head)
    new_parts = (
        f"{head_name}.",
        "fc_norm.",
    )  # always new / new unless the encoder has one (a fine-tuned model)
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in source.items()
              if k in own and v.shape != own[k].shape and not k.startswith(new_parts)]  # fmt: skip
    missing = [
        k for k in own if k.startswith(f"{head_name}.") or k not in source or source[k].shape != own[k].shape
    ]
    unexpected = [k for k in missing if not k.startswith(new_parts)]
    if shapes or unexpected:
        raise CheckpointError(
            f"the encoder's weights do not fit its own architecture rebuilt as a classifier "
            f"({architecture(model)!r}): shape mismatch {shapes[:3]}, missing {unexpected[:3]}"
        )
    classifier.load_state_dict(
        {k: v for k, v in source.items() if k in own and k not in missing}, strict=False
    )
    with torch.no_grad():
        w = torch.empty_like(head.weight)
        nn.init.trunc_normal_(w, std=head_init_std, generator=torch.Generator().manual_seed(seed))
        head.weight.copy_(w)
        head.bias.zero_()
    unused = [k for k in source if k not in own or k in missing]
    return classifier, {"missing": missing, "unused": unused}


def accuracy(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Top-1 and top-5 (%) as 0-dim tensors (k capped at the number of classes); no host sync."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, k)
    hits = (top == labels.view(-1, 1)).float()
    return {"top1": 100 * hits[:, 0].mean(), "top5": 100 * hits.amax(1).mean()}


class Classifier(nn.Module):
    """A timm classifier trained on ``{"image", "label"}`` batches; returns ``loss``, ``logits`` and, when
    nothing is mixed, ``top1`` / ``top5``."""

    def __init__(self, model: nn.Module, mixup: Mixup | None = None, smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.mixup = mixup
        self.num_classes: int = model.num_classes
        # main_finetune.py: soft targets when mixing (smoothing inside them), else smoothed CE, plain CE to evaluate
        self.mixed_loss = SoftTargetCrossEntropy()
        self.train_loss = LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss()
        self.eval_loss = nn.CrossEntropyLoss()

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if "label" not in batch:
            raise ValueError(f"fine-tuning needs labelled batches; this one has only {sorted(batch)}")
        images, labels = batch["image"], batch["label"]  # (B, 3, H, W), (B,)
        if self.training and self.mixup is not None:
            images, soft = self.mixup(images, labels)  # mixed images, (B, num_classes) soft targets
            logits = self.model(images)
            return {"loss": self.mixed_loss(logits.float(), soft), "logits": logits}
        logits = self.model(images)  # (B, num_classes)
        loss = (self.train_loss if self.training else self.eval_loss)(logits.float(), labels)
        return {"loss": loss, "logits": logits, **accuracy(logits.detach(), labels)}

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in getattr(self.model, "no_weight_decay", set)()}

    def flops_per_sample(self) -> int | None:
        if not isinstance(self.model, VisionTransformer):
            return None
        return TRAIN_PER_FORWARD * ViTBackbone(self.model).forward_flops()  # the head is negligible


def make_mixup(
    num_classes: int,
    mixup: float,
    cutmix: float,
    cutmix_minmax: Sequence[float] | None = None,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: str = "batch",
    smoothing: float = 0.1,
) -> Mixup | None:
    """timm's Mixup as main_finetune.py builds it; None when neither mixup nor cutmix is on."""
    if mixup <= 0 and cutmix <= 0 and cutmix_minmax is None:
        return None
    return Mixup(
        mixup_alpha=mixup, cutmix_alpha=cutmix, cutmix_minmax=list(cutmix_minmax) if cutmix_minmax else None,
        prob=prob, switch_prob=switch_prob, mode=mode, label_smoothing=smoothing, num_classes=num_classes,
    )  # fmt: skip


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's RandAugment posterize, safe at 0 bits: timm's "inc" policies keep 4 - int(0.4 x magnitude) bits,
    so 0 at magnitude 10 (reached in ~2% of draws at m9, mstd 0.5), where old Pillow returned a black image
    (mask ~255) and the installed one (13) raises ValueError, stopping the data worker mid-run."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # what ImageOps.posterize(img, 0) gave: every bit masked
    return ImageOps.posterize(img, bits_to_keep)


def _safe_posterize(transform) -> None:
    for t in getattr(transform, "transforms", ()):
        for op in getattr(t, "ops", ()):  # timm RandAugment / AutoAugment ops
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = posterize


def finetune_views(
    img_size: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip: float = 0.5,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    color_jitter: float | None = None,
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
) -> tuple[View, View]:
    """(training view, evaluation view); MAE util/datasets.py ``build_transform``."""
    train = create_transform(
        img_size, is_training=True, scale=tuple(crop_scale), hflip=hflip, color_jitter=color_jitter,
        auto_augment=auto_augment, interpolation=interpolation, mean=tuple(mean), std=tuple(std),
        re_prob=re_prob, re_mode=re_mode, re_count=re_count,
    )  # fmt: skip
    _safe_posterize(train)
    val = eval_view(img_size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
    return ImageView(train), val


def _shard_labels(url: str, label_key: str, max_samples: int | None) -> tuple[int, list[tuple[str, int]]]:
    """(samples seen, [(key, label)]) from one local tar's headers; member data is skipped unless a label."""
    keys: set[str] = set()
    labels: list[tuple[str, int]] = []
    with tarfile.open(url) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if key not in keys:
                if max_samples is not None and len(keys) >= max_samples:
                    break
                keys.add(key)
            if ext == label_key:
                raw = tar.extractfile(member).read()
                try:
                    labels.append((key, int(raw.decode("ascii"))))
                except (ValueError, UnicodeDecodeError):
                    raise ValueError(f"{url}: sample {key!r} has a bad label {raw[:20]!r}") from None
    return len(keys), labels


def check_shard_labels(
    urls: list[str], label_key: str, num_classes: int, config_key: str, max_samples: int | None = None
) -> Counter:
    """Labels of ``urls`` (all, or the first ``max_samples`` samples) must exist and lie in 0..num_classes-1;
    a manifest's class list (tools/make_shards.py writes one) must have ``num_classes`` entries. Returns the
    label counts seen. Remote shards are skipped (nothing is read over the network before training)."""
    counts: Counter = Counter()
    seen = 0
    for url in urls:
        if "://" in url or url.startswith("pipe:"):
            continue
        path = Path(url)
        split = read_manifest(path.parent).get("splits", {}).get(path.name.rsplit("-", 1)[0], {})
        if "classes" in split and len(split["classes"]) != num_classes:
            raise ValueError(
                f"{config_key}: {path.parent / 'manifest.json'} lists {len(split['classes'])} classes, but the head "
                f"has num_classes={num_classes}"
            )
        left = None if max_samples is None else max_samples - seen
        if left is not None and left <= 0:
            break
        n, labels = _shard_labels(url, label_key, left)
        seen += n
        for key, label in labels:
            if not 0 <= label < num_classes:
                raise ValueError(
                    f"{config_key}: sample {key!r} in {url} has label {label}, outside the head's 0..{num_classes - 1} "
                    f"(num_classes={num_classes}): set num_classes to the data's number of classes"
                )
        counts.update(label for _, label in labels)
    if seen and not counts:
        raise ValueError(
            f"{config_key}: none of the {seen} samples read has a label (tar member '.{label_key}'); fine-tuning "
            f"needs labelled shards (tools/make_shards.py on a folder of class folders writes them)"
        )
    return counts
