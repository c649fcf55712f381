"""Seeded augmentation (--aug-seed): a sample of (epoch, index) is the same whatever the workers, batch size, order
of requests or process; each epoch's order is a permutation; DDP slices cover it; trainers see identical batches."""

import hashlib

import numpy as np
import pytest

from atcache.train.samplers import EpochSampler, rank_share
from helpers import TEST_IMGSZ, TEST_LAYERS

pytestmark = pytest.mark.release_range  # also run on the oldest ultralytics of the range (CI)


def seeded(voc_yaml, cache=None, seed=3, epochs=3, **hyp):
    """The training dataset as the trainer builds it (with cached targets when `cache` is given), seeded."""
    from atcache.train.datasets import build_dataset
    from atcache.train.targets import CacheTargets
    from atcache.yolo import check_det_dataset, get_cfg

    args = get_cfg(overrides={"imgsz": TEST_IMGSZ, "data": str(voc_yaml), "close_mosaic": 1, **hyp})
    data = check_det_dataset(str(voc_yaml))
    targets = None if cache is None else CacheTargets.load(cache, TEST_LAYERS)
    return build_dataset(args, data["train"], data, "train", batch=4, targets=targets,
                         target_mode=None if cache is None else "warp", aug_seed=seed, epochs=epochs)


def fingerprint(sample) -> str:
    """sha256 of a sample's image bytes, boxes and classes (and cached targets, if any)."""
    h = hashlib.sha256(sample["img"].numpy().tobytes())
    h.update(sample["bboxes"].numpy().tobytes())
    h.update(sample["cls"].numpy().tobytes())
    for t in sample.get("at_targets", []):
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def test_a_sample_depends_on_seed_epoch_and_index_only(voc_yaml, built_cache):
    ds = seeded(voc_yaml, built_cache)
    n = len(ds)
    keys = [0, 5, n + 5, 2 * n + 7, 3]
    first = {k: fingerprint(ds[k]) for k in keys}
    again = seeded(voc_yaml, built_cache)  # a restart: a new process builds the dataset anew
    assert {k: fingerprint(again[k]) for k in reversed(keys)} == first  # any order of requests
    assert first[5] != first[n + 5]  # another epoch, another augmentation of the same image
    other = seeded(voc_yaml, built_cache, seed=4)
    assert fingerprint(other[5]) != first[5]


def test_other_threads_drawing_meanwhile_change_no_sample(voc_yaml):
    """Another thread of the process drawing from python's `random` and numpy's global generator while samples are
    made (dask's IO loop, a bucket client's retry jitter) changes none of them, and keeps its own stream."""
    import random
    import threading

    ds = seeded(voc_yaml, mixup=0.5)
    keys = list(range(len(ds))) + [len(ds) + 3, 2 * len(ds) + 1]
    quiet = [fingerprint(ds[k]) for k in keys]
    random.seed(0)
    np.random.seed(0)
    expected = [(random.random(), float(np.random.rand())) for _ in range(20000)]
    random.seed(0)
    np.random.seed(0)
    stop, drawn = threading.Event(), []

    def draw():
        while not stop.is_set() and len(drawn) < len(expected):
            drawn.append((random.random(), float(np.random.rand())))

    thread = threading.Thread(target=draw)
    thread.start()
    try:
        busy = [fingerprint(ds[k]) for k in keys]
    finally:
        stop.set()
        thread.join()
    assert busy == quiet
    assert len(drawn) > 100 and drawn == expected[:len(drawn)]


def test_close_mosaic_epochs_use_the_closed_pipeline(voc_yaml):
    from ultralytics.data.augment import Compose, Mosaic

    def mosaic_p(t):
        inner = t.transforms if isinstance(t, Compose) else []
        return max([t.p if isinstance(t, Mosaic) else 0.0] + [mosaic_p(x) for x in inner])

    ds = seeded(voc_yaml, epochs=3)  # close_mosaic=1: epoch 2 is closed
    ds[0]
    assert ds.transforms is ds.aug_pipelines[0] and mosaic_p(ds.transforms) == 1.0
    ds[2 * len(ds) + 1]
    assert ds.transforms is ds.aug_pipelines[1] and mosaic_p(ds.transforms) == 0.0
    ds.close_mosaic(None)  # the trainer's switch changes nothing: each sample's epoch chooses
    assert ds.aug_pipelines[0] is not ds.aug_pipelines[1]


