"""Write an image folder or a .csv/.jsonl listing as webdataset shards plus ``manifest.json``.

    python tools/make_shards.py SRC OUT_DIR [--prefix train] [--maxcount 1000] [--no-shuffle] [--seed 0]
    python tools/make_shards.py llava_v1_5_mix665k.json OUT_DIR --images /data/llava/images
    python tools/make_shards.py blip_laion_cc_sbu_558k.json OUT_DIR --images /data/llava/558k --captions

SRC is either
  * a folder with one subfolder per class (label = index in the sorted subfolder names, as torchvision's
    ``ImageFolder``; the names go to the manifest), or a folder of images without subfolders (no labels);
  * a ``.csv`` / ``.jsonl`` file with a column ``image`` (path relative to that file) and optional
    ``label`` (int) and ``caption`` columns;
  * a LLaVA ``.json`` file: a list of ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}...]}``
    (the layout of LLaVA-1.5's ``llava_v1_5_mix665k.json`` and of its 558K pretraining captions
    ``blip_laion_cc_sbu_558k.json``), images relative to ``--images`` (default: the file's folder). Each
    sample keeps ``{"id", "conversations"}`` as its ``.json`` (what ``llava.conversation=chat`` trains on);
    ``--captions`` also stores the first answer as the ``.txt`` caption (stage 1's ``plain`` layout reads it).
    The mix's text-only conversations become samples with only a ``.json`` (``llava.conversation=chat`` trains
    on them without image tokens, as LLaVA does); with ``--captions`` they are skipped, as are samples with
    several images, and listed.

JPEG, PNG and WebP bytes are stored unchanged under their own extension (the decoder reads all three, and
re-encoding JPEG would lose quality); other formats (BMP, TIFF, GIF, ...) are re-encoded as lossless PNG.
Every file is decoded once here (JPEG at 1/8 scale via ``draft``, which still reads the whole entropy-coded
stream) so truncated or corrupt files are skipped and listed now rather than discovered during training.
Samples are shuffled with a fixed seed by default: class-sorted shards would defeat the shuffle buffer.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import sys
from multiprocessing import Pool
from pathlib import Path

from mmssl.cli import is_program


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", type=Path, help="image folder (class subfolders) or .csv / .jsonl listing")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar ...")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    parser.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes reading images")
    parser.add_argument("--images", type=Path, help="LLaVA .json: the folder its image paths are relative to")
    parser.add_argument(
        "--captions", action="store_true", help="LLaVA .json: also store the first answer as the .txt caption"
    )
    return parser


if is_program(__name__):  # --help and usage errors answer before the heavy imports below
    make_parser().parse_args()

from PIL import Image  # noqa: E402

from mmssl.data.shards import write_shards  # noqa: E402

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
KEEP = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
Record = tuple[str, int | None, str | None, dict | None]  # (path, label, caption, LLaVA conversation)
TEXT_ONLY = ""  # a record's path when the sample has no picture (a LLaVA text-only conversation)


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def list_folder(src: Path) -> tuple[list[Record], dict]:
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        return [(str(p), None, None, None) for p in _images_under(src)], {}
    records = [
        (str(p), label, None, None) for label, name in enumerate(classes) for p in _images_under(src / name)
    ]
    return records, {"classes": classes}


def list_table(src: Path) -> tuple[list[Record], dict]:
    with open(src, newline="") as f:
        rows = (
            list(csv.DictReader(f))
            if src.suffix == ".csv"
            else [json.loads(line) for line in f if line.strip()]
        )
    if rows and "image" not in rows[0]:
        raise SystemExit(f"{src}: needs an 'image' column, found {sorted(rows[0])}")
    records = []
    for row in rows:
        label = row.get("label")
        caption = row.get("caption")
        records.append(
            (
                str(src.parent / row["image"]),
                int(label) if label not in (None, "") else None,
                str(caption) if caption not in (None, "") else None,
                None,
            )
        )
    return records, {}


def list_llava(src: Path, images: Path, captions: bool) -> tuple[list[Record], dict, list[dict]]:
    """LLaVA's JSON -> records with the conversation as JSON text; (records, info, samples skipped here)."""
    try:
        rows = json.loads(src.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{src}: not JSON ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SystemExit(
            f"{src}: expected a list of {{'id', 'image', 'conversations'}} objects (LLaVA's layout)"
        )
    records, skipped = [], []
    for i, row in enumerate(rows):
        name = str(row.get("id", i))
        turns = row.get("conversations")
        image = row.get("image")
        meta = {"id": name, "conversations": turns}
        if not isinstance(turns, list) or not turns:
            skipped.append({"path": name, "reason": "no conversations"})
        elif isinstance(image, list):
            skipped.append({"path": name, "reason": "several images"})
        elif image is None or image == "":
            if captions:  # stage 1 (plain) pairs a caption with its picture
                skipped.append({"path": name, "reason": "no image (--captions needs a picture per caption)"})
            else:  # the 665K mix's text-only conversations: llava.conversation=chat trains on them (no image)
                records.append((TEXT_ONLY, None, None, meta))
        else:
            answers = [t.get("value", "") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
            caption = answers[0] if captions and answers else None
            records.append((str(images / image), None, caption, meta))
    return records, {"images": str(images)}, skipped


def load(record: Record) -> tuple[Record, str, bytes | str]:
    """-> (record, extension, bytes), or (record, "", reason) when the file cannot be read."""
    path = record[0]
    if path == TEXT_ONLY:
        return record, "json", b""  # nothing to read: the sample is its .json conversation
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            if fmt == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
            if fmt in KEEP:
                return record, KEEP[fmt], data
            if img.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
                img = img.convert("RGBA" if "A" in img.mode else "RGB")  # e.g. CMYK TIFF: PNG has no CMYK
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return record, "png", buf.getvalue()
    except Exception as exn:  # unreadable: count and report, never stop the conversion
        return record, "", f"{type(exn).__name__}: {exn}"


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser()
    args = parser.parse_args(argv)

    skipped: list[dict[str, str]] = []  # filled before write_shards writes the manifest that holds it
    if args.src.is_dir():
        records, info = list_folder(args.src)
    elif args.src.suffix in (".csv", ".jsonl"):
        records, info = list_table(args.src)
    elif args.src.suffix == ".json":
        records, info, skipped = list_llava(args.src, args.images or args.src.parent, args.captions)
    else:
        raise SystemExit(f"{args.src}: expected a folder, a .csv, a .jsonl or a LLaVA .json file")
    if args.shuffle:
        random.Random(args.seed).shuffle(records)
    info.update(source=str(args.src), shuffled=args.shuffle, seed=args.seed, skipped=skipped)

    def samples():
        pool = Pool(args.workers) if args.workers > 1 else None
        loaded = pool.imap(load, records, chunksize=16) if pool else map(load, records)
        try:
            for i, ((path, label, caption, meta), ext, payload) in enumerate(loaded):
                if not ext:
                    skipped.append({"path": path, "reason": payload})
                    continue
                sample = (
                    {"__key__": f"{i:09d}"} if path == TEXT_ONLY else {"__key__": f"{i:09d}", ext: payload}
                )
                if label is not None:
                    sample["cls"] = label
                if caption is not None:
                    sample["txt"] = caption
                if meta is not None:
                    sample["json"] = meta  # webdataset writes it with json.dumps
                yield sample
        finally:
            if pool:
                pool.terminate()

    manifest = write_shards(
        samples(), args.out_dir, args.prefix, args.maxcount, total=len(records), info=info
    )
    split = manifest["splits"][args.prefix]
    print(
        f"wrote {split['samples']} samples in {split['shards']} shards to {args.out_dir} ({args.prefix}-*.tar)"
    )
    if skipped:
        print(f"skipped {len(skipped)} samples (unreadable files, or nothing to train on):", file=sys.stderr)
        for item in skipped:
            print(f"  {item['path']}: {item['reason']}", file=sys.stderr)
    return manifest


if __name__ == "__main__":
    main()
