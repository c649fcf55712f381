"""Crash-drill driver: `python tests/drill_build.py MODE N -- <atcache CLI args>` runs the CLI with zarr's local
writes instrumented. MODE count: run normally and print `writes=<n>` at the end; kill: SIGKILL this process at the
N-th write (odd N after half of its temporary file is written, even N before it); ENOSPC / EACCES: the N-th write
and all later ones fail with that OSError (a full disk, a store made read-only)."""

from __future__ import annotations

import atexit
import errno
import os
import signal
import sys
import uuid

import zarr.storage._local as local_store

MODE, N = sys.argv[1], int(sys.argv[2])
ARGS = sys.argv[sys.argv.index("--") + 1:]
WRITES = 0
_put = local_store._put


def drilled_put(path, value, exclusive=False):
    global WRITES
    WRITES += 1
    if MODE == "kill" and WRITES == N:
        if N % 2:
            data = bytes(value.as_buffer_like())
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(f".{uuid.uuid4().hex}.partial").write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    if MODE in ("ENOSPC", "EACCES") and WRITES >= N:
        code = getattr(errno, MODE)
        raise OSError(code, os.strerror(code), str(path))
    return _put(path, value, exclusive=exclusive)


def main() -> None:
    local_store._put = drilled_put
    if MODE == "count":
        atexit.register(lambda: print(f"writes={WRITES}", file=sys.stderr))
    from atcache.cli import app

    app(ARGS, prog_name="atcache")


if __name__ == "__main__":
    main()
