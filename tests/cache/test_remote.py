"""Stores at fsspec URLs: an S3-compatible server (moto, on loopback) holds the cache that build-cache writes,
inspect reads and train-from-cache trains from. Nothing here leaves this machine."""

import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from atcache.cli import app
from atcache.cache.claims import LOCK_PREFIX
from atcache.cache.location import Location
from helpers import COMMON, build_args, results

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
runner = CliRunner()
BUCKET = "atcache-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS_* variables point boto/s3fs at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    patch = pytest.MonkeyPatch()
    for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        patch.setenv(key, value)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}"
    patch.undo()
    server.stop()


def test_create_if_absent_is_atomic_on_s3(s3):
    loc = Location.of(f"{s3}/records")
    assert loc.create("a.json", b"first") and not loc.create("a.json", b"second")
    assert loc.read("a.json") == b"first" and loc.read("missing.json") is None
    assert loc.list("") == ["a.json"]
    loc.remove_all()
    assert loc.is_empty()


def test_build_inspect_and_train_from_an_s3_store(s3, built_cache, voc_yaml, teacher_pt, tmp_path, assert_same_store):
    url = f"{s3}/voc.zarr"
    built = runner.invoke(app, build_args(voc_yaml, teacher_pt, url))
    assert built.exit_code == 0, built.output
    assert_same_store(built_cache, url)  # plain zarr reads the URL too
    assert not Location.of(url).list(LOCK_PREFIX)

    again = runner.invoke(app, build_args(voc_yaml, teacher_pt, url))
    assert again.exit_code == 2 and "already exists" in again.output
    resumed = runner.invoke(app, build_args(voc_yaml, teacher_pt, url) + ["--resume"])
    assert resumed.exit_code == 0 and "31 already done" in resumed.output

    inspected = runner.invoke(app, ["inspect", url, "--verify"])
    assert inspected.exit_code == 0, inspected.output
    assert "31/31" in inspected.output.replace(" ", "") or "31 of 31" in inspected.output
    assert "every chunk decodes" in inspected.output

    for mode in ("--no-stream", "--stream"):  # loaded from the bucket into RAM; read chunk by chunk while training
        trained = runner.invoke(app, ["train-from-cache", "--cache", url, "--data", str(voc_yaml), "--project",
                                      str(tmp_path), "--name", mode.strip("-"), mode, *COMMON])
        assert trained.exit_code == 0, (mode, trained.output, trained.exception)
        assert results(tmp_path / mode.strip("-"))["train/at_loss"] > 0


@pytest.mark.slow
def test_cluster_workers_fill_one_bucket_store(s3, built_cache, voc_yaml, teacher_pt, assert_same_store):
    pytest.importorskip("distributed")
    from atcache.teacher.pipeline import build_cache
    from helpers import build_config

    url = f"{s3}/cluster.zarr"
    report = build_cache(build_config(voc_yaml, url, teacher=str(teacher_pt), scheduler="local:2"))
    assert report.computed == 31
    assert_same_store(built_cache, url)
    assert not Location.of(url).list(LOCK_PREFIX)


def test_replay_gradients_in_a_bucket(s3, voc_yaml, teacher_pt, tmp_path):
    """build-cache --gradient --replay-epochs into the bucket equals the same build in a folder (J_T of every view
    included), verifies, and trains with --targets replay --gradient-weight from the bucket."""
    import numpy as np

    from atcache.cache.inspect import open_cache, verify_cache

    extra = ["--gradient", "--replay-epochs", "1", "--aug-seed", "3", "close_mosaic=0"]
    url, local = f"{s3}/replay_grad.zarr", tmp_path / "replay_grad.zarr"
    for out in (url, local):
        built = runner.invoke(app, build_args(voc_yaml, teacher_pt, out) + extra)
        assert built.exit_code == 0, built.output
    remote, here = open_cache(url), open_cache(local)
    np.testing.assert_array_equal(remote.replay_grad.compute(), here.replay_grad.compute())
    np.testing.assert_array_equal(remote.grad.compute(), here.grad.compute())
    assert verify_cache(url) == [] and not Location.of(url).list(LOCK_PREFIX)
    trained = runner.invoke(app, ["train-from-cache", "--cache", url, "--targets", "replay", "--gradient-weight", "1",
                                  "--data", str(voc_yaml), "--project", str(tmp_path), "--name", "g",
                                  *COMMON])
    assert trained.exit_code == 0, (trained.output, trained.exception)
    assert results(tmp_path / "g")["train/grad_loss"] > 0


