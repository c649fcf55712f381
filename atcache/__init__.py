"""atcache: attention-transfer distillation for YOLO with the teacher run once (cached maps in Zarr).

The public Python API (everything else is internal). Names load on first use, so `import atcache` stays light:
    open_cache(path)              a cache opened read-only: spec, files, done, letterbox, dask arrays per layer
    CacheSpec, LayerSpec          the frozen description of a cache, stored in it and checked on every open
    CacheStore                    a handle on a store: create / open, read_layer, letterbox, write_chunk
    BuildConfig, build_cache      stage 1: the teacher once over a split into a store (one process, devices, dask)
    DistillSettings, AtcacheTrainer, train_student
                                  stage 2: ultralytics' DetectionTrainer with attention transfer (plain/cache/online)
    layer_maps                    the one recipe for a model's attention maps on a batch of images
    attention_map, at_loss        the AT math
    inspect_cache, verify_cache, compare_caches, measure_fidelity, FidelityConfig
                                  looking at a cache
    AtcacheError                  the one error type: a one-line message naming the problem and the fix
"""

import importlib

from atcache.version import __version__
from atcache.data.voc import VOC_NAMES

_EXPORTS = {
    "open_cache": "cache.inspect", "inspect_cache": "cache.inspect", "verify_cache": "cache.inspect",
    "compare_caches": "cache.inspect", "CacheSpec": "cache.format", "LayerSpec": "cache.format", "CacheStore": "cache.store",
    "BuildConfig": "config", "DistillSettings": "config", "build_cache": "teacher.pipeline", "AtcacheTrainer": "train.trainer",
    "train_student": "train.trainer", "layer_maps": "attention.recipe", "attention_map": "attention.functional", "at_loss": "attention.functional",
    "measure_fidelity": "tools.fidelity", "FidelityConfig": "tools.fidelity", "AtcacheError": "errors",
}
__all__ = ["__version__", "VOC_NAMES", *_EXPORTS]


def __getattr__(name: str):
    """PEP 562: import the module behind a public name when it is first used (training ones need ultralytics'
    environment prepared first: atcache.yolo.prepare_ultralytics)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'atcache' has no attribute {name!r}")
    return getattr(importlib.import_module(f"atcache.{_EXPORTS[name]}"), name)
