"""Every tool answers ``--help`` and usage errors before its heavy imports (issue 19, item 15: they took 9-27 s):
the tools parse their arguments at the top when they are the program (``mmssl.cli.is_program``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = sorted(p.stem for p in (ROOT / "tools").glob("*.py"))
HEAVY = ("torch", "lightning", "transformers", "timm", "open_clip")
# Runs a tool as the program would (``python tools/X.py ARGS``, or ``mmssl X ARGS`` through the console script's
# entry point) and reports its exit code and which heavy packages it imported.
PROBE = """
import json, runpy, sys
how, tool, *args = sys.argv[1:]
try:
    if how == "script":
        sys.argv = [tool, *args]
        runpy.run_path(tool, run_name="__main__")
    else:
        from mmssl import cli
        sys.exit(cli.main([tool, *args]))
except SystemExit as e:
    code = e.code
else:
    code = 0
print(json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def probe(how: str, tool: str, *args: str) -> tuple[dict, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-c", PROBE, how, tool, *args], env=env, capture_output=True, text=True, timeout=120,
        cwd=ROOT,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), elapsed


@pytest.mark.parametrize("tool", TOOLS)
def test_help_answers_without_heavy_imports(tool):
    report, elapsed = probe("script", f"tools/{tool}.py", "--help")
    assert report == {"code": 0, "heavy": []}, report
    assert elapsed < 10, f"{tool} --help took {elapsed:.1f} s"  # ~0.3 s here; generous for a loaded machine


def test_usage_errors_and_console_scripts_answer_early_too():
    report, _ = probe("script", "tools/export.py")  # the checkpoint argument is missing
    assert report == {"code": 2, "heavy": []}, report
    report, _ = probe("script", "tools/knn.py", "ckpt", "--val", "x", "--batch-size", "many")
    assert report == {"code": 2, "heavy": []}, report
    for args in (("pretrain", "--help"), ("linear_probe", "--help"), ("zero_shot", "--bogus")):
        report, _ = probe("cli", *args)
        assert report["heavy"] == [] and report["code"] == (2 if "--bogus" in args else 0), (args, report)


def test_imported_tools_do_not_parse_the_callers_arguments():
    # a test (or another tool) importing a tool must not have it read sys.argv: only the program parses early
    code = "import sys; sys.argv = ['pytest', '--weird']; from mmssl import cli; m = cli.load_tool('knn'); print(m.main)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "function main" in res.stdout, res.stderr[-2000:]
