"""Launchers and run folders: the processes torchrun or SLURM started, and one run per folder at a time.

Lightning picks its cluster environment from the process environment (``lightning/fabric/plugins/environments``:
``TorchElasticEnvironment`` first, since torchrun can run inside a SLURM job, then ``SLURMEnvironment``). When a
launcher started the processes, Lightning starts none itself: it takes rank and world size from the launcher
and only checks ``devices x num_nodes`` against it (``validate_settings``), and only when the strategy is
distributed; with one device each process would train alone. :func:`configure` reads the same variables so that
``trainer.devices`` / ``trainer.num_nodes``, and with them the world size behind the global batch, the lr and
the steps per epoch (``mmssl.config.world_size``), are what Lightning will run.

:class:`RunLock` keeps two runs out of one run folder: rank 0 holds ``fcntl.flock`` on ``<run>/run.lock`` for
the life of the run (the kernel releases it when the process dies, however it dies) and writes its host, pid
and SLURM job into the file, so a refusal can say who holds the folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mmssl.config import ConfigError

LOCK_NAME = "run.lock"


@dataclass(frozen=True)
class Launcher:
    """What an external launcher started: ``devices`` processes on each of ``num_nodes`` nodes."""

    name: str  # torchrun | SLURM
    world_size: int
    devices: int  # processes per node
    num_nodes: int
    rank: int
    source: str  # the variables these numbers come from, for messages


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value is None:
        if default is None:
            raise ConfigError(f"launcher environment: {key} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"launcher environment: {key}={value!r} is not an integer") from None


def detect(env: Mapping[str, str] | None = None) -> Launcher | None:
    """The launcher Lightning will see, or None (Lightning then starts any further processes itself)."""
    env = os.environ if env is None else env
    # torch.distributed.is_torchelastic_launched(): torchrun always sets TORCHELASTIC_RUN_ID
    if "TORCHELASTIC_RUN_ID" in env:
        world, local = _int(env, "WORLD_SIZE"), _int(env, "LOCAL_WORLD_SIZE")
        if local < 1 or world % local:
            raise ConfigError(
                f"torchrun: WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}; "
                "start the same --nproc_per_node on every node"
            )
        source = f"WORLD_SIZE={world}, LOCAL_WORLD_SIZE={local}"
        return Launcher("torchrun", world, local, world // local, _int(env, "RANK"), source)
    # SLURMEnvironment.detect(): SLURM_NTASKS set and the job is not named bash/interactive (a shell in an
    # allocation, where Lightning starts the processes itself)
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        ntasks = _int(env, "SLURM_NTASKS")
        if ntasks > 1 and "SLURM_NTASKS_PER_NODE" not in env:  # Lightning raises on this too
            raise ConfigError(
                f"SLURM: --ntasks={ntasks} without --ntasks-per-node; Lightning needs --nodes=N "
                "--ntasks-per-node=G (one task per GPU)"
            )
        per_node, nodes = _int(env, "SLURM_NTASKS_PER_NODE", ntasks), _int(env, "SLURM_NNODES", 1)
        source = f"SLURM_NTASKS={ntasks}, SLURM_NTASKS_PER_NODE={per_node}, SLURM_NNODES={nodes}"
        if per_node * nodes != ntasks:
            raise ConfigError(f"SLURM: {source}: tasks must be tasks per node x nodes")
        return Launcher("SLURM", ntasks, per_node, nodes, _int(env, "SLURM_PROCID"), source)
    return None


def configure(cfg: DictConfig, env: Mapping[str, str] | None = None) -> DictConfig:
    """``cfg`` with ``trainer.devices`` / ``trainer.num_nodes`` taken from the launcher when left at auto / 1;
    explicit values that disagree with it are refused, naming the key."""
    launcher = detect(env)
    if launcher is None:
        return cfg
    t, where = cfg.trainer, f"{launcher.name} started {launcher.source}"
    if t.devices != "auto" and t.devices != launcher.devices:
        raise ConfigError(
            f"config key 'trainer.devices': {t.devices}, but {where} ({launcher.devices} per node); "
            f"set trainer.devices=auto to follow the launcher, or launch {t.devices} per node"
        )
    if t.num_nodes not in (1, launcher.num_nodes):  # 1 is the default: it follows the launcher
        raise ConfigError(
            f"config key 'trainer.num_nodes': {t.num_nodes}, but {where} ({launcher.num_nodes} nodes); "
            f"set trainer.num_nodes={launcher.num_nodes} or start {t.num_nodes} nodes"
        )
    if launcher.world_size > 1 and t.strategy in ("ddp_spawn", "ddp_fork"):
        raise ConfigError(
            f"config key 'trainer.strategy': {t.strategy} starts processes itself, but {where}; "
            "use trainer.strategy=ddp (or auto, fsdp)"
        )
    return OmegaConf.merge(cfg, {"trainer": {"devices": launcher.devices, "num_nodes": launcher.num_nodes}})


def is_global_zero(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process will be global rank 0, known before the Trainer exists: the launcher's rank, else
    Lightning's own (``LightningEnvironment``: NODE_RANK or GROUP_RANK, and LOCAL_RANK, which Lightning sets
    in the processes it starts for ``ddp``)."""
    env = os.environ if env is None else env
    launcher = detect(env)
    if launcher is not None:
        return launcher.rank == 0
    node = _int(env, "NODE_RANK", _int(env, "GROUP_RANK", 0))
    return node == 0 and _int(env, "LOCAL_RANK", 0) == 0


