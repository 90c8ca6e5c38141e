"""CLIP end to end through the real CLIs: pretraining on the shapes captions (tools/pretrain.py), then
tools/zero_shot.py (table + JSON) and tools/export.py (the image backbone as timm weights) on the checkpoint it
wrote. CLIP's gathered loss under 2-process DDP: tests/test_dist.py; the CLI under DDP:
tests/tools/test_pretrain_cli.py::test_two_process_ddp_on_uneven_shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tool_loader import ROOT, tool

TINY_CLIP = [
    "backbone.img_size=32", "backbone.patch_size=8", "backbone.depth=1", "backbone.embed_dim=64",
    "backbone.num_heads=2", "clip.embed_dim=32", "clip.text_cfg={context_length: 16, width: 32, heads: 2, layers: 1}",
    "data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=50", "data.val_shards=null",
    "trainer.max_steps=4", "trainer.log_every_n_steps=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, demo_root):
    out = tmp_path_factory.mktemp("clip")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, str(ROOT / "tools" / "pretrain.py"), "--cfg", "clip_demo", *TINY_CLIP,
           f"out_dir={out}", "name=run"]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "run" / "rank0.json").read_text())["global_step"] == 4
    return out / "run"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero_shot_tool_writes_table_and_json(clip_run, capsys):
    run = clip_run
    out = run / "zs.json"
    code = tool("zero_shot").main([str(run / "checkpoints" / "last.ckpt"), "--shards", "demo:shapes/heldout",
                                   "--templates", "shapes", "--batch-size", "200", "--num-workers", "0",
                                   "--json", str(out)])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "5 present classes" in text and "image_to_text (exact)" in text
    result = json.loads(out.read_text())
    zs = result["zero_shot"]
    assert result["samples"] == 600 and zs["classes"] == 30 and len(zs["present"]) == 5
    assert zs["chance_present"] == pytest.approx(0.2) and len(zs["templates"]) == 4
    for acc in (zs["all_classes"]["top1"], zs["present_classes"]["top1"]):
        assert 0 <= acc <= 1
    rec = result["retrieval"]["same_caption"]
    assert rec["image_to_text@1"] <= rec["image_to_text@5"] <= rec["image_to_text@10"]
    # an unknown template preset names itself
    bad = tool("zero_shot").main([str(run / "checkpoints" / "last.ckpt"), "--shards", "demo:shapes/heldout",
                                  "--templates", "nonsense"])  # fmt: skip
    assert bad == 2 and "--templates 'nonsense'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_clip_image_backbone_exports_to_timm(clip_run, capsys):
    run = clip_run
    code = tool("export").main([str(run / "checkpoints" / "last.ckpt"), "--out", str(run / "exp"), "--no-hf"])
    assert code == 0, capsys.readouterr().err
    assert (run / "exp.safetensors").is_file()
    assert json.loads((run / "exp.json").read_text())["objective"] == "clip"
    # and the whole model, both towers, as open_clip loads it (checked by the tool to 1e-5 against mmssl's)
    assert '"open_clip": ' in capsys.readouterr().out
    assert (run / "exp_open_clip" / "open_clip_config.json").is_file()
