"""Stage 1, `atcache build-cache`: the teacher once over a split into a cache (`pipeline`), its teacher loop for static
and replay units (`compute`, `replay`) and where it runs: this process, one process per device, a dask cluster (`runners`)."""
