"""Values that used to pass validation and then fail or train nothing (issue 19, items 4-8 and 13): each is
refused before any training work with a message naming its key (or warned about, where a run can still make
sense), through the CLI's clean error path: ``error: ...`` on stderr, exit code 2, no traceback."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

from mmssl import config as C
from mmssl import factory
from mmssl.data.module import ShardDataModule
from mmssl.data.shards import write_shards
from mmssl.data.transforms import eval_view
from mmssl.losses import masked_mse

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import linear_probe  # noqa: E402
import pretrain  # noqa: E402

# mae_demo shrunk: 32 px, 8 px patches -> 16 patches
TINY_MAE = ["backbone.img_size=32", "backbone.patch_size=8", "backbone.depth=1", "backbone.embed_dim=32",
            "backbone.num_heads=2", "mae.decoder_embed_dim=16", "mae.decoder_depth=1", "mae.decoder_num_heads=2"]  # fmt: skip


def refused(capsys, argv: list[str], key: str) -> str:
    """Run ``tools/pretrain.py ARGV --print-config`` in-process: exit code 2, ``error: config key 'KEY'``."""
    rc = pretrain.main([*argv, "--print-config"])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err.startswith("error: ") and f"'{key}'" in err and "Traceback" not in err, err
    assert out == ""  # nothing printed as if it were a recipe
    return err


def test_simclr_with_one_image_per_rank_is_refused(capsys):
    err = refused(capsys, ["--cfg", "simclr_digits", "data.batch_size=1"], "data.batch_size")
    assert "negatives" in err
    C.load("simclr_digits", ["data.batch_size=2"])  # the smallest batch with negatives passes
    C.load("mae_demo", ["data.batch_size=1"])  # MAE learns from a single image: no such rule


def test_mask_ratio_zero_is_refused_and_would_be_nan():
    # why: the loss is a mean over masked patches, 0/0 with nothing masked
    pred, target = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    assert torch.isnan(masked_mse(pred, target, torch.zeros(2, 4)))
    for key in ("mae.mask_ratio", "maskfeat.mask_ratio"):
        with pytest.raises(C.ConfigError, match=f"'{key}'"):
            C.load("mae_demo", [f"{key}=0"])


@pytest.mark.parametrize(
    ("recipe", "overrides", "key"),
    [
        ("mae_demo", [*TINY_MAE, "mae.mask_ratio=0.95"], "mae.mask_ratio"),  # 16 patches: none left visible
        ("maskfeat_demo", ["backbone.img_size=32", "backbone.patch_size=8", "maskfeat.mask_ratio=0.02"],
         "maskfeat.mask_ratio"),  # round(16 x 0.02) = 0 patches masked
    ],
)  # fmt: skip
def test_mask_ratio_that_leaves_no_patch_is_refused_at_build(capsys, recipe, overrides, key):
    err = refused(capsys, ["--cfg", recipe, *overrides], key)
    assert "16 patches" in err


def test_max_steps_must_be_positive_or_null():
    for value in (0, -1):
        with pytest.raises(C.ConfigError, match="'trainer.max_steps'.*null"):
            C.load("mae_demo", [f"trainer.max_steps={value}"])
    datamodule = SimpleNamespace(steps_per_epoch=lambda world, accumulate: 7)
    assert factory.plan(C.load("mae_demo", ["trainer.max_steps=5"]), datamodule).total_steps == 5
    epochs = C.load("mae_demo", ["trainer.max_steps=null", "trainer.max_epochs=3"])
    assert factory.plan(epochs, datamodule).total_steps == 21


def test_vit_image_size_must_be_whole_patches(capsys):
    err = refused(
        capsys, ["--cfg", "mae_demo", "backbone.img_size=60", "backbone.patch_size=8"], "backbone.img_size"
    )
    assert "56 or 64" in err
    refused(
        capsys, ["--cfg", "simclr_digits_vit", "backbone.img_size=60"], "backbone.img_size"
    )  # not MAE only
    refused(capsys, ["--cfg", "mae_demo", "data.img_size=48"], "data.img_size")  # the ViT takes its own size
    # a CNN has no patches to cut: any size runs
    assert pretrain.main(["--cfg", "simclr_digits", "backbone.img_size=60", "--print-config"]) == 0


def _tiny_set(folder: Path, n: int) -> str:
    def samples():
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i, 0, 0)).save(buf, format="PNG")
            yield {"__key__": f"s{i:03d}", "png": buf.getvalue(), "cls": i % 2}

    write_shards(samples(), folder, prefix="train")
    return str(folder / "train-000000.tar")


def test_a_fixed_epoch_longer_than_the_data_is_reported(tmp_path, caplog):
    shards = _tiny_set(tmp_path, 40)
    view = eval_view(8)
    with caplog.at_level(logging.WARNING):
        ShardDataModule(shards, train_view=view, batch_size=4, samples_per_epoch=5120)
    assert "data.samples_per_epoch=5120 is 128.0 passes over the 40 samples" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ShardDataModule(shards, train_view=view, batch_size=4, samples_per_epoch=None)
        ShardDataModule(shards, train_view=view, batch_size=4, samples_per_epoch=40)
    assert "samples_per_epoch" not in caplog.text


def test_knn_k_beyond_the_memory_bank_is_reported(tmp_path, caplog):
    shards = _tiny_set(tmp_path, 40)
    knn = ["eval.knn_every_n_epochs=1", f"eval.knn_train_shards={shards}", f"eval.knn_val_shards={shards}"]
    with caplog.at_level(logging.WARNING):
        factory.eval_callbacks(C.load("mae_demo", [*knn, "eval.knn_k=200"]))
    assert "eval.knn_k=200 but the memory bank holds 40 samples" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        factory.eval_callbacks(C.load("mae_demo", [*knn, "eval.knn_k=20"]))
    assert "knn_k" not in caplog.text


def test_probe_recipes_name_their_tool_and_print_there(capsys):
    rc = pretrain.main(["--cfg", "linprobe_mae", "--print-config"])
    err = capsys.readouterr().err
    assert rc == 2 and "tools/linear_probe.py" in err and "Traceback" not in err, err
    for recipe in sorted(p.stem for p in (ROOT / "configs").glob("linprobe_*.yaml")):
        assert linear_probe.main(["--cfg", recipe, "--print-config"]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["pool"] == C.load(recipe, schema=C.LinearProbeConfig).pool
    rc = pretrain.main(["--cfg", "finetune_digits", "--print-config"])
    err = capsys.readouterr().err
    assert rc == 2 and "tools/finetune.py" in err and "Traceback" not in err, err
    rc = linear_probe.main(["--cfg", "mae_demo", "--print-config"])  # and the other way round
    assert rc == 2 and "tools/pretrain.py" in capsys.readouterr().err


@pytest.mark.slow
def test_every_pretraining_recipe_prints_as_yaml_without_its_files(capsys):
    """LLaVA's recipes name a decoder, weights and stage-1 folders that do not exist here: still printed."""
    other_tools = ("linprobe_", "finetune_")  # tools/linear_probe.py's and tools/finetune.py's recipes
    recipes = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml") if not p.stem.startswith(other_tools))
    assert any(r.startswith("llava") for r in recipes)
    for recipe in recipes:
        rc = pretrain.main(["--cfg", recipe, "--print-config"])
        out, err = capsys.readouterr()
        assert rc == 0, (recipe, err)
        printed = yaml.safe_load(out)  # the whole output, comments included, is YAML
        assert printed["name"] == C.load(recipe).name and printed["objective"] == C.load(recipe).objective


