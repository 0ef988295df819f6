"""Storage URIs: the same calls for S3 (real SeaweedFS) and local folders."""

from __future__ import annotations

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
