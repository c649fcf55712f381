"""Replay targets (`build-cache --replay-epochs E`, `train-from-cache --targets replay`): the teacher's maps on exactly
the augmented images seeded training sees, for every epoch, computed once and read back in training order.

The build makes the training dataset as ultralytics does (same data YAML, imgsz and augmentation settings), seeds it
(`datasets.py`), and runs the teacher over epoch e's order, position by position; each position keeps the dataset
index and a fingerprint of the augmented image beside the maps. Training recomputes the fingerprint of every sample
and refuses a mismatch. ultralytics names come through atcache.yolo.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar, Sequence

import google_crc32c
import numpy as np
import torch

from atcache.errors import AtcacheError
from atcache.train.samplers import EpochSampler
from atcache.train.targets import ChunkReader, TargetSource
from atcache.train.views import View
from atcache.cache.format import AUGMENT_KEYS, CacheSpec, ReplaySpec
from atcache.cache.store import CacheStore


def augment_settings(given: dict, epochs: int, imgsz: int):
    """ultralytics' training settings (an IterableSimpleNamespace) with the given augmentation keys; `epochs` is the
    number of cached epochs unless given. Refuses keys that do not shape augmentation."""
    from atcache.yolo import get_cfg
    from atcache.yolo import DEFAULT_CFG

    unknown = [k for k in given if k not in AUGMENT_KEYS]
    if unknown:
        raise AtcacheError(f"{unknown[0]}= does not shape augmentation; build-cache takes "
                           f"{', '.join(k + '=' for k in AUGMENT_KEYS)}")
    hyp = get_cfg(DEFAULT_CFG, {"epochs": epochs, **given, "imgsz": imgsz})
    if hyp.epochs < epochs:
        raise AtcacheError(f"epochs={hyp.epochs} is fewer than --replay-epochs {epochs}; cache at most the epochs "
                           "training runs")
    return hyp


def training_dataset(data_yaml: str, hyp, seed: int):
    """The training split as ultralytics' trainer builds it (YOLODataset with its augmentations), seeded; and the data
    dict."""
    from atcache.data.splits import load_data_yaml
    from atcache.train.datasets import build_dataset

    data = load_data_yaml(data_yaml)
    return build_dataset(hyp, data["train"], data, batch=16, stride=32, aug_seed=seed, epochs=hyp.epochs), data


def files_sha256(im_files: Sequence[str], root: str | Path) -> str:
    """sha256 over the training dataset's image list (paths relative to the dataset root), in its order."""
    from atcache.data.splits import relative_to_root

    h = hashlib.sha256()
    for f in im_files:
        h.update(relative_to_root(f, Path(root).resolve()).encode() + b"\n")
    return h.hexdigest()


def check_training_set(replay: ReplaySpec, im_files: Sequence[str], root: str | Path, cache: str) -> None:
    """Refuse a training set other than the one the replay arrays were made for (ultralytics dropped or added images,
    another data YAML): the build's children and training both check it."""
    if len(im_files) != replay.samples or files_sha256(im_files, root) != replay.files_sha256:
        raise AtcacheError(f"this training set ({len(im_files)} images) is not the one the replay arrays of cache "
                           f"{cache} were made for ({replay.samples} images); rebuild the cache on this data with "
                           "build-cache --overwrite --replay-epochs E")


def fingerprint(image: torch.Tensor) -> int:
    """64-bit fingerprint of an augmented image (3, H, W) uint8, as the dataset returns it: format.FINGERPRINT
    ("crc32c-halves", crc32c of each half of its C-order bytes; a store of another kind is refused on open)."""
    data = image.numpy().tobytes()
    half = len(data) // 2
    return google_crc32c.value(data[:half]) | google_crc32c.value(data[half:]) << 32


class ReplayTargets(ChunkReader, TargetSource):
    """Training's reader of the replay arrays (--targets replay): the stored maps of (epoch, dataset index), one replay
    chunk decoded at a time into a small LRU (a rank reads its positions in order; `ChunkReader`: each process opens
    its own store handle). A sample's row is its dataset index."""

    modes: ClassVar[tuple[str, ...]] = ("replay",)

    def __init__(self, path: str, spec: CacheSpec, layers: Sequence[int], capacity: int = 4, gradients: bool = False):
        super().__init__(path, capacity)
        self.spec, self.replay, self.layers = spec, spec.replay, tuple(layers)
        self.gradients = gradients  # samples also carry their view's J_T (--gradient-weight), see `gradient`
        self._positions: dict[int, np.ndarray] = {}

    def check(self, im_files: Sequence[str], root: str | Path) -> None:
        """Refuse a training set other than the one the replay arrays were made for."""
        check_training_set(self.replay, im_files, root, self.path)

    def rows_for(self, im_files: Sequence[str], root: str | Path) -> np.ndarray:
        return np.arange(len(im_files))

    def pad_of(self, row: int) -> tuple[float, float]:
        raise AtcacheError("replay targets are maps of the augmented images themselves: they have no letterbox rows")

    def targets(self, mode: str, view: View, epoch: int | None, index: int, image: torch.Tensor) -> list[np.ndarray]:
        if epoch is None:
            raise AtcacheError("replay targets are looked up by (epoch, index): the dataset must be seeded (--aug-seed)")
        return self.maps(epoch, index, image)

    def position(self, epoch: int, index: int) -> int:
        """Where sample `index` sits in epoch `epoch`'s training order."""
        if epoch not in self._positions:
            order = EpochSampler(self.replay.samples, self.replay.aug_seed).order(epoch)
            self._positions[epoch] = np.argsort(order)
        return int(self._positions[epoch][index])

    def decode(self, store: CacheStore, key: tuple[int, int]):
        """(first position, maps, records[, (grad direction, grad norm)]) of replay chunk `k` of epoch `e`, key (e, k)."""
        epoch, k = key
        r = self.replay.chunk_rows
        a = k * r
        return (a, *store.read_replay(self.layers, epoch, a, min(a + r, self.replay.samples), grad=self.gradients))

    def maps(self, epoch: int, index: int, image: torch.Tensor) -> list[np.ndarray]:
        """Per layer the stored map (H, W) float32 of this sample, after its augmented image's fingerprint matched."""
        if epoch >= self.replay.epochs:
            raise AtcacheError(f"epoch {epoch} is not in the replay arrays of {self.path} ({self.replay.epochs} "
                               "epochs); train at most that many epochs or rebuild with a larger --replay-epochs")
        p = self.position(epoch, index)
        a, maps, records = self.chunk((epoch, p // self.replay.chunk_rows))[:3]
        if int(records[p - a]) != fingerprint(image):
            raise AtcacheError(
                f"the augmented image of sample {index} in epoch {epoch} differs from the one cache {self.path} "
                "replayed (fingerprint mismatch): another ultralytics or OpenCV version, or other data or "
                "augmentation settings than the build; rebuild the cache here with the same settings")
        return [maps[i][p - a].astype(np.float32) for i in self.layers]

    def gradient(self, epoch: int, index: int) -> tuple[np.ndarray, np.float32]:
        """(direction (3, G, G) float16, norm) of the stored J_T of this sample's view (after `maps` checked it)."""
        p = self.position(epoch, index)
        a, *_, (direction, norm) = self.chunk((epoch, p // self.replay.chunk_rows))
        return direction[p - a], norm[p - a]
