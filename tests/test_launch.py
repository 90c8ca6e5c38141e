"""Launchers, run-folder locks, requeue-friendly resume and --print-config (mmssl/launch.py, tools/pretrain.py,
tools/slurm/pretrain.sbatch). The launcher numbers are checked against Lightning's own cluster environments and
a real Trainer; the end-to-end tests run torchrun (2 processes, gloo) and the SLURM script with stand-ins for
srun and scontrol."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import wait_for
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.strategies import DDPStrategy
from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import OmegaConf

from mmssl import config as C
from mmssl import factory, launch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import pretrain  # noqa: E402

LAUNCH_VARS = re.compile(
    r"^(SLURM_\w+|TORCHELASTIC_\w+|WORLD_SIZE|LOCAL_WORLD_SIZE|RANK|LOCAL_RANK|GROUP_RANK|NODE_RANK)$"
)
TINY = ["backbone.img_size=32", "backbone.depth=2", "backbone.embed_dim=64", "backbone.num_heads=4",
        "mae.decoder_embed_dim=64", "mae.decoder_depth=1", "mae.decoder_num_heads=4", "data.batch_size=8",
        "data.num_workers=0", "data.shuffle_buffer=100", "data.val_shards=null", "trainer.precision=32-true",
        "trainer.log_every_n_steps=1", "trainer.accelerator=cpu"]  # fmt: skip

TORCHRUN_2 = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "1",
              "LOCAL_RANK": "1", "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}  # fmt: skip
TORCHRUN_2x2 = {**TORCHRUN_2, "WORLD_SIZE": "4", "RANK": "3", "GROUP_RANK": "1"}
SLURM_2x2 = {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "mae"}  # fmt: skip


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not LAUNCH_VARS.match(k)}


@pytest.fixture
def env(monkeypatch):
    """os.environ without launcher variables; returns a setter for a launcher's."""
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # a Trainer for rank 1 sets it globally
    for key in list(os.environ):
        if LAUNCH_VARS.match(key):
            monkeypatch.delenv(key)

    def set_env(values: dict) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return set_env


def tiny(*overrides: str):
    return C.load("mae_demo", [*TINY, *overrides])


# --- launchers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, lightning_env, world, devices, nodes",
    [
        (TORCHRUN_2, TorchElasticEnvironment, 2, 2, 1),
        (TORCHRUN_2x2, TorchElasticEnvironment, 4, 2, 2),
        (SLURM_2x2, SLURMEnvironment, 4, 2, 2),
        ({**SLURM_2x2, **TORCHRUN_2}, TorchElasticEnvironment, 2, 2, 1),  # torchrun inside a SLURM job
    ],
    ids=["torchrun", "torchrun-2-nodes", "srun-2-nodes", "torchrun-in-slurm"],
)
def test_devices_follow_the_launcher_as_lightning_runs_it(
    tmp_path, env, values, lightning_env, world, devices, nodes
):
    env(values)
    cfg = launch.configure(tiny("trainer.devices=auto", f"out_dir={tmp_path}"))
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, C.world_size(cfg)) == (devices, nodes, world)
    assert C.global_batch(cfg) == 8 * world
    assert C.learning_rate(cfg) == pytest.approx(
        4e-3 * 8 * world / 256
    )  # mae_demo base_lr x global batch / 256

    # A real Trainer, built the way tools/pretrain.py builds it, runs the same world: Lightning's environment
    # takes rank and world size from the launcher and checks devices x num_nodes against it.
    plan = factory.Plan(C.world_size(cfg), C.global_batch(cfg), C.learning_rate(cfg), 10, 10, 0)
    trainer = factory.build_trainer(cfg, plan)
    environment = trainer.strategy.cluster_environment
    assert type(environment) is lightning_env and environment.creates_processes_externally
    environment.validate_settings(trainer.num_devices, trainer.num_nodes)  # raises on a mismatch
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.world_size == world and trainer.global_rank == launch.detect().rank
    if lightning_env is SLURMEnvironment:
        assert not environment.auto_requeue  # one scheme: SIGTERM -> last.ckpt -> exit 143 -> sbatch requeues


def test_without_the_launcher_values_each_process_would_train_alone(tmp_path, env):
    """The bug this module fixes: devices: 1 under torchrun gave two world-size-1 runs (mae_demo said so)."""
    env(TORCHRUN_2)
    cfg = tiny(f"out_dir={tmp_path}", "trainer.devices=1")  # as the recipe said, not configured
    trainer = factory.build_trainer(cfg, factory.Plan(1, 8, 1e-4, 10, 10, 0))
    assert trainer.world_size == 1 != launch.detect().world_size
    with pytest.raises(C.ConfigError, match=r"'trainer\.devices': 1, but torchrun started WORLD_SIZE=2"):
        launch.configure(cfg)


