"""Storage URIs: the same calls for S3 (real SeaweedFS) and local folders."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from brainscan import storage


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_roundtrip_list_and_copy(kind, tmp_path, request):
    base = request.getfixturevalue("s3_prefix") if kind == "s3" else str(tmp_path / "base")
    storage.write_json(storage.join(base, "a", "x.json"), {"k": 1})
    storage.write_bytes(storage.join(base, "b c", "y.bin"), b"\x00\x01")
    assert storage.read_json(storage.join(base, "a/x.json")) == {"k": 1}
    assert storage.exists(storage.join(base, "b c/y.bin"))
    assert not storage.exists(storage.join(base, "missing"))
    listed = [(uri[len(base) + 1:], size) for uri, size in storage.list_files(base)]
    assert listed == [("a/x.json", len('{\n  "k": 1\n}\n')), ("b c/y.bin", 2)]
    local = storage.download_dir(base, tmp_path / "copy")
    assert (local / "b c" / "y.bin").read_bytes() == b"\x00\x01"


def test_parse_s3():
    assert storage.parse_s3("s3://bucket/a/b.csv") == ("bucket", "a/b.csv")
    assert storage.parse_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError):
        storage.parse_s3("/local/path")
    with pytest.raises(ValueError):
        storage.parse_s3("s3:///key")


def test_download_dir_refuses_keys_that_leave_the_folder(tmp_path, monkeypatch):
    """A key with a `..` part or an absolute name never chooses where on disk a file lands: refused
    before anything is written (S3 keys are free text; a listing can hold such names)."""
    outside = tmp_path / "escaped.txt"
    absolute = tmp_path / "absolute.txt"
    base = "s3://bucket/model"
    for key in ("../../escaped.txt", "/" + str(absolute).lstrip("/")):
        listing = [(f"{base}/fine.txt", 2), (f"{base}/{key}", 2)]
        monkeypatch.setattr(storage, "list_files", lambda uri, listing=listing: iter(listing))
        monkeypatch.setattr(storage, "read_bytes", lambda uri: b"hi")
        with pytest.raises(ValueError, match="outside"):
            storage.download_dir(base, tmp_path / "a" / "copy")
        assert not outside.exists() and not absolute.exists()
        assert not (tmp_path / "a" / "copy" / "fine.txt").exists()  # refused before the first write


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_write_once_keeps_the_first_bytes(kind, tmp_path, request):
    base = request.getfixturevalue("s3_prefix") if kind == "s3" else str(tmp_path / "base")
    uri = storage.join(base, "v", "manifest.csv")
    assert storage.write_once(uri, b"first") is True
    assert storage.write_once(uri, b"first") is False  # the same bytes: nothing to do
    with pytest.raises(storage.ImmutableObjectError):
        storage.write_once(uri, b"second")
    assert storage.read_bytes(uri) == b"first"
    assert [name for name, _ in storage.list_files(storage.join(base, "v"))] == [uri]  # no temporary left


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_write_once_lets_exactly_one_of_racing_writers_win(kind, tmp_path, request):
    """Eight writers of different bytes to one name at once: one writes, the seven others are refused,
    and the object holds the winner's bytes (an atomic create, not a check then a put)."""
    base = request.getfixturevalue("s3_prefix") if kind == "s3" else str(tmp_path / "base")
    uri = storage.join(base, "race", "manifest.csv")
    storage.write_bytes(storage.join(base, "other"), b"")  # the bucket exists before the race
    barrier = threading.Barrier(8)

    def writer(n: int) -> str:
        barrier.wait()
        try:
            return "written" if storage.write_once(uri, f"writer {n}".encode()) else "same"
        except storage.ImmutableObjectError:
            return "refused"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(writer, range(8)))
    assert sorted(outcomes) == ["refused"] * 7 + ["written"]
    assert storage.read_bytes(uri) == f"writer {outcomes.index('written')}".encode()
