"""The shard reader (mmssl.data.tar): the samples webdataset's own reader makes, from every tar dialect."""

import gzip
import io
import tarfile

import pytest
import webdataset as wds

from mmssl.data.shards import write_shards
from mmssl.data.tar import stream_samples, tar_samples


def wds_samples(url: str) -> list[dict]:
    return list(wds.tarfile_to_samples(handler=wds.reraise_exception)([{"url": url}]))


def ours(url: str, handler=wds.reraise_exception) -> list[dict]:
    return list(tar_samples([{"url": url}], handler=handler))


def add(tf: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **kw) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
    for k, v in kw.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def odd_members(tf: tarfile.TarFile) -> None:
    """Members that exercise every header kind the reader handles."""
    long_dir = "d" * 60 + "/" + "e" * 60  # > 100 characters: a ustar prefix, a GNU long name or a pax path
    add(tf, "a.jpg", b"x" * 700)  # spans two blocks
    add(tf, "a.CLS", b"3")  # extensions are lower-cased
    add(tf, "a.seg.png", b"multi")  # everything after the first dot is the extension
    add(tf, "dir", kind=tarfile.DIRTYPE)
    add(tf, "dir/b.txt", b"in a folder")
    add(tf, "dir/b.link", kind=tarfile.SYMTYPE, linkname="b.txt")  # not a regular file: skipped
    add(tf, "__meta__", b"skipped")
    add(tf, "noextension", b"skipped")
    add(tf, f"{long_dir}/c.txt", b"long name")
    add(tf, f"{long_dir}/c.json", b"{}", mtime=2**34)  # beyond octal's 8^11: base-256 (GNU) or pax mtime
    add(tf, "empty.txt", b"")
    add(tf, "block.bin", b"y" * 512)  # exactly one block, no padding


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_every_tar_dialect_gives_webdatasets_samples(tmp_path, fmt):
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        if fmt == tarfile.USTAR_FORMAT:  # no base-256 numbers nor long names in plain ustar
            add(tf, "d" * 60 + "/" + "e" * 60 + "/c.txt", b"long name via the ustar prefix")
            add(tf, "a.jpg", b"x" * 700)
        else:
            odd_members(tf)
        if fmt == tarfile.PAX_FORMAT:
            add(tf, "ünïcode.txt", b"a pax path record")
    want = wds_samples(str(path))
    assert len(want) >= 2 and ours(str(path)) == want


def test_written_shards_and_compressed_ones_give_webdatasets_samples(tmp_path):
    samples = [
        {"__key__": f"k{i}", "jpg": bytes([i]) * (100 + 300 * i), "cls": i, "txt": f"caption {i}"}
        for i in range(7)
    ]
    write_shards(samples, tmp_path, "s")
    url = str(tmp_path / "s-000000.tar")
    want = wds_samples(url)
    assert [s["__key__"] for s in want] == [f"k{i}" for i in range(7)]
    assert ours(url) == want
    gz = tmp_path / "s.tar.gz"  # webdataset's reader decompresses; ours hands such shards to it
    gz.write_bytes(gzip.compress((tmp_path / "s-000000.tar").read_bytes()))
    assert ours(str(gz)) == [{**s, "__url__": str(gz)} for s in want]


def test_broken_shards_go_to_the_handler_with_their_url(tmp_path):
    samples = [{"__key__": f"k{i}", "jpg": b"z" * 3000, "cls": i} for i in range(6)]
    write_shards(samples, tmp_path, "s")
    data = (tmp_path / "s-000000.tar").read_bytes()
    cases = {
        "truncated.tar": data[: len(data) // 2],
        "notatar.tar": b"x" * 2000,
        "badheader.tar": data[:1024] + b"\x01" * 512 + data[1536:],  # member 2's header overwritten
    }
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    errors = []

    def handler(exn):
        errors.append(exn)
        return True

    urls = [str(tmp_path / name) for name in (*cases, "empty.tar", "s-000000.tar")]
    got = list(tar_samples([{"url": u} for u in urls], handler=handler))
    assert [e.args[-1] for e in errors] == [str(tmp_path / name) for name in cases]
    assert all(isinstance(e, tarfile.ReadError) for e in errors)
    by_url = {}
    for s in got:
        by_url.setdefault(s["__url__"], []).append(s)
    # the complete samples before the damage are kept, the one cut short is not
    truncated = by_url[urls[0]]
    assert 0 < len(truncated) < 6 and all(len(s["jpg"]) == 3000 and "cls" in s for s in truncated)
    assert all(len(s["jpg"]) == 3000 and "cls" in s for s in by_url.get(urls[2], []))
    assert by_url[urls[-1]] == [{**s, "__url__": urls[-1]} for s in wds_samples(urls[-1])]
    assert urls[1] not in by_url and urls[3] not in by_url


def test_a_duplicate_member_is_an_error_of_its_shard(tmp_path):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tf:
        add(tf, "a.jpg", b"1")
        add(tf, "a.jpg", b"2")
    with pytest.raises(ValueError, match="duplicate"):
        ours(str(path))


class _Trickle(io.RawIOBase):
    """A raw stream that returns at most 100 bytes a read (pipes and sockets may return short reads)."""

    def __init__(self, data: bytes) -> None:
        self.data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self.data.read(min(n, 100) if n >= 0 else 100)


def test_short_reads_are_not_the_end_of_the_shard(tmp_path, monkeypatch):
    def no_fallback(*args, **kw):
        raise AssertionError("an uncompressed tar read in short pieces is still ours to parse")

    monkeypatch.setattr("mmssl.data.tar.tar_file_iterator", no_fallback)
    write_shards([{"__key__": f"k{i}", "jpg": bytes([i]) * 1000, "cls": i} for i in range(3)], tmp_path, "s")
    url = str(tmp_path / "s-000000.tar")
    stream = _Trickle((tmp_path / "s-000000.tar").read_bytes())
    got = list(stream_samples([{"url": url, "stream": stream}], handler=wds.reraise_exception))
    assert len(got) == 3 and got == wds_samples(url)