def test_launcher_mismatches_are_refused_naming_the_key(env):
    env(SLURM_2x2)
    with pytest.raises(C.ConfigError, match=r"'trainer\.devices': 8, .*SLURM_NTASKS_PER_NODE=2"):
        launch.configure(C.load("mae_vitb", ["trainer.devices=8"]))  # as the paper: 8 GPUs per node
    with pytest.raises(C.ConfigError, match=r"'trainer\.num_nodes': 8, .*\(2 nodes\)"):
        launch.configure(C.load("mae_vitb", ["trainer.num_nodes=8"]))  # ... and 8 nodes
    cfg = launch.configure(C.load("mae_vitb", ["trainer.devices=auto", "trainer.num_nodes=2"]))
    assert C.world_size(cfg) == 4
    with pytest.raises(C.ConfigError, match=r"'trainer\.strategy': ddp_spawn"):
        launch.configure(tiny("trainer.devices=auto", "trainer.strategy=ddp_spawn"))
    env({"SLURM_NTASKS": "5"})
    with pytest.raises(C.ConfigError, match="SLURM_NTASKS=5, SLURM_NTASKS_PER_NODE=2, SLURM_NNODES=2"):
        launch.detect()


def test_interactive_slurm_and_plain_runs_are_left_alone(env):
    assert launch.detect() is None and launch.configure(tiny()) == tiny()
    env({**SLURM_2x2, "SLURM_JOB_NAME": "interactive"})  # salloc shell: Lightning starts the processes itself
    assert launch.detect() is None and not SLURMEnvironment.detect()


@pytest.mark.parametrize(
    "values, zero",
    [({}, True), (TORCHRUN_2, False), ({**TORCHRUN_2, "RANK": "0", "LOCAL_RANK": "0"}, True),
     ({**SLURM_2x2, "SLURM_PROCID": "3"}, False), (SLURM_2x2, True),
     ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False),  # a process Lightning's ddp started
     ({"NODE_RANK": "1"}, False)],
)  # fmt: skip
def test_global_rank_zero_is_known_before_the_trainer(env, values, zero):
    env(values)
    assert launch.is_global_zero() is zero


# --- run folder lock ---------------------------------------------------------------------------------------

HOLDER = """
import sys
from mmssl.launch import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
sys.stdin.read()  # holds the lock until killed, or until the test's end of the pipe closes
"""


