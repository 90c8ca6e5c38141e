"""Pretrain any mmssl objective.

    python tools/pretrain.py --cfg mae_demo                      # bundled demo data, CPU, a few minutes
    python tools/pretrain.py --cfg mae_vitb data.train_shards='/data/in1k/train-{000000..001023}.tar'
    python tools/pretrain.py --cfg mae_vitb --print-config       # the resolved recipe, then exit
    python tools/pretrain.py --cfg mae_demo --resume             # continue from <run dir>/checkpoints/last.ckpt
    python tools/pretrain.py --cfg mae_demo --resume auto        # continue if last.ckpt exists, else start
    python tools/pretrain.py --cfg mae_demo --resume runs/mae_demo/checkpoints/step0000200.ckpt
    torchrun --nproc_per_node 8 tools/pretrain.py --cfg mae_vitb trainer.devices=auto    # devices from torchrun
    sbatch tools/slurm/pretrain.sbatch --cfg mae_vitb ...        # SLURM, requeued on time limit / preemption

Under torchrun or srun, trainer.devices / trainer.num_nodes follow the launcher (mmssl/launch.py). Rank 0
holds <run dir>/run.lock while the run lasts: a second run into the same folder is refused.
Checkpoints appear under their final names only once complete; when last.ckpt cannot be read (a disk that
filled up, a file cut short), --resume says so and continues from the newest readable step checkpoint.
Exit codes: 0 finished, 2 bad config or input (or the run folder is in use), 143 / 130 stopped by SIGTERM /
SIGINT (to the trainer or its whole process group) after saving last.ckpt.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import signal
import sys
import warnings
from pathlib import Path

from mmssl.cli import is_program

# Known noise of Lightning 2.6 on torch 2.14, each harmless for mmssl's runs (issue 19): silenced by exact
# message, so any other warning still shows.
NOISY_WARNINGS = (
    # Lightning's own _pytree.py builds torch's deprecated LeafSpec on every batch transfer (not our call)
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # the shard pipeline gives every worker its own equal share, so its __len__ is exact (data/module.py)
    (UserWarning, r"Your `IterableDataset` has `__len__` defined"),
)


class _NoTips(logging.Filter):
    """Drops Lightning's advertising ("💡 Tip: ... try installing litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_lightning() -> None:
    for category, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message, category)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTips())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cfg", help="config file, or a name in configs/ (e.g. mae_vitb)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="last",
        metavar="auto|PATH",
        help="continue the run: bare --resume needs <run dir>/checkpoints/last.ckpt; --resume auto continues "
        "from it when it exists and starts fresh otherwise (requeued jobs); --resume PATH continues from PATH",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.base_lr=3e-4"
    )
    args = parser.parse_intermixed_args(argv)
    if args.resume not in (None, "last", "auto") and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)  # `--resume key=value`: an override, not a checkpoint path
        args.resume = "last"
    return args


if is_program(__name__):  # --help and usage errors answer before the heavy imports below
    parse_args(None)

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from mmssl import checkpoints, factory, launch  # noqa: E402
from mmssl import config as C  # noqa: E402
from mmssl.callbacks import LastCheckpoint  # noqa: E402
from mmssl.data.shards import NoDecodableSamples  # noqa: E402
from mmssl.eval.masked import masked_report, reports_on  # noqa: E402

EXIT_SIGTERM = 128 + signal.SIGTERM  # 143, what a shell reports for a job killed by the signal
EXIT_SIGINT = 128 + signal.SIGINT  # 130


def count_parameters(model) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def print_config(cfg) -> int:
    """The resolved recipe as YAML, then its parameter count as a comment: needs none of the recipe's files."""
    try:
        with contextlib.redirect_stdout(sys.stderr):  # whatever building prints stays out of the YAML
            total, trainable = count_parameters(factory.build_objective(cfg))
        count = f"# {cfg.objective} objective: {total:,} parameters ({trainable:,} trainable)"
    except C.ConfigError:  # a value no run can use (e.g. backbone.img_size): refused as at the start of a run
        raise
    except Exception as e:  # a missing decoder or weights file must not stop the printing
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        count = f"# parameters: not counted ({type(e).__name__}: {reason})"
    print(OmegaConf.to_yaml(C.active(cfg)), end="")
    print(count)
    return 0


