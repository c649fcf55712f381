"""Store locations: local folders, file:// URLs and fsspec URLs behave alike for what a build needs."""

import pytest

from atcache.errors import AtcacheError
from atcache.cache.location import Location


def test_file_urls_and_relative_paths_are_local_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Location.of("file:///data/voc.zarr") == Location("/data/voc.zarr")
    assert Location.of("caches/voc.zarr") == Location(str(tmp_path / "caches" / "voc.zarr"))
    assert not Location.of("caches/voc.zarr").remote and Location.of("s3://b/voc.zarr/").url == "s3://b/voc.zarr"
    assert Location.of("gs://b/c.zarr").name == "c.zarr"


@pytest.mark.parametrize("root", ["local", "memory://atcache-test/store"])
def test_operations(root, tmp_path):
    loc = Location.of(tmp_path / "store" if root == "local" else root)
    assert loc.is_empty() and not loc.exists()
    assert loc.create("locks/a.json", b"1") and not loc.create("locks/a.json", b"2")
    loc.write("b.json", b"x")
    loc.write("b.json", b"y")
    assert loc.read("locks/a.json") == b"1" and loc.read("b.json") == b"y" and loc.read("nope") is None
    assert loc.list("locks") == ["locks/a.json"] and loc.exists("b.json") and not loc.is_empty()
    assert loc.nbytes() == 2
    loc.delete("locks/a.json")
    loc.delete("locks/a.json")  # deleting what is gone is fine
    loc.prune("locks")
    assert loc.list("locks") == []
    loc.remove_all()
    assert loc.is_empty()


def test_an_unknown_protocol_names_the_missing_backend():
    with pytest.raises(AtcacheError, match="install the fsspec backend"):
        Location.of("nosuchfs://bucket/c.zarr").exists()
