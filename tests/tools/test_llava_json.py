"""LLaVA's own data layout through the shipped tools: a ``llava_v1_5_mix665k.json``-style conversation file and
a ``blip_laion_cc_sbu_558k.json``-style caption file with their image folder -> tools/make_shards.py -> stage 1
(``llava_demo_stage1``) and stage 2 (``llava_demo_stage2``) through tools/pretrain.py -> tools/export.py of the
run's llava/ folder as a transformers Llava; and open_clip's ``sizes.json`` counted as a manifest."""

from __future__ import annotations

import json
import shutil

import pytest
import webdataset as wds
from tool_loader import tool

from mmssl.data import shapes
from mmssl.data.shards import count_samples, expand_shards

TINY = ["backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2", "data.batch_size=8",
        "data.num_workers=0", "data.shuffle_buffer=16", "data.val_shards=null", "optim.warmup_steps=1",
        "trainer.max_steps=3", "trainer.log_every_n_steps=1", "trainer.progress_bar=false"]  # fmt: skip
SUMMARY = "<image>\nRender a clear and concise summary of the photo."  # a 558K pretraining prompt


def llava_files(root):
    """Images under root/images/coco/train2017 and the two JSON files, as LLaVA ships them."""
    images = root / "images"
    (images / "coco" / "train2017").mkdir(parents=True)
    mix, captions = [], []
    for key, image, caption, _, meta in shapes.samples("train", 40, seed=0):
        rel = f"coco/train2017/{key}.jpg"
        image.save(images / rel)
        mix.append({"id": key, "image": rel, "conversations": meta["conversations"]})
        captions.append({"id": key, "image": rel, "conversations": [
            {"from": "human", "value": SUMMARY}, {"from": "gpt", "value": caption}]})  # fmt: skip
    text_only = {
        "id": "sharegpt_1",
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
    }
    missing = {"id": "gone", "image": "coco/train2017/nope.jpg", "conversations": mix[0]["conversations"]}
    (root / "mix665k.json").write_text(json.dumps([*mix, text_only, missing]))
    (root / "558k.json").write_text(json.dumps(captions))
    return images, mix, captions


def read(out, prefix="train"):
    urls = expand_shards(str(out / f"{prefix}-*.tar"))
    return {s["__key__"]: s for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_llava_json_to_shards_to_both_stages_and_a_transformers_export(tmp_path, capsys):
    images, mix, captions = llava_files(tmp_path)
    make = tool("make_shards")
    chat = make.main([str(tmp_path / "mix665k.json"), str(tmp_path / "mix"), "--images", str(images),
                      "--maxcount", "16", "--workers", "1"])  # fmt: skip
    split = chat["splits"]["train"]
    assert split["samples"] == 41 and split["shards"] == 3  # 40 pictures and the text-only conversation
    assert [s["path"] for s in split["skipped"]] == [str(images / "coco/train2017/nope.jpg")]
    samples = read(tmp_path / "mix")
    by_id = {json.loads(s["json"])["id"]: s for s in samples.values()}
    assert json.loads(by_id[mix[5]["id"]]["json"])["conversations"] == mix[5]["conversations"]
    assert set(by_id["sharegpt_1"]) == {"__key__", "__url__", "json"}  # no picture: trained on as text only
    assert all("jpg" in s and "txt" not in s for k, s in by_id.items() if k != "sharegpt_1")

    caps = make.main([str(tmp_path / "558k.json"), str(tmp_path / "cap"), "--images", str(images), "--captions",
                      "--maxcount", "16", "--workers", "1"])  # fmt: skip
    assert caps["splits"]["train"]["samples"] == 40
    texts = {json.loads(s["json"])["id"]: s["txt"].decode() for s in read(tmp_path / "cap").values()}
    assert texts == {c["id"]: c["conversations"][1]["value"] for c in captions}

    mix_shards, cap_shards = (
        str(tmp_path / "mix" / "train-{000000..000002}.tar"),
        str(tmp_path / "cap" / "train-*.tar"),
    )
    assert tool("make_decoder").main(["--texts", f"{cap_shards}::{mix_shards}", "--out", str(tmp_path / "llm"),
                                      "--hidden-size", "32", "--heads", "2"]) == 0  # fmt: skip
    common = [*TINY, f"llava.decoder={tmp_path / 'llm'}", f"out_dir={tmp_path}"]
    pretrain = tool("pretrain")
    assert (
        pretrain.main(["--cfg", "llava_demo_stage1", *common, f"data.train_shards={cap_shards}", "name=s1"])
        == 0
    )
    s1 = tmp_path / "s1" / "llava"
    stage2 = [f"data.train_shards={mix_shards}", f"llava.vision={s1}", "name=s2",
              f"llava.projector_weights={s1 / 'projector.safetensors'}"]  # fmt: skip
    assert pretrain.main(["--cfg", "llava_demo_stage2", *common, *stage2]) == 0
    assert json.loads((tmp_path / "s2" / "rank0.json").read_text())["global_step"] == 3

    capsys.readouterr()
    assert tool("export").main([str(tmp_path / "s2" / "llava"), "--out", str(tmp_path / "hf")]) == 0
    assert '"llava": ' in capsys.readouterr().out
    assert (tmp_path / "hf_llava" / "config.json").is_file()


def test_open_clip_sizes_json_counts_like_a_manifest(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make = tool("make_shards")
    for key, image, *_ in shapes.samples("val", 10, seed=1):
        image.save(src / f"{key}.png")
    make.main([str(src), str(tmp_path / "a"), "--maxcount", "4", "--workers", "1"])
    other = tmp_path / "b"
    other.mkdir()
    for shard in sorted((tmp_path / "a").glob("*.tar")):
        shutil.copy(shard, other / shard.name)  # shards without mmssl's manifest.json
    urls = expand_shards(str(other / "train-*.tar"))
    assert count_samples(urls) is None
    (other / "sizes.json").write_text(
        json.dumps({"train-000000.tar": 4, "train-000001.tar": 4, "train-000002.tar": 2})
    )
    assert count_samples(urls) == 10
    (other / "sizes.json").write_text(json.dumps({"train-000000.tar": 4}))
    assert count_samples(urls) is None  # a shard it does not list
