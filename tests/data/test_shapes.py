"""The generated shapes set: exact attributes, held-out combinations kept out of training, LLaVA turns."""

import numpy as np

from mmssl.data import shapes


def test_held_out_combinations_only_in_heldout_split():
    seen = {
        split: {(m["color"], m["shape"]) for *_, m in shapes.samples(split, 120, 0)}
        for split in ("train", "heldout")
    }
    assert seen["heldout"] == set(shapes.HELD_OUT)
    assert not seen["train"] & set(shapes.HELD_OUT)
    # every colour and every shape on its own still occurs in training
    assert {c for c, _ in seen["train"]} == set(shapes.COLORS) and {s for _, s in seen["train"]} == set(
        shapes.SHAPES
    )


def test_caption_class_and_conversation_agree_with_the_picture():
    for key, img, caption, cls, meta in shapes.samples("val", 30, 3):
        assert shapes.CLASSES[cls] == f"{meta['color']} {meta['shape']}"
        assert meta["color"] in caption and meta["shape"] in caption
        turns = meta["conversations"]
        assert turns[0]["from"] == "human" and turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == 1
        answers = [t["value"] for t in turns if t["from"] == "gpt"]
        assert answers and all(
            a in (meta["color"], meta["shape"], meta["size"], meta["position"]) for a in answers
        )
        # the shape's colour really is drawn: the most saturated pixel is close to the named colour
        arr = np.asarray(img).reshape(-1, 3).astype(int)
        pixel = arr[np.argmax(arr.max(1) - arr.min(1) + (arr.sum(1) > 650) * 300)]
        assert np.abs(pixel - np.array(shapes.COLORS[meta["color"]])).max() <= 40, (meta, pixel)


def test_position_is_where_the_shape_is():
    for *_, img, _, _, meta in shapes.samples("train", 40, 4):
        arr = np.asarray(img).astype(int)
        target = np.array(shapes.COLORS[meta["color"]])
        ys, xs = np.nonzero(np.abs(arr - target).max(2) <= 20)
        cy, cx = ys.mean() / shapes.SIZE, xs.mean() / shapes.SIZE
        px, py = shapes.POSITIONS[meta["position"]]
        assert abs(cx - px) < 0.12 and abs(cy - py) < 0.12, meta


def test_deterministic_for_a_seed():
    a = [np.asarray(img).tobytes() + cap.encode() for _, img, cap, *_ in shapes.samples("train", 5, 7)]
    b = [np.asarray(img).tobytes() + cap.encode() for _, img, cap, *_ in shapes.samples("train", 5, 7)]
    assert a == b


def test_json_member_reaches_the_batch_and_bad_json_is_skipped(tmp_path, caplog):
    from mmssl.data.demo import encode
    from mmssl.data.shards import SampleDecoder, eval_pipeline, write_shards
    from mmssl.data.transforms import eval_view

    rows = list(shapes.samples("train", 4, 0))
    good = [{"__key__": k, "jpg": encode(img), "json": meta} for k, img, _, _, meta in rows]
    bad = {"__key__": "broken", "jpg": good[0]["jpg"], "json": b"{not json"}
    write_shards([*good, bad], tmp_path, "s")
    pipe = eval_pipeline(
        [str(tmp_path / "s-000000.tar")], eval_view(32), 8, rank=0, world_size=1, decoder=SampleDecoder()
    )
    (batch,) = list(pipe)
    assert batch["image"].shape[0] == 4 and batch["json"] == [m for *_, m in rows]
    assert "bad json" in caplog.text and "broken" in caplog.text