class RunFolderInUse(RuntimeError):
    """Another run holds the run folder; the message says which and what to do."""


def _owner(env: Mapping[str, str]) -> dict:
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "SLURM_JOB_ID" in env:  # stable across requeues; SLURM_RESTART_COUNT tells the incarnations apart
        owner["slurm_job"] = env["SLURM_JOB_ID"]
        owner["slurm_restart"] = env.get("SLURM_RESTART_COUNT", "0")
    return owner


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class RunLock:
    """``<run>/run.lock``, held by rank 0 while a run writes into the folder.

    The kernel lock (``flock``) decides on this host: taking it means any earlier holder has exited. The file
    keeps the holder's host/pid (emptied on a clean exit), which settles the cases flock cannot: a holder on
    another host (NFS may or may not share flocks between hosts) is refused with instructions, unless it was an
    earlier incarnation of the same SLURM job (a requeued job keeps its id; the old one is gone).
    """

    def __init__(self, run_dir: str | Path, env: Mapping[str, str] | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.env = os.environ if env is None else env
        self._file = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # created if missing, never truncated before the lock is ours
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            kernel_lock = True
        except BlockingIOError:
            f.close()
            raise RunFolderInUse(self._refusal(self._read(), certain=True)) from None
        except OSError:  # a filesystem without flock (some Lustre/NFS mounts): the file alone decides
            kernel_lock = False
        holder = self._read()
        if holder and self._may_be_alive(holder, kernel_lock):
            f.close()
            raise RunFolderInUse(self._refusal(holder, certain=False))
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_owner(self.env)) + "\n")
        f.flush()
        os.fsync(f.fileno())
        self._file = f

    def release(self) -> None:
        """Marks the folder free (an empty lock file) and drops the kernel lock."""
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.close()  # closing the last descriptor releases the flock
        self._file = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _read(self) -> dict:
        try:
            text = self.path.read_text().strip()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {"host": "?", "pid": "?", "unreadable": str(self.path)}

    def _may_be_alive(self, holder: dict, kernel_lock: bool) -> bool:
        mine = _owner(self.env)
        if holder.get("slurm_job") and holder.get("slurm_job") == mine.get("slurm_job"):
            if holder.get("slurm_restart") != mine.get("slurm_restart"):
                return False  # an earlier incarnation of this requeued job
        if holder.get("host") == mine["host"]:
            # flock taken: every holder on this host has exited; without flock, ask the process table
            return not kernel_lock and isinstance(holder.get("pid"), int) and _pid_alive(holder["pid"])
        return True  # another host: nothing here can tell whether it still runs

    def _refusal(self, holder: dict, certain: bool) -> str:
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        if holder.get("started"):
            job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
            who += f" (started {holder['started']}{job})"
        verb = "holds it" if certain else "may still hold it"
        msg = f"run folder {self.run_dir} is in use: {who} {verb}. Choose another folder with name=... or out_dir=..."
        if not certain:
            msg += (
                f"; if that run has ended (check squeue, or ps on {holder.get('host', '?')}), delete {self.path} "
                "and start again"
            )
        return msg
