"""Streaming a cache from disk: the block-shuffled sampler, chunk-by-chunk targets equal to the in-RAM ones (rendered by
the one warp renderer, per view and per batch on the device from shipped rows), one decode per chunk and epoch, a
training run that streams, and corrupted chunks stopping training with one line."""

import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from atcache.cli import app
from atcache.errors import AtcacheError
from helpers import TEST_IMGSZ, TEST_LAYERS, assert_one_line_error, target_dataset, traced_views

runner = CliRunner()
CHUNK_ROWS = 8  # helpers.build_config's


def chunk_switches(chunks) -> int:
    return int(np.count_nonzero(np.diff(np.asarray(chunks))))


def uneven_chunks(seed=0) -> np.ndarray:
    """chunk_of for 75 samples in 10 chunks (the last one short), listed in a scrambled dataset order."""
    return np.random.default_rng(seed).permutation(np.minimum(np.arange(75) // 8, 9))


# ---------------------------------------------------------------------- the sampler
def test_every_index_once_and_chunks_read_in_one_go():
    from atcache.train.streaming import epoch_order

    chunk_of = uneven_chunks()
    order = epoch_order(chunk_of, window=1, seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(len(chunk_of)))
    assert chunk_switches(chunk_of[order]) == 9  # each of the 10 chunks is entered once
    assert chunk_switches(chunk_of) > 50  # (the dataset order would switch at almost every sample)


def test_samples_are_shuffled_within_windows_of_chunks():
    from atcache.train.streaming import epoch_order

    chunk_of = uneven_chunks()
    order = epoch_order(chunk_of, window=3, seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(len(chunk_of)))
    positions = {k: np.flatnonzero(chunk_of[order] == k) for k in range(10)}
    ranked = sorted(positions, key=lambda k: positions[k][0])  # chunks in the order they are first read
    start = 0
    for w in range(0, 10, 3):  # windows of 3, 3, 3 and 1 chunks, one after the other
        members = np.sort(np.concatenate([positions[k] for k in ranked[w:w + 3]]))
        assert members.tolist() == list(range(start, start + len(members)))  # a window is read before the next
        if w < 9:
            assert chunk_switches(chunk_of[order[start:start + len(members)]]) > 2  # interleaved, not one by one
        start += len(members)
    assert start == len(order)


def test_order_depends_on_seed_and_epoch_only():
    from atcache.train.streaming import epoch_order

    chunk_of = uneven_chunks()
    same = [epoch_order(chunk_of, 2, seed=3, epoch=e) for e in (0, 0, 1)]
    assert np.array_equal(same[0], same[1]) and not np.array_equal(same[0], same[2])
    assert not np.array_equal(epoch_order(chunk_of, 2, seed=4, epoch=0), same[0])


def test_sampler_moves_to_the_next_epoch_on_every_pass():
    from atcache.train.streaming import BlockShuffleSampler, epoch_order

    chunk_of = uneven_chunks()
    sampler = BlockShuffleSampler(chunk_of, window=2, seed=0)
    passes = [list(sampler) for _ in range(3)]
    assert [np.array_equal(p, epoch_order(chunk_of, 2, 0, e)) for e, p in enumerate(passes)] == [True] * 3
    sampler.set_epoch(1)  # ultralytics' DDP call after the loader already began epoch 3: never goes back
    assert sampler.epoch == 3
    sampler.set_epoch(7)  # a resumed run
    assert list(sampler) == epoch_order(chunk_of, 2, 0, 7).tolist() and len(sampler) == 75


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_shares_are_disjoint_covering_and_chunk_grouped(world_size):
    from atcache.train.streaming import BlockShuffleSampler

    chunk_of = uneven_chunks()
    shares = [list(BlockShuffleSampler(chunk_of, window=1, seed=5, rank=r, world_size=world_size))
              for r in range(world_size)]
    per = math.ceil(75 / world_size)
    assert all(len(s) == per for s in shares)  # equal lengths: every rank runs the same number of steps
    flat = [i for s in shares for i in s]
    assert sorted(set(flat)) == list(range(75)) and len(flat) - len(set(flat)) == per * world_size - 75  # padding only
    for r, share in enumerate(shares):  # a slice of the chunk-grouped order: each rank enters each chunk once
        real = chunk_of[share[:max(0, min(per, 75 - r * per))]]  # the padding wraps to the start of the order
        assert chunk_switches(real) == len(set(real.tolist())) - 1


# ---------------------------------------------------------------------- the streaming reader
def test_streamed_targets_equal_the_in_ram_targets(voc_yaml, built_cache):
    """A streamed view's warp target (the training renderer, from the rows its pieces ship) is the in-RAM cache's
    (the same renderer holding every row), bit for bit; static targets are the stored rows."""
    from atcache.train.render import render_views
    from atcache.train.streaming import StreamingCacheTargets

    random.seed(0)
    np.random.seed(0)
    ds = target_dataset(voc_yaml, built_cache, mixup=0.5, degrees=10, fliplr=0.5)
    ram = ds.at_cache
    streamed = StreamingCacheTargets.open(built_cache, TEST_LAYERS, capacity=2)
    assert streamed.grey == ram.grey  # a cache this small is sampled whole for the padding energy
    np.testing.assert_array_equal(streamed.rows_for(ds.im_files, split_root(voc_yaml)), ds.at_rows)
    for _, view in traced_views(ds, 12):
        (in_ram,) = render_views(ram, [view])
        for a, b in zip(streamed.warped(view), in_ram):
            np.testing.assert_array_equal(a, b)
    for row in (0, 9, 17, 30):
        for a, b in zip(streamed.static(row), ram.static(row)):
            np.testing.assert_array_equal(a, b)


def uint8_copy(cache, path) -> Path:
    """The cache re-encoded with uint8 maps (what `build-cache --dtype uint8` stores), chunk by chunk."""
    from dataclasses import replace

    from atcache.cache.format import ChunkData
    from atcache.cache.store import CacheStore

    src = CacheStore.open(cache)
    out = CacheStore.create(path, replace(src.spec, map_dtype="uint8"), list(src.files()))
    for k in range(src.n_chunks):
        a, b = src.chunk_range(k)
        read = {i: src.read_layer(i, a, b) for i in src.spec.layer_indices}
        out.write_chunk(k, ChunkData({i: m for i, (m, _) in read.items()}, {i: n for i, (_, n) in read.items()},
                                     src.read("letterbox", a, b), src.read("done", a, b)))
    return path


def seeded_batch(voc_yaml, source, keys, **hyp) -> dict:
    """One collated batch of `keys` from a seeded (aug_seed 3) warp dataset whose targets come from `source`."""
    from atcache.train.datasets import AtcacheDataset, build_dataset
    from atcache.yolo import check_det_dataset, get_cfg

    args = get_cfg(overrides={"imgsz": TEST_IMGSZ, "data": str(voc_yaml), **hyp})
    data = check_det_dataset(str(voc_yaml))
    ds = build_dataset(args, data["train"], data, batch=4, targets=source, target_mode="warp", pieces=True,
                       aug_seed=3, epochs=2)
    assert ds.at_pieces
    return AtcacheDataset.collate_fn([ds[k] for k in keys])


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_streamed_warp_targets_render_on_the_device_as_the_in_ram_ones(voc_yaml, built_cache, tmp_path, dtype):
    """The same seeded samples: the streamed source ships its rows' stored maps with the views and renders them per
    batch on the device, equal to the in-RAM cache's device renderer (which holds every row) within 1e-4."""
    from atcache.train.render import PIECES_KEY
    from atcache.train.streaming import StreamingCacheTargets
    from atcache.train.targets import CacheTargets

    cache = built_cache if dtype == "float16" else uint8_copy(built_cache, tmp_path / "u8.zarr")
    ram = CacheTargets.load(cache, TEST_LAYERS)
    streamed = StreamingCacheTargets.open(cache, TEST_LAYERS, capacity=2)
    keys = [0, 5, 9, 17, 23, 31, 44, 58]  # epoch 0 and (keys >= 40 with 40 images) epoch 1
    hyp = dict(mosaic=1.0, mixup=0.5, degrees=10, fliplr=0.5)
    ram_pieces = seeded_batch(voc_yaml, ram, keys, **hyp)[PIECES_KEY]
    streamed_pieces = seeded_batch(voc_yaml, streamed, keys, **hyp)[PIECES_KEY]
    names = ("maps", "norms", "scales") if dtype == "uint8" else ("maps", "norms")
    shipped = {f"{name}/{i}" for name in names for i in TEST_LAYERS}
    assert set(streamed_pieces) - set(ram_pieces) == shipped and not set(ram_pieces) - set(streamed_pieces)
    assert streamed_pieces[f"maps/{TEST_LAYERS[0]}"].dtype == (torch.uint8 if dtype == "uint8" else torch.float16)
    renderer = streamed.batch_renderer("cpu")
    assert renderer.nbytes() == 0  # nothing of the cache held on the device
    want = ram.batch_renderer("cpu").render(ram_pieces)
    got = renderer.render(streamed_pieces)
    for a, b in zip(got, want):
        assert a.shape == b.shape == (len(keys), *a.shape[1:])
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert sum(streamed.decoded.values()) > 0  # read from the store, chunk by chunk


def split_root(voc_yaml) -> Path:
    from atcache.data.splits import split_files

    return split_files(voc_yaml, "train").root


def decodes_per_chunk(voc_yaml, cache, order, capacity, **hyp) -> dict:
    """Decodes of each chunk when the dataset is read in `order` with a streaming cache of `capacity` chunks."""
    from atcache.train.streaming import StreamingCacheTargets

    ds = target_dataset(voc_yaml, cache, **hyp)
    ds.at_cache = StreamingCacheTargets.open(cache, TEST_LAYERS, capacity=capacity)
    for i in order:
        ds[int(i)]
    return dict(ds.at_cache.decoded)


def test_block_order_decodes_each_chunk_once_per_epoch(voc_yaml, built_cache):
    from atcache.train.streaming import BlockShuffleSampler

    ds = target_dataset(voc_yaml, built_cache)
    sampler = BlockShuffleSampler(ds.at_rows // CHUNK_ROWS, window=2, seed=0)
    chunks = set((ds.at_rows // CHUNK_ROWS).tolist())
    for _ in range(2):  # two epochs, two orders: each chunk decoded once per epoch with a window-sized LRU
        counts = decodes_per_chunk(voc_yaml, built_cache, list(sampler), capacity=2, mosaic=0.0)
        assert counts == {k: 1 for k in chunks}
    shuffled = np.random.default_rng(0).permutation(len(ds))  # ultralytics' full shuffle, same LRU
    assert sum(decodes_per_chunk(voc_yaml, built_cache, shuffled, capacity=2, mosaic=0.0).values()) > 3 * len(chunks)


def test_mosaic_partners_stay_within_the_trainers_lru(voc_yaml, built_cache):
    """Mosaic takes 3 partners from `dataset.buffer` (recent loads): the LRU size the trainer computes covers them."""
    from atcache.train.streaming import BlockShuffleSampler, StreamingCacheTargets, lru_chunks

    random.seed(0)
    ds = target_dataset(voc_yaml, built_cache, mosaic=1.0)
    ds.max_buffer_length = 4  # a buffer of half a chunk: partners from the current and the previous window only
    assert lru_chunks(1, CHUNK_ROWS, ds.max_buffer_length) >= 2
    ds.at_cache = StreamingCacheTargets.open(built_cache, TEST_LAYERS, capacity=2)
    for i in BlockShuffleSampler(ds.at_rows // CHUNK_ROWS, window=1, seed=1):
        ds[i]
    assert set(ds.at_cache.decoded.values()) == {1}


# ---------------------------------------------------------------------- training that streams
def test_training_streams_a_cache_over_the_ram_budget(voc_yaml, built_cache, tmp_path):
    from atcache.train.streaming import BlockShuffleSampler, StreamingCacheTargets
    from atcache.train.trainer import DistillSettings, train_student

    settings = DistillSettings(mode="cache", cache=str(built_cache), layers=tuple((i, i) for i in TEST_LAYERS),
                               ram_budget_gb=1e-6, shuffle_window=2)
    overrides = {"model": "yolo11n.yaml", "data": str(voc_yaml), "epochs": 1, "imgsz": TEST_IMGSZ, "batch": 4,
                 "device": "cpu", "plots": False, "workers": 0, "nbs": 4, "project": str(tmp_path), "name": "s"}
    trainer = train_student(settings, overrides)
    assert trainer.streaming and isinstance(trainer.cache_targets, StreamingCacheTargets)
    assert isinstance(trainer.train_loader.sampler, BlockShuffleSampler)
    assert set(trainer.cache_targets.decoded.values()) == {1}  # one epoch in the trainer's own process: once each
    assert trainer.train_loader.dataset.at_pieces and trainer._renderer.maps is None  # rendered from shipped rows
    with open(trainer.csv) as f:
        header, row = (line.split(",") for line in f.read().splitlines()[:2])
    at = float(row[[h.strip() for h in header].index("train/at_loss")])
    assert math.isfinite(at) and at > 0


def test_a_cache_over_the_budget_is_refused_only_with_no_stream(voc_yaml, built_cache):
    from atcache.data.splits import split_files
    from atcache.train.trainer import check_cache

    split = split_files(voc_yaml, "train")
    assert check_cache(built_cache, TEST_LAYERS, TEST_IMGSZ, split, ram_budget_gb=1e-6).imgsz == TEST_IMGSZ
    with pytest.raises(AtcacheError, match="more than --ram-budget 0.00 GiB, and --no-stream keeps it in RAM"):
        check_cache(built_cache, TEST_LAYERS, TEST_IMGSZ, split, ram_budget_gb=1e-6, stream=False)


def test_worker_errors_come_back_as_their_own_line():
    from atcache.train.trainer import unwrap_worker_error

    wrapped = ("Caught AtcacheError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\n    raise AtcacheError(msg)\n'
               "atcache.errors.AtcacheError: cache c.zarr: maps/6 rows 8-15 cannot be decoded\n")
    assert unwrap_worker_error(wrapped) == "cache c.zarr: maps/6 rows 8-15 cannot be decoded"
    assert unwrap_worker_error("plain message") == "plain message"


# ---------------------------------------------------------------------- corrupted chunks stop training
@pytest.fixture()
def corrupted_cache(built_cache, tmp_path) -> Path:
    """A copy of the cache with one byte flipped in maps/16, row-chunk 1 (rows 8-15)."""
    path = tmp_path / "flipped.zarr"
    shutil.copytree(built_cache, path)
    chunk = path / "maps" / "16" / "c" / "1" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    return path


CORRUPTED = "maps/16 rows 8-15 cannot be decoded (checksum mismatch: corrupted chunk)"


def test_in_ram_load_refuses_a_corrupted_chunk(corrupted_cache):
    from atcache.train.targets import CacheTargets

    with pytest.raises(AtcacheError, match=r"maps/16 rows 8-15 cannot be decoded \(checksum mismatch") as e:
        CacheTargets.load(corrupted_cache, TEST_LAYERS)
    assert "inspect --verify" in str(e.value) and "--resume --repair" in str(e.value)


def test_streaming_stops_when_it_reaches_a_corrupted_chunk(corrupted_cache):
    from atcache.train.streaming import StreamingCacheTargets

    cache = StreamingCacheTargets.open(corrupted_cache, TEST_LAYERS, grey_rows=CHUNK_ROWS)  # samples chunk 0 only
    cache.static(3)
    with pytest.raises(AtcacheError, match=r"maps/16 rows 8-15 cannot be decoded \(checksum mismatch"):
        cache.static(12)


def test_a_finished_row_that_is_not_finite_is_refused(built_cache, tmp_path):
    from atcache.train.streaming import StreamingCacheTargets
    from atcache.train.targets import CacheTargets

    path = tmp_path / "nan.zarr"
    shutil.copytree(built_cache, path)
    norms = zarr.open_array(str(path / "norms" / "8"), mode="r+")
    norms[20] = np.nan
    with pytest.raises(AtcacheError, match="norms/8 rows 16-23 hold non-finite values in 1 finished rows"):
        CacheTargets.load(path, TEST_LAYERS)
    cache = StreamingCacheTargets.open(path, TEST_LAYERS, grey_rows=CHUNK_ROWS)
    with pytest.raises(AtcacheError, match="norms/8 rows 16-23 hold non-finite values"):
        cache.static(17)


@pytest.mark.parametrize("mode", ["--stream", "--no-stream"])
def test_cli_stops_on_a_corrupted_chunk_with_one_line(voc_yaml, corrupted_cache, tmp_path, monkeypatch, mode):
    """In RAM the load refuses it before training; streaming meets it at the first sample of chunk 1 (ultralytics
    loads in the trainer's process on a CPU)."""
    monkeypatch.setattr("atcache.train.streaming.GREY_ROWS", CHUNK_ROWS)  # the padding sample must not reach chunk 1
    args = ["train-from-cache", "--cache", str(corrupted_cache), "--data", str(voc_yaml), "--project", str(tmp_path),
            "--student", "yolo11n.yaml", "--epochs", "1", "--imgsz", str(TEST_IMGSZ), "--batch", "4", "--device", "cpu",
            mode, "plots=False", "workers=2", "nbs=4"]
    assert_one_line_error(runner.invoke(app, args), f"cache {corrupted_cache}: {CORRUPTED}", "--resume --repair")


def test_cli_refuses_an_empty_shuffle_window(voc_yaml, built_cache, tmp_path):
    args = ["train-from-cache", "--cache", str(built_cache), "--data", str(voc_yaml), "--project", str(tmp_path),
            "--student", "yolo11n.yaml", "--imgsz", str(TEST_IMGSZ), "--device", "cpu", "--stream", "--shuffle-window", "0"]
    assert_one_line_error(runner.invoke(app, args), "--shuffle-window 0 must be at least 1")


def test_trainer_reports_a_corrupted_chunk_met_in_a_loader_worker(voc_yaml, corrupted_cache, tmp_path, monkeypatch):
    """With DataLoader workers (as on a GPU) torch re-raises the worker's AtcacheError wrapped with its traceback; the
    trainer turns it back into the one line."""
    from atcache.train.trainer import AtcacheTrainer, DistillSettings

    monkeypatch.setattr("atcache.train.streaming.GREY_ROWS", CHUNK_ROWS)
    settings = DistillSettings(mode="cache", cache=str(corrupted_cache), layers=tuple((i, i) for i in TEST_LAYERS),
                               stream=True)
    overrides = {"model": "yolo11n.yaml", "data": str(voc_yaml), "epochs": 1, "imgsz": TEST_IMGSZ, "batch": 4,
                 "device": "cpu", "plots": False, "nbs": 4, "project": str(tmp_path), "name": "w"}
    trainer = AtcacheTrainer(overrides=overrides, settings=settings)
    trainer.args.workers = 2  # ultralytics sets 0 on a CPU
    with pytest.raises(AtcacheError) as e:
        trainer.train()
    assert trainer.train_loader.num_workers == 2
    assert str(e.value).startswith(f"cache {corrupted_cache}: {CORRUPTED}") and "\n" not in str(e.value)


def test_every_ddp_process_on_the_machine_counts_against_the_ram_budget(voc_yaml, built_cache, monkeypatch):
    from atcache.data.splits import split_files
    from atcache.cache.store import CacheStore
    from atcache.train.trainer import check_cache, ram_need_gb
    from atcache.devices import ranks_on_this_node
    from atcache.train.trainer import DistillSettings, cache_streams

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert ranks_on_this_node("0,1,2,3") == 4 and ranks_on_this_node("0") == 1 and ranks_on_this_node("cpu") == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # inside a torchrun rank
    assert ranks_on_this_node("0") == 8
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    need = ram_need_gb(CacheStore.open(built_cache).spec, TEST_LAYERS)
    settings = DistillSettings(mode="cache", cache=str(built_cache), layers=tuple((i, i) for i in TEST_LAYERS),
                               ram_budget_gb=2.5 * need)
    assert not cache_streams(settings, "0") and not cache_streams(settings, "0,1")
    assert cache_streams(settings, "0,1,2,3")  # four copies do not fit: stream
    split = split_files(voc_yaml, "train")
    with pytest.raises(AtcacheError, match=r"\(4 DDP processes on this machine, a copy each\)"):
        check_cache(built_cache, TEST_LAYERS, TEST_IMGSZ, split, ram_budget_gb=2.5 * need, stream=False, ranks=4)
