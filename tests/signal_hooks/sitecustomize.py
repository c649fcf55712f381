"""Test hooks for tests/test_signals.py, in every Python process started with this folder on PYTHONPATH (the CLI, its
device processes, dask workers):
    ATCACHE_TEST_BATCH_DELAY=S     sleep S seconds after each teacher batch of a build, so that a signal sent once the
                                   first row-chunk is written lands in the middle of the build (on 2 busy cores, too)
    ATCACHE_TEST_TRAIN_WORKERS=N   train with N DataLoader worker processes, as on CUDA (ultralytics uses 0 on the CPU)
"""

import os

if os.environ.get("ATCACHE_TEST_BATCH_DELAY"):
    import functools
    import time

    import atcache.teacher.compute as compute

    def _slowed(layer_maps, delay: float):
        @functools.wraps(layer_maps)
        def slow(*args, **kwargs):
            out = layer_maps(*args, **kwargs)
            time.sleep(delay)
            return out

        return slow

    compute.layer_maps = _slowed(compute.layer_maps, float(os.environ["ATCACHE_TEST_BATCH_DELAY"]))

if os.environ.get("ATCACHE_TEST_TRAIN_WORKERS"):
    from atcache.train.checkpoints import ResumableTraining

    def _with_workers(train, workers: int):
        def train_with_workers(self):
            self.args.workers = workers  # after BaseTrainer.__init__ set 0 for the CPU, before the loaders are built
            return train(self)

        return train_with_workers

    ResumableTraining.train = _with_workers(ResumableTraining.train, int(os.environ["ATCACHE_TEST_TRAIN_WORKERS"]))
