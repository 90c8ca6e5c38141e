"""tools/pretrain.py end to end: learning on held-out images, SIGTERM + resume, NaN stop, 2-process DDP on
uneven shards (the one run of the path every objective shares), and bad input. The CLI runs in a subprocess
(Lightning's ddp strategy re-launches the command)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MAE_TINY_RUN as TINY
from conftest import ROOT, cli, load_ckpt, metrics, wait_for  # noqa: F401 (fixtures: demo_root, uneven_shards)
from mask_log_worker import drawn_mask, masks

from mmssl import config as C
from mmssl.data import demo
from mmssl.data.shards import SampleDecoder, eval_pipeline
from mmssl.data.transforms import eval_view
from mmssl.factory import build_objective
from mmssl.optim import warmup_cosine

sys.path.insert(0, str(ROOT / "tools"))
import pretrain  # noqa: E402


@pytest.mark.slow
def test_demo_run_learns_on_held_out_images(tmp_path, demo_root):
    run = tmp_path / "learn"
    args = [*TINY, "backbone.img_size=64", "optim.lr=2e-3", "optim.warmup_steps=15", "trainer.max_steps=150",
            f"out_dir={tmp_path}", "name=learn"]  # fmt: skip
    res = cli(args, demo_root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "pictures" / "final.png").stat().st_size > 10_000
    assert (run / "config.yaml").is_file() and (run / "rank0.json").is_file()

    ckpt = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 150
    cfg = C.load(str(run / "config.yaml"))
    objective = build_objective(cfg).eval()
    objective.load_state_dict({k.removeprefix("objective."): v for k, v in ckpt["state_dict"].items()})

    urls = sorted(str(p) for p in Path(demo.ensure_demo("photos", demo_root)).glob("val-*.tar"))
    pipeline = eval_pipeline(urls, eval_view(64), 64, rank=0, world_size=1, decoder=SampleDecoder())
    ours, trivial = [], []
    torch.manual_seed(0)
    with torch.no_grad():
        for batch in pipeline:
            out = objective(batch)
            target = objective.target(batch["image"])
            ours.append(out["loss"].item())
            trivial.append(((target**2).mean(-1) * out["mask"]).sum().item() / out["mask"].sum().item())
    ours_mean, trivial_mean = sum(ours) / len(ours), sum(trivial) / len(trivial)
    assert trivial_mean == pytest.approx(1.0, abs=0.05)  # predicting 0 for normalised targets
    assert ours_mean < 0.8 * trivial_mean, (ours_mean, trivial_mean)
    val = [float(r["val/loss"]) for r in metrics(run) if r.get("val/loss")]
    assert val and val[-1] < 0.8 * trivial_mean


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_process_group_saves_and_resume_continues_step_and_lr(tmp_path, demo_root, signum):
    """timeout, SLURM and Kubernetes signal the whole process group, Ctrl-C too: the data workers get the signal
    as well and must not take the run down before the main process has saved last.ckpt."""
    run = tmp_path / "resume"
    args = [*TINY, f"out_dir={tmp_path}", "name=resume", "trainer.max_steps=60", "trainer.ckpt_every_n_steps=10",
            "optim.warmup_steps=20", "data.val_shards=null", "data.num_workers=2"]  # fmt: skip
    env = {**os.environ, "MMSSL_DATA": demo_root, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tools" / "pretrain.py"), "--cfg", "mae_demo", *args]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert wait_for(run / "checkpoints" / "step0000010.ckpt", proc), proc.communicate()[1][-3000:]
    workers = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) >= 3, workers  # the trainer and its two data workers share the group
    os.killpg(proc.pid, signum)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("no exit within 120 s of the signal: " + proc.communicate()[1][-3000:])
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert f"mmssl: {signal.Signals(signum).name} at step" in err
    stopped = load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"]
    assert 10 <= stopped < 60
    if signum == signal.SIGINT:
        return  # the resume below is the same for both signals

    res = cli([*args, "--resume"], demo_root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 60
    resumed = [r for r in metrics(run, version=1) if r.get("train/lr")]
    assert int(resumed[0]["step"]) == stopped  # the first step after the checkpoint, not step 0
    peak = C.learning_rate(C.load("mae_demo", args))
    for row in resumed:
        expected = peak * warmup_cosine(int(row["step"]), 20, 60)
        assert float(row["train/lr"]) == pytest.approx(expected, rel=1e-5, abs=1e-12)


@pytest.mark.slow
def test_non_finite_loss_stops_without_saving_nan_weights(tmp_path, demo_root):
    args = [*TINY, f"out_dir={tmp_path}", "name=nan", "trainer.max_steps=20", "trainer.ckpt_every_n_steps=1",
            "optim.lr=1e30", "optim.warmup_steps=0", "data.val_shards=null"]  # fmt: skip
    res = cli(args, demo_root)
    assert res.returncode != 0
    assert "non-finite loss or gradient" in res.stderr
    ckpts = list((tmp_path / "nan" / "checkpoints").glob("*.ckpt"))
    for path in ckpts:
        assert all(torch.isfinite(v).all() for v in load_ckpt(path)["state_dict"].values()), path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_ddp_on_uneven_shards(tmp_path, demo_root, uneven_shards):
    """The one 2-process run of the path every objective shares: tools/pretrain.py re-launched by Lightning's ddp
    strategy (gloo, CPU) on the shard data module, here with MAE and the online evaluation callbacks. What differs
    per objective under DDP (gathered or exchanged negatives, the online probe's gradient average) is checked
    in-process: tests/test_dist.py, tests/eval/test_online.py."""
    train = "::".join(f"{uneven_shards}/train{i}-000000.tar" for i in range(3))
    val = "::".join(f"{uneven_shards}/val{i}-000000.tar" for i in range(3))
    args = [*TINY, f"out_dir={tmp_path}", "name=ddp", "data.batch_size=4", f"data.train_shards={train}",
            f"data.val_shards={val}", "trainer.max_steps=12", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.strategy=ddp", "trainer.ddp_timeout_s=60", "eval.online_probe=true", "eval.num_classes=10",
            "eval.online_lr=1e-2", "eval.knn_every_n_epochs=1", f"eval.knn_train_shards={train}",
            f"eval.knn_val_shards={val}"]  # fmt: skip
    logs = tmp_path / "masks"
    logs.mkdir()
    env = {**os.environ, "MASK_LOG_DIR": str(logs), "MMSSL_DATA": demo_root,
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    cmd = [sys.executable, str(ROOT / "tests" / "mask_log_worker.py"), "--cfg", "mae_demo", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world size 2, global batch 8" in res.stdout
    # uneven shards (80 samples in 5 + 17 + 58): both ranks still run the same number of batches, no hang
    run = tmp_path / "ddp"
    reports = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in reports] == [12, 12]
    assert reports[0]["batches"] == reports[1]["batches"] == 12
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 12
    assert (run / "pictures" / "final.png").is_file()  # drawn by rank 0 alone

    # every rank draws its own masks, each the one its (seed, global rank, step, batch) stream gives
    cfg = C.load("mae_demo", args)
    patches = (cfg.backbone.img_size // cfg.backbone.patch_size) ** 2
    drawn = masks(logs)
    assert sorted(drawn) == [(r, s) for r in (0, 1) for s in range(12)]
    for (rank, step), row in drawn.items():
        expected = drawn_mask(cfg.seed, rank, step, row["batch_idx"], 4, patches, cfg.mae.mask_ratio)
        assert row["mask"] == expected, (rank, step)
    assert len({str(row["mask"]) for row in drawn.values()}) == 24  # no two ranks or steps share one

    # the online probe (gradients averaged over ranks) and the kNN monitor ran and logged
    rows = metrics(run)
    assert any(r.get("train/online_top1") for r in rows) and any(r.get("val/knn_top1") for r in rows)


def test_print_config_shows_recipe_and_reference_size(capsys):
    assert pretrain.main(["--cfg", "mae_vitb", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "mask_ratio: 0.75" in out and "max_epochs: 800" in out and "warmup_epochs: 40.0" in out
    assert "111,907,840 parameters" in out


def test_config_typo_exits_2_naming_the_key(capsys):
    assert pretrain.main(["--cfg", "mae_demo", "optim.wieght_decay=0.1"]) == 2
    assert "optim.wieght_decay" in capsys.readouterr().err


def test_shard_pattern_matching_nothing_exits_2_naming_it(tmp_path, capsys):
    args = ["--cfg", "mae_demo", f"out_dir={tmp_path}", f"data.train_shards={tmp_path}/none-{{000..009}}.tar"]
    assert pretrain.main(args) == 2
    err = capsys.readouterr().err
    assert "data.train_shards" in err and "none-" in err


def test_existing_run_needs_resume(tmp_path, capsys):
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert pretrain.main(["--cfg", "mae_demo", f"out_dir={tmp_path}", "name=r"]) == 2
    assert "--resume" in capsys.readouterr().err