def checkpoint_to_resume(resume: str | None, out: Path) -> Path | None:
    """``--resume`` value -> the checkpoint to continue from (None: start fresh); ConfigError when unusable."""
    last = out / "checkpoints" / "last.ckpt"
    if resume is None:
        if last.is_file():
            raise C.ConfigError(
                f"{out} already holds a run; continue it with --resume (or --resume auto), or start another "
                "with name=... or out_dir=..."
            )
        return None
    if resume == "auto":
        return last if last.is_file() else None
    path = last if resume == "last" else Path(resume)
    if not path.is_file():
        raise C.ConfigError(
            f"--resume: no checkpoint at {path} (--resume auto starts fresh when there is none)"
        )
    return path


def readable_checkpoint(path: Path, out: Path) -> tuple[Path, dict]:
    """``path`` checked by mmssl's reader (weights_only; a pickle with code is refused), with its state-dict
    shapes. When it is this run's own last.ckpt and cannot be read, the newest readable checkpoint beside it,
    said on stderr; an explicit ``--resume PATH`` is never replaced."""
    ckpt_dir = out / "checkpoints"
    candidates = [path]
    if path.resolve() == (ckpt_dir / "last.ckpt").resolve():
        steps = [p for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt"]
        candidates += sorted(steps, key=lambda p: p.stat().st_mtime, reverse=True)
    found, ckpt, skipped = checkpoints.newest_readable(candidates)
    if skipped:
        print(
            f"warning: {skipped[0]}; resuming from {found} (step {ckpt.get('global_step', '?')}), the newest "
            "readable checkpoint, instead",
            file=sys.stderr,
        )
    return found, checkpoints.state_shapes(ckpt["state_dict"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_lightning()
    try:
        # devices / nodes from the launcher (or this machine), then the recipe's global batch by accumulation
        cfg, kept = C.keep_global_batch(launch.configure(C.load(args.cfg, args.overrides)))
    except (C.ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.print_config:
        try:
            return print_config(cfg)
        except C.ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:  # e.g. trainer.strategy=fsdp without CUDA GPUs, or nodes nothing will start: before any folder
        C.validate_machine(cfg)
        launch.check_nodes(cfg)
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if kept and launch.is_global_zero():
        print(f"mmssl: {kept}", file=sys.stderr)
    out = factory.run_dir(cfg)
    lock = launch.RunLock(out) if launch.is_global_zero() else None
    try:
        if lock is not None:
            lock.acquire()
        ckpt = checkpoint_to_resume(args.resume, out)
        shapes = None
        if ckpt is not None:
            ckpt, shapes = readable_checkpoint(ckpt, out)
    except (launch.RunFolderInUse, C.ConfigError, checkpoints.CheckpointError) as e:
        if lock is not None:
            lock.release()
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return train(cfg, out, ckpt, shapes)
    finally:
        if lock is not None:
            lock.release()


def train(cfg, out: Path, ckpt: Path | None, shapes: dict | None = None) -> int:
    last = out / "checkpoints" / "last.ckpt"
    # The same seed on every rank, so every rank builds the same initial weights; from the first training step
    # on, PretrainModule reseeds per (seed, rank, step) so each rank draws its own masks (lit.py).
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the seed is in config.yaml
    try:
        C.validate_machine(cfg)  # e.g. trainer.strategy=fsdp without CUDA GPUs, before any model or data work
        datamodule = factory.build_datamodule(cfg)
        plan = factory.plan(cfg, datamodule)
        # a bad model name or backbone.weights file names its key (ValueError); whole patches checked
        module = factory.build_module(cfg, plan)
    except (C.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if shapes is not None:  # another architecture: say so before Lightning's raw load_state_dict traceback
        try:
            checkpoints.check_state_fits(
                checkpoints.state_shapes(module.state_dict()),
                shapes,
                f"--resume {ckpt}",
                "the model this config builds (resume with the config the run was trained with: config.yaml "
                "in its run folder)",
            )
        except checkpoints.CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    trainer = factory.build_trainer(cfg, plan, objective=module.objective)
    if trainer.world_size != plan.world_size:  # the lr and schedule assume plan.world_size processes
        print(
            f"error: Lightning will train with {trainer.world_size} processes but the schedule was planned for "
            f"{plan.world_size} (trainer.devices x trainer.num_nodes); set trainer.devices / trainer.num_nodes",
            file=sys.stderr,
        )
        return 2
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(C.active(cfg), out / "config.yaml")
        total, trainable = count_parameters(module.objective)
        print(
            f"mmssl: {cfg.objective} in {out}: {total:,} parameters ({trainable:,} trainable); {plan.describe()}"
        )

    stopper = next(c for c in trainer.callbacks if isinstance(c, LastCheckpoint))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    except SIGTERMException:
        name = signal.Signals(stopper.signum or signal.SIGTERM).name
        print(
            f"mmssl: {name} at step {trainer.global_step}: saved {last}; continue with --resume",
            file=sys.stderr,
        )
        return 128 + (stopper.signum or signal.SIGTERM)
    except NoDecodableSamples as e:  # a corrupt shard set: an input error like a typo, without tracebacks
        print(f"error: {NoDecodableSamples.message_of(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # a full disk or quota
            raise
        print(
            f"error: {e} (at step {trainer.global_step}); checkpoints are written atomically, so the ones in "
            f"{last.parent} are complete: free some space and continue with --resume",
            file=sys.stderr,
        )
        return 1
    except SystemExit:  # Lightning's answer to a KeyboardInterrupt (SIGINT before training, or twice)
        if stopper.signum == signal.SIGINT:
            print(f"mmssl: SIGINT at step {trainer.global_step}: stopped without saving", file=sys.stderr)
            return EXIT_SIGINT
        raise
    if trainer.is_global_zero:
        heldout_report(cfg, out, module.objective)
        print(closing_summary(cfg, out, trainer))
    return 0


def heldout_report(cfg, out: Path, objective) -> None:
    """A masked-modelling run (MAE, MaskFeat) with ``data.val_shards`` ends with its held-out masked-patch MSE
    beside the no-model baselines of ``mmssl/eval/masked.py`` (as ``tools/masked_report.py``, same fixed masks),
    printed and written to <run dir>/masked_report.json. FSDP runs are left to tools/masked_report.py."""
    if not cfg.data.val_shards or not reports_on(objective) or cfg.trainer.strategy == "fsdp":
        return
    batches = factory.build_datamodule(cfg).val_dataloader()  # every val shard, whatever the world size
    report = masked_report(objective, batches, torch.Generator().manual_seed(0))
    (out / "masked_report.json").write_text(json.dumps(report) + "\n")
    print(
        f"mmssl: held-out masked-patch MSE {report['model']:.5f}: {report['below_constant']:.1%} below the best "
        f"constant ({report['constant']:.5f}), {report['below_copy']:.1%} below copying the nearest visible "
        f"patch ({report['copy']:.5f}); {out / 'masked_report.json'}"
    )


def closing_summary(cfg, out: Path, trainer: L.Trainer) -> str:
    """Where a finished run's results went (printed last, so it is what a user sees)."""
    ckpts = out / "checkpoints"
    steps = sorted(p.name for p in ckpts.glob("step*.ckpt"))
    lines = [f"mmssl: finished at step {trainer.global_step}; results in {out}/"]
    lines.append(f"  checkpoint  {ckpts / 'last.ckpt'}" + (f" (and {', '.join(steps)})" if steps else ""))
    lines.append(f"  config      {out / 'config.yaml'}")
    if trainer.logger is not None and trainer.logger.log_dir:
        lines.append(f"  metrics     {Path(trainer.logger.log_dir) / 'metrics.csv'}")
    pictures = sorted((out / "pictures").glob("*.png"))
    if pictures:
        last = "final.png" if (out / "pictures" / "final.png").is_file() else pictures[-1].name
        files = f"{len(pictures)} file" + "s" * (len(pictures) > 1)
        lines.append(f"  pictures    {out / 'pictures'}/ ({files}, the last: {last})")
    if (
        factory.spec_of(cfg).save_parts is not None
    ):  # files other tools load without Lightning (build_trainer)
        lines.append(f"  parts       {out / cfg.objective}/")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
