"""iGPT end to end on the real digits: tools/fit_palette.py, then pretraining through tools/pretrain.py, then
tools/complete.py, and the evaluation tools every encoder goes through (tools/linear_probe.py, tools/knn.py) on
its checkpoint; export to timm is refused with one message. The CLI under 2-process DDP on uneven shards:
tests/tools/test_pretrain_cli.py::test_two_process_ddp_on_uneven_shards."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
from tool_loader import ROOT, tool

from mmssl.targets.palette import Palette

TINY_IGPT = [
    "igpt.resolution=8", "igpt.num_colors=8", "igpt.embed_dim=32", "igpt.depth=2", "igpt.num_heads=4",
    "igpt.num_completions=1", "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=50",
    "optim.warmup_steps=2", "trainer.log_every_n_steps=1", "trainer.picture_every_n_steps=1000",
]  # fmt: skip


@pytest.fixture(scope="module")
def igpt_run(tmp_path_factory, demo_root):
    out = tmp_path_factory.mktemp("igpt")
    palette = out / "digits8.safetensors"
    args = ["--shards", "demo:digits/train", "--k", "8", "--resolution", "8", "--images", "200", "--iters", "30",
            "--out", str(palette)]  # fmt: skip
    assert tool("fit_palette").main(args) == 0
    env = {
        **os.environ,
        "MMSSL_DATA": demo_root,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [sys.executable, str(ROOT / "tools" / "pretrain.py"), "--cfg", "igpt_demo", *TINY_IGPT,
           f"igpt.palette={palette}", "data.val_shards=demo:digits/val", "trainer.max_steps=8",
           "trainer.accelerator=cpu", f"out_dir={out}", "name=run"]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "run", res.stdout, palette


@pytest.mark.slow
def test_fit_palette_writes_a_palette_with_its_provenance(igpt_run):
    _, _, path = igpt_run
    palette = Palette.load(path)
    assert palette.num_colors == 8 and palette.fitted
    meta = palette.metadata
    assert (
        meta["fitted_on"] == "demo:digits/train" and meta["resolution"] == "8" and float(meta["rmse"]) < 0.05
    )


@pytest.mark.slow
def test_pretraining_through_the_cli_draws_completions_and_logs_token_rates(igpt_run):
    run, stdout, _ = igpt_run
    assert json.loads((run / "rank0.json").read_text())["global_step"] == 8
    assert "world size 1, global batch 8" in stdout
    assert (run / "pictures" / "final.png").stat().st_size > 5_000  # completions drawn into the run dir
    with open(run / "logs" / "version_0" / "metrics.csv") as f:
        speeds = [r for r in csv.DictReader(f) if r.get("train/images_per_s")]
    assert len(speeds) == 7  # every logged step but the first (mmssl/throughput.py)
    for row in speeds:  # 64 palette tokens per 8x8 image
        assert float(row["train/tokens_per_s"]) == pytest.approx(64 * float(row["train/images_per_s"]))


@pytest.mark.slow
def test_complete_tool_is_deterministic_for_a_seed(igpt_run, tmp_path, capsys):
    run, _, _ = igpt_run
    ckpt = str(run / "checkpoints" / "last.ckpt")
    complete = tool("complete")
    outs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        args = [ckpt, "--out", str(tmp_path / f"{name}.png"), "--num-images", "3", "--num-completions", "2",
                "--seed", str(seed)]  # fmt: skip
        assert complete.main(args) == 0
        outs.append((tmp_path / f"{name}.png").read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]
    assert complete.main([str(tmp_path / "missing.ckpt")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_linear_probe_and_knn_tools_read_the_igpt_encoder(igpt_run, tmp_path, capsys):
    run, _, _ = igpt_run
    ckpt = str(run / "checkpoints" / "last.ckpt")
    probe = ["--cfg", "linprobe_digits", "base_lrs=[10.0]", "layers=[0,-1]"]
    for random_init, name in ((False, "trained"), (True, "random")):
        args = [
            ckpt,
            *probe,
            "--json",
            str(tmp_path / f"{name}.json"),
            *(["--random-init"] if random_init else []),
        ]
        assert tool("linear_probe").main(args) == 0
    trained = json.loads((tmp_path / "trained.json").read_text())
    assert trained["architecture"] == "igpt_ar_d2_w32_k8_to_layer1" and trained["objective"] == "igpt"
    assert [r["layer"] for r in trained["results"]] == [
        "layer0",
        "layer1",
    ]  # embeddings, block 1 (the middle)
    assert trained["train_samples"] == 1257 and trained["best"]["top1"] > 30  # chance 10%
    random = json.loads((tmp_path / "random.json").read_text())
    assert random["random_init"] and random["architecture"] == trained["architecture"]
    assert [r["top1"] for r in random["results"]] != [r["top1"] for r in trained["results"]]  # other weights

    assert tool("knn").main([ckpt, "--train", "demo:digits/train", "--val", "demo:digits/val", "--crop-pct", "1.0", "--json", str(tmp_path / "knn.json")]) == 0  # fmt: skip
    knn = json.loads((tmp_path / "knn.json").read_text())["results"]
    assert knn[0]["top1"] > 30

    capsys.readouterr()
    # the whole model exports (--formats auto: imagegpt); its encoder alone is refused, through the spec
    assert tool("export").main([ckpt, "--out", str(tmp_path / "exported"), "--formats", "timm"]) == 2
    err = capsys.readouterr().err
    assert "the 'igpt' objective's encoder is not a timm model" in err and "cannot be exported to timm" in err


@pytest.mark.slow
def test_digits_table_has_an_igpt_row(igpt_run, tmp_path):
    run, _, _ = igpt_run
    shutil.copytree(run, tmp_path / "igpt")  # the pretraining run, reused as the table's iGPT run
    args = ["--objectives", "igpt", "--out-dir", str(tmp_path), "--reuse", "--probe", "epochs=10", "--finetune",
            "--finetune-args", "trainer.max_steps=1"]  # fmt: skip
    assert tool("digits_table").main(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {r["encoder"]: r for r in result["rows"]}
    assert set(rows) == {"random init", "pretrained, 8 steps"}
    assert all(r["objective"] == "igpt" and r["linear_top1"] > 10 for r in rows.values())  # chance 10%
    assert rows["random init"]["linear_top1"] != rows["pretrained, 8 steps"]["linear_top1"]
    assert "| igpt | pretrained, 8 steps |" in result["table"]
    # fine-tuning rebuilds a timm classifier: iGPT's row says why it has none, in the table too
    assert all("not a timm model" in r["finetune_error"] for r in rows.values())
    assert "| igpt | random init | not fine-tuned: " in result["finetune_table"]
