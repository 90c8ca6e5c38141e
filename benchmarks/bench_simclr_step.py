"""SimCLR training-step throughput: mmssl vs a peer built from timm + lightly, same shapes, same process.

    python benchmarks/bench_simclr_step.py                       # ResNet-18, batch 32, 96 px and 224 px
    python benchmarks/bench_simclr_step.py --img 96 --batch 64 --precision both

A step is forward of both views + NT-Xent + backward + a LARS update (timm's Lars for both, same groups).
The peer is the lightly recipe (docs "SimCLR" example): timm ``resnet18`` (num_classes=0), lightly's
``SimCLRProjectionHead(512, 512, 128)`` and ``NTXentLoss(temperature=0.1)``, each view a separate forward
pass, NCHW. mmssl runs both views in one pass, channels_last, with its own head and loss. Rounds alternate
between the two so that machine drift hits both alike; the median round counts. fp32, and bf16 autocast
where the CPU has native bf16 (``--precision``). Needs lightly (``pip install -e .[dev]``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import timm
import torch
from common import Ratio, add_precision_arg, machine_line, precisions
from torch import nn

try:  # the peer: lightly is a dev extra, not an mmssl dependency
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
except ImportError as e:
    sys.exit(
        f"bench_simclr_step.py: the peer needs lightly, one of mmssl's dev extras ({e}); install them with\n"
        '    pip install -c constraints.txt -e ".[dev]"      (or: pip install lightly)'
    )

from mmssl import config as C
from mmssl.factory import build_objective
from mmssl.optim import create_optimizer


class LightlySimCLR(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)
        self.head = SimCLRProjectionHead(512, 512, 128)
        self.criterion = NTXentLoss(temperature=0.1)

    def forward(self, batch: dict) -> dict:
        z0 = self.head(self.backbone(batch["view1"]))
        z1 = self.head(self.backbone(batch["view2"]))
        return {"loss": self.criterion(z0, z1)}


def mmssl_model(img: int) -> nn.Module:
    cfg = C.load(
        "simclr_digits", ["backbone.name=resnet18", f"backbone.img_size={img}", "simclr.temperature=0.1"]
    )
    return build_objective(cfg)


def time_steps(model: nn.Module, opt, batch: dict, steps: int, bf16: bool) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return batch["view1"].shape[0] * steps / (time.perf_counter() - start)


def compare(img: int, batch_size: int, steps: int, rounds: int, bf16: bool) -> Ratio:
    torch.manual_seed(0)
    batch = {k: torch.randn(batch_size, 3, img, img) for k in ("view1", "view2")}
    impls = {"mmssl": mmssl_model(img), "timm+lightly": LightlySimCLR()}
    opts = {k: create_optimizer(m, "lars", lr=0.3, weight_decay=1e-6) for k, m in impls.items()}
    rates: dict[str, list[float]] = {name: [] for name in impls}
    for name, model in impls.items():
        time_steps(model, opts[name], batch, 1, bf16)  # warm-up (oneDNN kernels, allocator)
    for _ in range(rounds):
        for name, model in impls.items():
            rates[name].append(time_steps(model, opts[name], batch, steps, bf16))
    ours, peer = statistics.median(rates["mmssl"]), statistics.median(rates["timm+lightly"])
    label = "bf16" if bf16 else "fp32"
    print(f"{img:4d} px {label}: mmssl {ours:7.2f} img/s | timm+lightly {peer:7.2f} img/s | "
          f"ratio {ours / peer:.2f}x", flush=True)  # fmt: skip
    case = f"ResNet-18 {img}px, batch {batch_size}x2"
    return Ratio.of_rates("SimCLR step", case, label, ours, peer, "img/s", "timm + lightly")


QUICK = ["--img", "96", "--batch", "16", "--steps", "2", "--rounds", "1"]


def measure(argv: list[str] | None = None) -> list[Ratio]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--img", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    add_precision_arg(parser)
    args = parser.parse_args(argv)
    print(machine_line())
    print(f"SimCLR ResNet-18 step, batch {args.batch} (x2 views), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    return [
        compare(img, args.batch, args.steps, args.rounds, label == "bf16")
        for img in args.img
        for label in precisions(args.precision)
    ]


if __name__ == "__main__":
    measure()
