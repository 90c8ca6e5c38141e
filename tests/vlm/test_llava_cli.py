"""LLaVA end to end through the CLIs, on shapes shards written here: a tiny decoder (tools/make_decoder.py),
stage 1 and stage 2 (tools/pretrain.py), then answers from the saved parts alone (tools/chat.py), offline."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmssl.data import shapes
from mmssl.data.demo import encode
from mmssl.data.shards import write_shards
from mmssl.vlm.parts import load_parts

ROOT = Path(__file__).resolve().parents[2]
TINY = [  # a 2-block ViT (16 image tokens) and small batches: seconds per stage on CPU
    "backbone.embed_dim=32",
    "backbone.depth=2",
    "backbone.num_heads=2",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.shuffle_buffer=16",
    "data.val_shards=null",
    "optim.warmup_steps=1",
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
]


def tool(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # any attempt to reach the hub fails instead of downloading
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [sys.executable, str(ROOT / "tools" / name), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, f"{name} {args}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
def test_two_stages_and_chat_through_the_clis(tmp_path):
    data = tmp_path / "shapes"
    rows = shapes.samples("train", 48, seed=0)
    write_shards(
        (
            {"__key__": k, "jpg": encode(img), "txt": cap, "cls": c, "json": meta}
            for k, img, cap, c, meta in rows
        ),
        data,
        maxcount=24,
    )
    shards = str(data / "shard-{000000..000001}.tar")
    tool(
        "make_decoder.py",
        "--texts",
        shards,
        "--out",
        str(tmp_path / "llm"),
        "--hidden-size",
        "32",
        "--heads",
        "2",
    )

    common = [
        *TINY,
        f"llava.decoder={tmp_path / 'llm'}",
        f"data.train_shards={shards}",
        f"out_dir={tmp_path}",
    ]
    tool("pretrain.py", "--cfg", "llava_demo_stage1", *common, "name=s1")
    with open(tmp_path / "s1" / "logs" / "version_0" / "metrics.csv") as f:
        speeds = [r for r in csv.DictReader(f) if r.get("train/tokens_per_s")]
    assert len(speeds) == 2 and all(float(r["train/images_per_s"]) > 0 for r in speeds)  # steps 2 and 3
    s1 = tmp_path / "s1" / "llava"
    manifest = json.loads((s1 / "llava.json").read_text())
    assert manifest["decoder"] == str((tmp_path / "llm").resolve())  # frozen decoder: referenced, not copied
    assert manifest["vision"]["layer"] == -2 and manifest["prompt"]["conversation"] == "plain"

    stage2 = [f"llava.vision={s1}", f"llava.projector_weights={s1 / 'projector.safetensors'}", "name=s2"]
    tool("pretrain.py", "--cfg", "llava_demo_stage2", *common, *stage2)
    s2 = tmp_path / "s2" / "llava"
    assert (s2 / "decoder" / "config.json").is_file()  # the trained decoder travels with the parts
    # the very encoder of stage 1 ...
    for name, w in load_file(str(s1 / "vision.safetensors")).items():
        torch.testing.assert_close(load_file(str(s2 / "vision.safetensors"))[name], w, msg=name)
    # ... and stage 1's projector, moved by only 3 AdamW steps at lr 1e-3 (a fresh one differs by ~0.1)
    p1, p2 = load_file(str(s1 / "projector.safetensors")), load_file(str(s2 / "projector.safetensors"))
    drift = max((p2[k] - p1[k]).abs().max().item() for k in p1)
    assert 0 < drift < 0.01, drift

    image = tmp_path / "q.png"
    next(iter(shapes.samples("heldout", 1, seed=3)))[1].save(image)
    report = tmp_path / "eval.json"
    question = ["--prompt", "What color is the shape?", "--max-new-tokens", "3"]
    res = tool(
        "chat.py",
        str(s2),
        "--image",
        str(image),
        *question,
        "--eval",
        shards,
        "--limit",
        "8",
        "--json",
        str(report),
    )
    # the CLI's answer is the one the saved parts give in this process (an untrained model may answer "")
    sys.path.insert(0, str(ROOT / "tools"))
    import chat

    expected = chat.answer(load_parts(s2), str(image), "What color is the shape?", max_new_tokens=3)
    assert res.stdout.splitlines()[0].strip() == expected
    result = json.loads(report.read_text())
    assert result["all"]["total"] >= 8 and 0 < result["all"]["chance"] < 1
    assert set(result) - {"all"} <= {"color", "shape", "position", "size"}