def test_a_finished_run_says_where_its_results_went(tmp_path):
    out = tmp_path / "run"
    for name in (
        "checkpoints/last.ckpt",
        "checkpoints/step0000200.ckpt",
        "pictures/final.png",
        "config.yaml",
    ):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).touch()
    trainer = SimpleNamespace(
        global_step=372, logger=SimpleNamespace(log_dir=str(out / "logs" / "version_0"))
    )
    text = pretrain.closing_summary(C.load("mae_demo"), out, trainer)
    assert (
        "step 372" in text and str(out / "checkpoints" / "last.ckpt") in text and "step0000200.ckpt" in text
    )
    assert str(out / "logs" / "version_0" / "metrics.csv") in text and "final.png" in text
    assert "parts" not in text  # MAE saves no separate parts; LLaVA does (its spec's save_parts)
    assert f"parts       {out / 'llava'}/" in pretrain.closing_summary(
        C.load("llava_demo_stage1"), out, trainer
    )


def test_a_recipe_prints_without_its_palette_file_and_a_run_needs_it(capsys, tmp_path):
    missing = [f"igpt.palette={tmp_path / 'absent.safetensors'}"]
    assert pretrain.main(["--cfg", "igpt_demo", *missing, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["igpt"]["palette"].endswith("absent.safetensors")
    with pytest.raises(C.ConfigError, match=r"'igpt\.palette': no such file"):
        factory.build_datamodule(C.load("igpt_demo", missing))


def test_a_training_run_refuses_before_its_first_step(tmp_path, capsys):
    """The run path (not --print-config): the objective is built before Lightning starts, so the refusal is the
    same clean exit 2 and no checkpoint is written."""
    argv = [
        "--cfg",
        "mae_demo",
        "backbone.img_size=60",
        "backbone.patch_size=8",
        f"out_dir={tmp_path}",
        "name=r",
    ]
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err
    assert "'backbone.img_size'" in err and "Traceback" not in err, err
    assert not (tmp_path / "r" / "checkpoints").exists()
