"""Bad input that used to end in a traceback (issue 19 items 9-12): each gets mmssl's own message naming the
config key or the file, and exit code 2 like a typo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmssl.backbones import create_backbone
from mmssl.checkpoints import CheckpointError, load_backbone_weights, unsafe_refusal
from mmssl.data.shards import write_shards

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import pretrain  # noqa: E402

TINY = ["--cfg", "mae_demo", "backbone.img_size=32", "backbone.depth=1", "backbone.embed_dim=32", "backbone.num_heads=2",
        "mae.decoder_embed_dim=32", "mae.decoder_depth=1", "mae.decoder_num_heads=2", "data.batch_size=8",
        "data.num_workers=0", "data.shuffle_buffer=16", "data.val_shards=null", "trainer.precision=32-true",
        "trainer.max_steps=2"]  # fmt: skip


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def run(argv: list[str], capsys) -> str:
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_an_unsafe_file_gets_mmssls_refusal_on_every_path(tmp_path, capsys):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": {}}, "x": Evil()}, evil)
    err = run([*TINY, f"out_dir={tmp_path}", "--resume", str(evil)], capsys)
    assert f"checkpoint {evil} was refused" in err and "weights_only=False" not in err

    with pytest.raises(CheckpointError, match=r"clip\.backbone_weights='.*evil\.ckpt' was refused") as info:
        load_backbone_weights(create_backbone("resnet18"), evil, "clip.backbone_weights")
    assert "weights_only=False" not in str(info.value)

    try:  # how transformers hands on torch's refusal of a decoder's pytorch_model.bin (tools/chat.py)
        try:
            torch.load(evil, weights_only=True)
        except Exception as e:
            raise OSError(f"Unable to load weights from pytorch checkpoint file for '{evil}'") from e
    except OSError as wrapped:
        refused = unsafe_refusal(tmp_path, wrapped)
    assert refused is not None and "GLOBAL" in str(refused) and "weights_only=False" not in str(refused)
    assert unsafe_refusal(tmp_path, OSError("disk error")) is None


def test_all_corrupt_shards_are_a_clean_error(tmp_path, capsys):
    write_shards(({"__key__": f"k{i}", "jpg": b"not a jpeg"} for i in range(40)), tmp_path / "bad", "train")
    shard = tmp_path / "bad" / "train-000000.tar"
    err = run([*TINY, f"out_dir={tmp_path}", f"data.train_shards={shard}", "data.num_workers=1"], capsys)
    assert "no sample could be decoded" in err and str(shard) in err and "DataLoader worker" not in err


def test_a_timm_weights_tag_and_a_hub_text_tower_name_their_key(tmp_path, capsys):
    err = run([*TINY, f"out_dir={tmp_path}", "backbone.name=vit_tiny_patch16_224.augreg_in21k"], capsys)
    assert (
        "backbone.name='vit_tiny_patch16_224.augreg_in21k'" in err and "'vit_tiny_patch16_224' exists" in err
    )
    assert "unknown" not in err
    with pytest.raises(ValueError, match="unknown timm model 'vit_no_such_model'"):
        create_backbone("vit_no_such_model")

    clip = ["--cfg", "clip_demo", f"out_dir={tmp_path}", "clip.text_cfg={hf_model_name: xlm-roberta-base}"]
    err = run(clip, capsys)
    assert "clip.text_cfg.hf_model_name='xlm-roberta-base'" in err


def test_an_image_folder_as_shards_says_how_to_shard_it(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    err = run([*TINY, f"out_dir={tmp_path}", f"data.train_shards={folder}"], capsys)
    assert f"data.train_shards='{folder}'" in err and "is a folder" in err
    assert f"python tools/make_shards.py {folder} {folder}_shards/" in err


def test_a_process_whose_run_stopped_with_live_workers_still_exits(tmp_path):
    """The corrupt-shard error above leaves its loader's worker alive; the worker ignores SIGTERM (group signals
    are the trainer's to handle), so multiprocessing's exit handler, which terminates with SIGTERM and then joins,
    waited forever. data/module.py kills leftover workers first: the interpreter must end."""
    write_shards(({"__key__": f"k{i}", "jpg": b"not a jpeg"} for i in range(40)), tmp_path / "bad", "train")
    shard = tmp_path / "bad" / "train-000000.tar"
    args = [*TINY, f"out_dir={tmp_path}", f"data.train_shards={shard}", "data.num_workers=1"]
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tools')!r}); import pretrain; print(pretrain.main({args!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "2", done.stderr[-2000:]
