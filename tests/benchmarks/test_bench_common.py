"""benchmarks/common.py: the quiet-machine probe run_all.py uses must see other processes' CPU use (the load
average cannot tell it from the benchmark's own) and must not count this process's."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import run_all  # noqa: E402
from common import other_cpu_load  # noqa: E402


def test_a_busy_child_process_counts():
    spin = "import time\nt = time.time()\nprint('spinning', flush=True)\nwhile time.time() - t < 4: pass"
    busy = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline().strip() == "spinning"  # the child has started its loop
        assert other_cpu_load(1.0) > 0.6
    finally:
        busy.kill()
        busy.wait()


def test_this_process_does_not_count():
    quiet = other_cpu_load(0.5)  # whatever else runs on the machine
    stop = time.perf_counter() + 1.5

    def spin():
        while time.perf_counter() < stop:
            pass

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        seen = other_cpu_load(1.0)  # one core spinning in this process the whole second
    finally:
        worker.join()
    assert seen < quiet + 0.6, (seen, quiet)


def test_bench_args_need_exactly_one_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_:  # arguments meant for one benchmark must not reach the others
        run_all.main(["--only", "hog", "mae_step", "--bench-args", "--batch 32"])
    assert exit_.value.code == 2
    assert "--bench-args needs exactly one benchmark" in capsys.readouterr().err