def loader_stream(ds, workers: int, batch: int, epochs: int) -> list[str]:
    """Fingerprints of every sample ultralytics' loader yields over `epochs` passes, in order."""
    from ultralytics.data.build import build_dataloader

    from atcache.yolo import with_sampler

    loader = with_sampler(build_dataloader(ds, batch=batch, workers=workers, shuffle=True, rank=-1),
                          EpochSampler(len(ds), seed=3, encode_epoch=True))
    assert loader.num_workers == workers
    out = []
    for _ in range(epochs):
        for b in loader:
            for j in range(len(b["im_file"])):
                mask = b["batch_idx"] == j
                sample = {"img": b["img"][j], "bboxes": b["bboxes"][mask], "cls": b["cls"][mask]}
                if "at_targets" in b:
                    sample["at_targets"] = [t[j] for t in b["at_targets"]]
                out.append(fingerprint(sample))
    loader.close()
    return out


@pytest.mark.slow
def test_workers_and_batch_sizes_do_not_change_the_samples(voc_yaml, built_cache):
    ds = seeded(voc_yaml, built_cache)
    plain = loader_stream(ds, workers=0, batch=4, epochs=2)
    assert loader_stream(seeded(voc_yaml, built_cache), workers=2, batch=3, epochs=2) == plain
    sampler = EpochSampler(len(ds), seed=3, encode_epoch=True)
    expected = [fingerprint(ds[k]) for _ in range(2) for k in sampler]
    assert plain == expected


def test_each_epoch_is_a_permutation_and_ranks_cover_it():
    sampler = EpochSampler(10, seed=1, encode_epoch=True)
    one, two = list(sampler), list(sampler)
    assert sorted(one) == list(range(10)) and sorted(two) == list(range(10, 20)) and one != [k - 10 for k in two]
    order = EpochSampler(10, seed=1).order(0)
    shares = [rank_share(order, r, 3) for r in range(3)]
    assert set(np.concatenate(shares)) == set(range(10)) and all(len(s) == 4 for s in shares)
    assert np.array_equal(np.concatenate(shares)[:10], order)  # contiguous slices of the one order
    ranks = [EpochSampler(10, seed=1, rank=r, world_size=3) for r in range(3)]
    assert [list(s) for s in ranks] == [s.tolist() for s in shares]
    resumed = EpochSampler(10, seed=1, encode_epoch=True)
    resumed.set_epoch(1)
    assert list(resumed) == two
    resumed.set_epoch(1, exact=True)  # a restarted loader (close_mosaic) begins that epoch again
    assert list(resumed) == two


@pytest.mark.slow
def test_trainers_with_the_same_aug_seed_see_identical_batches(voc_yaml, teacher_pt, tmp_path):
    from atcache.config import DistillSettings
    from atcache.train.trainer import AtcacheTrainer

    class Recording(AtcacheTrainer):
        def preprocess_batch(self, batch):
            self.seen.append((tuple(batch["im_file"]), hashlib.sha256(batch["img"].numpy().tobytes()).hexdigest()))
            return super().preprocess_batch(batch)

    def batches(settings, name):
        overrides = {"model": "yolo11n.yaml", "data": str(voc_yaml), "epochs": 2, "imgsz": TEST_IMGSZ, "batch": 4,
                     "device": "cpu", "plots": False, "workers": 0, "project": str(tmp_path), "name": name,
                     "close_mosaic": 1, "val": False}
        trainer = Recording(overrides=overrides, settings=settings)
        trainer.seen = []
        trainer.train()
        return trainer.seen

    layers = tuple((i, i) for i in TEST_LAYERS)
    plain = batches(DistillSettings(mode="plain", aug_seed=5), "plain")
    online = batches(DistillSettings(mode="online", teacher=str(teacher_pt), layers=layers, aug_seed=5), "online")
    assert len(plain) == 2 * 8 and online == plain  # 31 images, batch 4: 8 steps an epoch
    assert plain[:8] != plain[8:]  # epoch 1 (close_mosaic) is augmented anew
    unseeded = batches(DistillSettings(mode="plain"), "unseeded")
    assert unseeded != plain
