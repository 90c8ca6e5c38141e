"""The evaluation CLIs end to end on the real digits: tools/digits_table.py (a small version of the README's
table: it pretrains through tools/pretrain.py with the online probe and kNN monitor on), then
tools/linear_probe.py, tools/knn.py and tools/export.py on that checkpoint. The online evaluation callbacks
under 2-process DDP: tests/tools/test_pretrain_cli.py::test_two_process_ddp_on_uneven_shards."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from tool_loader import tool

TINY_MAE = [
    "backbone.depth=2", "backbone.embed_dim=64", "backbone.num_heads=4", "mae.decoder_embed_dim=32",
    "mae.decoder_depth=1", "mae.decoder_num_heads=4", "data.num_workers=0", "eval.knn_every_n_epochs=1",
    "eval.online_lr=1e-2",
]  # fmt: skip


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, demo_root):
    """tools/digits_table.py for MAE with a tiny model: 40 pretraining steps, a 30-epoch probe."""
    out = tmp_path_factory.mktemp("digits")
    args = ["--objectives", "mae", "--out-dir", str(out), "--pretrain", *TINY_MAE, "trainer.max_steps=40",
            "--probe", "epochs=30", "--json", str(out / "table.json"), "--tsne", str(out / "tsne.png")]  # fmt: skip
    code = tool("digits_table").main(args)
    log = out / "mae" / "pretrain.log"
    assert code == 0, log.read_text()[-3000:] if log.exists() else "no log"
    return out


@pytest.mark.slow
def test_digits_table_pretrains_probes_and_draws(digits_run):
    result = json.loads((digits_run / "table.json").read_text())
    rows = {r["encoder"]: r for r in result["rows"]}
    assert set(rows) == {"random init", "pretrained, 40 steps"}
    for r in rows.values():
        assert r["linear_top1"] > 50 and r["knn"]["k20_T0.07"] > 30  # chance is 10%
    assert "| mae | pretrained, 40 steps |" in result["table"]
    assert (digits_run / "tsne.png").stat().st_size > 20_000
    # the online evaluation callbacks ran inside the pretraining and logged like any metric
    with open(digits_run / "mae" / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    knn = [float(r["val/knn_top1"]) for r in rows if r.get("val/knn_top1")]
    online = [float(r["train/online_top1"]) for r in rows if r.get("train/online_top1")]
    assert len(knn) == 3 and all(k > 20 for k in knn)  # epochs 0 and 1, and the last, partial one
    assert len(online) == 4 and sum(online[-3:]) / 3 > 20  # logged every 10 steps; chance is 10%


@pytest.mark.slow
def test_probe_knn_and_export_clis_on_the_checkpoint(digits_run, tmp_path, capsys):
    ckpt = digits_run / "mae" / "checkpoints" / "last.ckpt"
    probe = tool("linear_probe")
    args = [str(ckpt), "--cfg", "linprobe_digits", "epochs=20", "base_lrs=[10.0,30.0]", "layers=[-1,0]",
            f"data.cache_dir={tmp_path / 'cache'}", "--json", str(tmp_path / "probe.json")]  # fmt: skip
    assert probe.main(args) == 0
    summary = json.loads((tmp_path / "probe.json").read_text())
    assert [(r["layer"], r["base_lr"]) for r in summary["results"]] == [
        ("layer0", 10.0), ("layer0", 30.0), ("layer1", 10.0), ("layer1", 30.0)
    ]  # fmt: skip
    assert summary["best"]["top1"] > 50 and summary["train_samples"] == 1257 and summary["val_samples"] == 540
    assert "| layer1 | 30 | 30 |" in capsys.readouterr().out
    # a missing label key is named
    bad = [str(ckpt), "--cfg", "linprobe_digits", "epochs=1", "warmup_epochs=0", "data.label_key=nolabel"]
    assert probe.main(bad) == 2
    assert "no label under the key '.nolabel'" in capsys.readouterr().err

    assert tool("knn").main([str(ckpt), "--train", "demo:digits/train", "--val", "demo:digits/val",
                             "--json", str(tmp_path / "knn.json")]) == 0  # fmt: skip
    knn = json.loads((tmp_path / "knn.json").read_text())["results"]
    assert [(r["k"], r["T"]) for r in knn] == [(20, 0.07), (200, 0.07)] and knn[0]["top1"] > 30

    out = tmp_path / "exported" / "mae_digits"
    assert tool("export").main([str(ckpt), "--out", str(out)]) == 0
    assert '"timm": 0.0, "hf": 0.0, "hf (transformers)": 0.0' in capsys.readouterr().out  # and vit, vitmae
    # the exported encoder probes like the checkpoint it came from (same features, same cache-free result)
    again = [str(out) + ".safetensors", "--cfg", "linprobe_digits", "epochs=20", "base_lrs=[10.0,30.0]",
             "layers=[-1,0]", "--json", str(tmp_path / "probe2.json")]  # fmt: skip
    assert probe.main(again) == 0
    assert json.loads((tmp_path / "probe2.json").read_text())["results"] == summary["results"]


@pytest.mark.slow
def test_linear_probe_cli_augments_every_epoch_and_says_so(digits_run, tmp_path, capsys):
    ckpt = digits_run / "mae" / "checkpoints" / "last.ckpt"
    args = [str(ckpt), "--cfg", "linprobe_digits", "data.mode=augment", "data.crop_scale=[0.5,1.0]", "data.hflip=0",
            "epochs=20", "base_lrs=[30.0]", "--json", str(tmp_path / "aug.json")]  # fmt: skip
    assert tool("linear_probe").main(args) == 0
    summary = json.loads((tmp_path / "aug.json").read_text())
    assert summary["mode"] == "augment: RandomResizedCrop(0.5-1) + flip(0) drawn every epoch (the protocol)"
    assert summary["train_samples"] == 1257 and summary["best"]["top1"] > 30
    assert "training features: augment" in capsys.readouterr().out


@pytest.mark.slow
def test_digits_table_keeps_finished_rows_when_one_objective_crashes(digits_run, tmp_path, monkeypatch):
    shutil.copytree(digits_run / "mae", tmp_path / "mae")  # reused: no pretraining here
    table = tool("digits_table")
    evaluate = table.evaluate

    def crash_on_the_pretrained_encoder(ckpt, random_init, *args, **kwargs):
        if not random_init:
            raise KeyError("a bug")  # not one of the expected failures (RuntimeError, ValueError...)
        return evaluate(ckpt, random_init, *args, **kwargs)

    monkeypatch.setattr(table, "evaluate", crash_on_the_pretrained_encoder)
    args = [
        "--objectives",
        "mae",
        "norecipe",
        "--out-dir",
        str(tmp_path),
        "--reuse",
        "--probe",
        "epochs=10",
        "warmup_epochs=1",
    ]
    assert table.main(args) == 1  # a failed row
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["objective"], r.get("encoder")) for r in rows] == [("mae", "random init"), ("mae", None),
                                                                  ("norecipe", None)]  # fmt: skip
    assert rows[1]["error"] == "failed: KeyError: 'a bug'"
    assert rows[0]["linear_top1"] > 30  # measured 46.3 (a 10-epoch probe); chance is 10%
    assert "KeyError" in (tmp_path / "mae" / "error.log").read_text()  # the traceback, for the bug report
    assert "no configs/norecipe_digits.yaml" in rows[2]["error"]
    assert "| mae | random init |" in (tmp_path / "table.md").read_text()
