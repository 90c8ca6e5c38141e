"""tools/score_shards.py as two concurrent processes (ranks 0 and 1, two loader workers each, as torchrun would
start them): every sample of an uneven shard set is scored exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from curate_helpers import ROOT, shapes_shards, tiny_clip_checkpoint

from mmssl.eval.curate.store import read_scores


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_score_every_sample_exactly_once(tmp_path):
    spec, _ = shapes_shards(tmp_path / "data", 77, seed=0, per_shard=15)  # 6 shards: 15 x 5 + 2
    ckpt = tiny_clip_checkpoint(tmp_path / "clip.ckpt", spec, steps=0)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tools" / "score_shards.py"),
                spec,
                "--scorer",
                "clip_score",
                str(ckpt),
                "--out",
                str(tmp_path / "s"),
                "--batch-size",
                "8",
                "--num-workers",
                "2",
            ],
            env={**env, "RANK": str(rank), "WORLD_SIZE": "2"},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=500) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "rank 0/2: 3 shards" in outputs[0][0] and "rank 1/2: 3 shards" in outputs[1][0]
    keys = [r["key"] for r in read_scores(tmp_path / "s").rows]
    assert sorted(keys) == [f"train_{i:06d}" for i in range(77)]  # each exactly once
    for shard in range(6):  # rank r took shards r, r + 2, r + 4 (the evaluation split): 3 each, above
        summary = json.loads((tmp_path / "s" / f"train-{shard:06d}.json").read_text())
        assert summary["rows"] == (15 if shard < 5 else 2)