@pytest.fixture
def holder(tmp_path):
    """Another process that holds the lock on tmp_path/run until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "run")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**clean_env(), "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_run_keeps_others_out_and_its_death_frees_the_folder(tmp_path, env, holder):
    with pytest.raises(launch.RunFolderInUse) as refused:
        launch.RunLock(tmp_path / "run").acquire()
    msg = str(refused.value)
    assert str(tmp_path / "run") in msg and f"pid {holder.pid} on host {socket.gethostname()}" in msg
    assert "name=" in msg and "out_dir=" in msg and "delete" not in msg  # alive for sure: do not delete
    holder.send_signal(signal.SIGKILL)  # no clean-up runs: the file still names the dead holder
    holder.wait()
    assert json.loads((tmp_path / "run" / launch.LOCK_NAME).read_text())["pid"] == holder.pid
    with launch.RunLock(tmp_path / "run") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert lock.path.read_text() == ""  # released: the folder is free


def test_cli_refuses_a_folder_in_use(tmp_path, env, holder, capsys):
    assert pretrain.main(["--cfg", "mae_demo", f"out_dir={tmp_path}", "name=run", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert f"run folder {tmp_path / 'run'} is in use" in err and "name=..." in err and "out_dir=..." in err


def test_a_lock_from_another_host_needs_a_person_unless_it_is_this_requeued_job(tmp_path, env):
    path = tmp_path / "run" / launch.LOCK_NAME
    path.parent.mkdir()
    other = {
        "host": "node-a",
        "pid": 99,
        "started": "2026-01-01 00:00:00",
        "slurm_job": "4242",
        "slurm_restart": "0",
    }
    path.write_text(json.dumps(other))
    with pytest.raises(
        launch.RunFolderInUse, match=rf"node-a .*may still hold it.*delete {re.escape(str(path))}"
    ):
        launch.RunLock(path.parent).acquire()
    env({**SLURM_2x2, "SLURM_RESTART_COUNT": "0"})  # the same incarnation of the job (another step): refused
    with pytest.raises(launch.RunFolderInUse):
        launch.RunLock(path.parent).acquire()
    env({"SLURM_RESTART_COUNT": "1"})  # the requeued job: the earlier incarnation is gone
    with launch.RunLock(path.parent) as lock:
        assert json.loads(lock.path.read_text())["slurm_restart"] == "1"


# --- resume -----------------------------------------------------------------------------------------------


def test_resume_values(tmp_path):
    assert pretrain.parse_args(["--cfg", "x"]).resume is None
    assert pretrain.parse_args(["--cfg", "x", "--resume"]).resume == "last"
    args = pretrain.parse_args(["--cfg", "x", "a=1", "--resume", "auto", "b=2"])
    assert (args.resume, args.overrides) == ("auto", ["a=1", "b=2"])
    args = pretrain.parse_args(["--cfg", "x", "--resume", "trainer.max_steps=4"])  # an override, not a path
    assert (args.resume, args.overrides) == ("last", ["trainer.max_steps=4"])

    last = tmp_path / "checkpoints" / "last.ckpt"
    assert pretrain.checkpoint_to_resume(None, tmp_path) is None
    assert pretrain.checkpoint_to_resume("auto", tmp_path) is None  # requeue before any checkpoint: fresh
    for value in ("last", str(tmp_path / "step5.ckpt")):
        with pytest.raises(C.ConfigError, match="no checkpoint at"):
            pretrain.checkpoint_to_resume(value, tmp_path)
    last.parent.mkdir()
    last.write_bytes(b"")
    assert pretrain.checkpoint_to_resume("auto", tmp_path) == last
    assert pretrain.checkpoint_to_resume("last", tmp_path) == last
    assert pretrain.checkpoint_to_resume(str(last), tmp_path) == last
    with pytest.raises(C.ConfigError, match=r"already holds a run; continue it with --resume .*name=\.\.\."):
        pretrain.checkpoint_to_resume(None, tmp_path)


# --- --print-config ----------------------------------------------------------------------------------------

# linprobe_* and finetune_* belong to tools/linear_probe.py and tools/finetune.py (tests/config/test_validation.py)
RECIPES = sorted(
    p.stem for p in (ROOT / "configs").glob("*.yaml") if not p.stem.startswith(("linprobe_", "finetune_"))
)


@pytest.mark.parametrize("recipe", RECIPES)
def test_print_config_is_yaml_for_every_recipe_without_its_files(recipe, tmp_path, monkeypatch, env, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/ folder: LLaVA's stage-1 parts, decoders and weights are absent
    assert pretrain.main(["--cfg", recipe, "--print-config"]) == 0
    out = capsys.readouterr().out
    here = C.keep_global_batch(launch.configure(C.load(recipe)))[0]  # trainer.global_batch: accumulation set
    assert yaml.safe_load(out) == OmegaConf.to_container(C.active(here))
    lines = out.rstrip("\n").splitlines()
    assert all(not line.startswith("#") for line in lines[:-1])
    count = re.fullmatch(r"# \w+ objective: ([\d,]+) parameters \(([\d,]+) trainable\)", lines[-1])
    if recipe.startswith("llava"):  # every LLaVA recipe needs a decoder folder (or stage 1's parts)
        assert re.fullmatch(r"# parameters: not counted \((FileNotFoundError|ConfigError): .+\)", lines[-1])
        assert re.search(r"llava\.\w+=", lines[-1])  # the reason names the key whose file is missing
    else:
        assert count and int(count[1].replace(",", "")) > 0, lines[-1]


# --- end to end -------------------------------------------------------------------------------------------


def metrics(run: Path, version: int) -> list[dict]:
    with open(run / "logs" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def torchrun_env() -> dict:
    return {**clean_env(), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def torchrun(args: list[str]) -> list[str]:
    """tools/pretrain.py on 2 processes started by torchrun on this machine."""
    torchrun = Path(sys.executable).parent / "torchrun"
    return [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--standalone",
        "tools/pretrain.py",
        "--cfg",
        "mae_demo",
        *args,
    ]


@pytest.mark.slow
def test_torchrun_two_processes_make_one_world_size_2_run(tmp_path):
    args = [*TINY, "trainer.devices=auto", "trainer.max_steps=4", "trainer.ddp_timeout_s=60",
            f"out_dir={tmp_path}", "name=run"]  # fmt: skip
    res = subprocess.run(
        torchrun(args), env=torchrun_env(), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    reports = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["global_step"]) for r in reports] == [(0, 4), (1, 4)]
    plans = re.findall(r"world size (\d+), global batch (\d+), lr ([\d.e-]+)", res.stdout)
    assert len(plans) == 1, res.stdout  # one run, announced once by rank 0
    world, batch, lr = plans[0]
    assert (world, batch) == ("2", "16") and float(lr) == pytest.approx(4e-3 * 16 / 256, rel=1e-2)
    assert (tmp_path / "run" / launch.LOCK_NAME).read_text() == ""


def children(pid: int) -> list[int]:
    """Processes whose parent is pid (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def launcher_rank(pid: int) -> int:
    env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
    return int(env["RANK"])


@pytest.mark.slow
def test_sigterm_to_one_torchrun_rank_stops_every_rank_at_one_saved_step(tmp_path):
    """Lightning 2.6's SIGTERM handler broadcast from inside the handler on the signalled rank only, which hung
    this run (4 times in 5 before mmssl.lit.LastCheckpoint replaced the handler)."""
    args = [*TINY, "trainer.devices=auto", "trainer.max_steps=300", "trainer.ckpt_every_n_steps=2",
            "trainer.ddp_timeout_s=60", f"out_dir={tmp_path}", "name=run"]  # fmt: skip
    proc = subprocess.Popen(torchrun(args), env=torchrun_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    first = tmp_path / "run" / "checkpoints" / "step*.ckpt"  # step 2's is replaced by step 4's within ~0.1 s
    assert wait_for(first, proc), proc.communicate()[1][-3000:]
    rank1 = next(pid for pid in children(proc.pid) if launcher_rank(pid) == 1)
    os.kill(rank1, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("hung after SIGTERM to rank 1: " + proc.communicate()[1][-3000:])
    stops = re.findall(r"mmssl: SIGTERM at step (\d+): saved", err)
    assert len(stops) == 2 and stops[0] == stops[1], err[-3000:]  # both ranks, one step
    assert "exitcode: 143" in err  # torchrun itself reports its workers' failure with 1
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == int(stops[0]) >= 2


FAKE_SRUN = """#!/bin/bash
while [[ "$1" == -* ]]; do shift; done   # srun's own options
echo $$ > "$FAKE_DIR/task.pid"
export SLURM_NTASKS=1 SLURM_NTASKS_PER_NODE=1 SLURM_NNODES=1 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$FAKE_DIR/scontrol.log"
"""


@pytest.mark.slow
def test_sbatch_script_requeues_after_sigterm_and_resumes(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    env = {**clean_env(), "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable,
           "PYTHONPATH": str(ROOT), "FAKE_DIR": str(fake), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "mae",
           "SLURM_RESTART_COUNT": "0"}  # fmt: skip
    args = [*TINY, "trainer.max_steps=40", "trainer.ckpt_every_n_steps=5", "optim.warmup_steps=10",
            f"out_dir={tmp_path}"]  # fmt: skip
    cmd = ["bash", str(ROOT / "tools" / "slurm" / "pretrain.sbatch"), "--cfg", "mae_demo", *args]
    run = tmp_path / "mae-4242"  # name=<job name>-<job id>: the same folder in every incarnation

    # First incarnation: no checkpoint, so --resume auto starts fresh; SIGTERM (time limit) after step 5.
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(run / "checkpoints" / "step0000005.ckpt", proc), proc.communicate()[1][-3000:]
    os.kill(int((fake / "task.pid").read_text()), signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == pretrain.EXIT_SIGTERM, err[-3000:]
    assert (fake / "scontrol.log").read_text() == "requeue 4242\n"
    assert "requeueing job 4242" in out
    stopped = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "global_step"
    ]
    assert 5 <= stopped < 40

    # As if the requeued job's first incarnation had been killed hard on another node: the lock names it.
    lock = {"host": "node-a", "pid": 1, "slurm_job": "4242", "slurm_restart": "0"}
    (run / launch.LOCK_NAME).write_text(json.dumps(lock))

    # Second incarnation (SLURM_RESTART_COUNT=1): the same command resumes from last.ckpt and finishes.
    res = subprocess.run(cmd, env={**env, "SLURM_RESTART_COUNT": "1"}, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert (fake / "scontrol.log").read_text() == "requeue 4242\n"  # finished: no second requeue
    resumed = [r for r in metrics(run, 1) if r.get("train/lr")]
    assert int(resumed[0]["step"]) == stopped and int(resumed[-1]["step"]) == 39
    assert json.loads((run / "rank0.json").read_text())["global_step"] == 40
    assert (run / launch.LOCK_NAME).read_text() == ""