def test_claims_on_s3_one_record_racing_overlaps_and_creation(s3):
    from atcache.cache.claims import ChunkClaim
    from atcache.cache.store import CacheStore
    from helpers import fake_spec, race_claims, race_creation, seed_layers

    small = fake_spec(seed_layers(64)[:1], n_rows=40, chunk_rows=4, imgsz=64)
    for trial in range(3):  # four shards started together on a new bucket store all join it
        stores, errors = race_creation(f"{s3}/new{trial}.zarr", small, [f"{i}.jpg" for i in range(40)])
        assert not errors and len(stores) == 4, (trial, errors)
    spec = fake_spec(seed_layers(64)[:1], n_rows=2000, chunk_rows=1, imgsz=64)
    store = CacheStore.create(f"{s3}/claims.zarr", spec, [f"{i}.jpg" for i in range(2000)])
    with ChunkClaim(store, range(2000)) as claim:
        assert store.location.list(LOCK_PREFIX) == [claim.key]
    for trial in range(5):
        got = race_claims(store, (0, 99))
        assert len(got) == 1, trial
        got[0].release()
    assert not store.location.list(LOCK_PREFIX)


def test_a_chunk_read_is_one_get_on_s3(s3, monkeypatch):
    """Reading chunks costs one GET each (no HEAD for the size first, no LIST for an absent chunk), and the replay
    completion check is one listing."""
    import collections
    import dataclasses

    import aiobotocore.client

    from atcache.cache.format import ReplaySpec
    from atcache.cache.store import CacheStore
    from helpers import fake_spec, seed_layers

    replay = ReplaySpec(epochs=3, aug_seed=0, samples=8, chunk_rows=1, files_sha256="x", augment={})
    spec = dataclasses.replace(fake_spec(seed_layers(64)[:1], n_rows=8, chunk_rows=1, imgsz=64), replay=replay)
    store = CacheStore.create(f"{s3}/requests.zarr", spec, [f"{i}.jpg" for i in range(8)])
    calls, real = collections.Counter(), aiobotocore.client.AioBaseClient._make_api_call

    async def counted(self, operation, params):
        calls[operation] += 1
        return await real(self, operation, params)

    store.read("files"), store.complete_units()  # (array metadata read once per store handle)
    monkeypatch.setattr(aiobotocore.client.AioBaseClient, "_make_api_call", counted)
    store.read("files")  # 8 chunks, all present
    assert dict(calls) == {"GetObject": 8}
    calls.clear()
    assert not store.complete_units().any()  # 8 absent done chunks, 24 replay units listed at once
    assert calls["GetObject"] == 8 and calls["ListObjectsV2"] + calls["HeadObject"] <= 3, dict(calls)


def test_listings_see_units_written_after_them_on_s3(s3):
    """A completion check lists replay/done; units written after it are seen by the next one, and the store's size
    counts them (s3fs caches listings: they are dropped)."""
    import dataclasses

    from atcache.cache.format import ReplaySpec
    from atcache.cache.store import CacheStore
    from helpers import fake_spec, seed_layers

    layers = seed_layers(64)[:1]
    replay = ReplaySpec(epochs=1, aug_seed=0, samples=4, chunk_rows=1, files_sha256="x", augment={})
    spec = dataclasses.replace(fake_spec(layers, n_rows=4, chunk_rows=4, imgsz=64), replay=replay)
    store = CacheStore.create(f"{s3}/listings.zarr", spec, [f"{i}.jpg" for i in range(4)])
    for u in range(1, 5):
        assert store.complete_units().tolist() == [False] + [True] * (u - 1) + [False] * (5 - u)
        size = store.nbytes_stored()
        store.write_replay(u, {layers[0].index: np.ones((1, 4, 4), np.float16)}, {layers[0].index: np.ones(1, np.float32)},
                           np.array([u - 1]), np.array([u]))
        assert store.nbytes_stored() > size
    assert store.replay_done().all()
