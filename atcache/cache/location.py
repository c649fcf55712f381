"""Where a cache store lives: a local directory or an fsspec URL (s3://, gs://, file://, memory://, ...).

zarr opens both through its own storage layer (LocalStore / FsspecStore); this module holds the few operations a
build needs around zarr (exists, read, write, atomic create-if-absent for ownership records, delete, list, size), all
through fsspec, whose local filesystem does the local half. Remote credentials and endpoints come from the usual
places (AWS_* / GOOGLE_* environment, fsspec config such as FSSPEC_S3_ENDPOINT_URL)."""

from __future__ import annotations

import errno
import functools
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from atcache.errors import AtcacheError

TMP_SUFFIX = ".tmp"  # of the temporary files `write` and `create` rename or link into place
BACKENDS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}  # pip package per scheme


@dataclass(frozen=True)
class Location:
    """A store root: `url` is an absolute local path or a remote fsspec URL without a trailing slash."""

    url: str

    @classmethod
    def of(cls, path: "str | Path | Location") -> "Location":
        if isinstance(path, Location):
            return path
        text = str(path)
        if text.startswith("file://"):
            text = text[len("file://"):]
        if "://" in text:
            return cls(text.rstrip("/"))
        return cls(str(Path(text).expanduser().absolute()))

    @property
    def remote(self) -> bool:
        return "://" in self.url

    @property
    def local_path(self) -> Path:
        if self.remote:
            raise ValueError(f"{self.url} is not a local path")
        return Path(self.url)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    @property
    def storage_options(self) -> dict:
        """fsspec options for this URL (zarr gets the same): on S3, plain GETs, since s3fs's concurrent ranged reads
        first ask for an object's size (a HEAD, and a LIST when the chunk is absent) before every GET of a chunk."""
        return {"max_concurrency": 1} if self.url.startswith(("s3://", "s3a://")) else {}

    @functools.cached_property
    def _fs_root(self):
        """(fsspec filesystem, root path inside it); local folders get parent directories made on write."""
        from fsspec.core import url_to_fs

        try:
            return url_to_fs(self.url, **(self.storage_options if self.remote else {"auto_mkdir": True}))
        except (ImportError, ValueError) as e:
            scheme = self.url.split("://", 1)[0]
            raise AtcacheError(f"cannot open {self.url}: {e}; install the fsspec backend for {scheme}:// "
                               f"(pip install {BACKENDS.get(scheme, scheme)})") from None

    def _path(self, name: str = "") -> str:
        fs, root = self._fs_root
        return f"{root.rstrip('/')}/{name}" if name else root

    # ------------------------------------------------------------------ operations
    def exists(self, name: str = "") -> bool:
        """Is there a file (or, for name '', anything at all) at the store root / `name`?"""
        return bool(self._fs_root[0].exists(self._path(name)))

    def is_empty(self, but_pending: bool = False) -> bool:
        """Nothing at the root; with `but_pending`, nothing but the temporary files of `create` / `write` in flight."""
        fs, root = self._fs_root
        names = fs.ls(root, detail=False) if fs.exists(root) else []
        if but_pending:
            names = [n for n in names if not n.endswith(TMP_SUFFIX)]
        return not names

    def read(self, name: str) -> bytes | None:
        """The bytes of `name`, or None if it does not exist."""
        try:
            return self._fs_root[0].cat_file(self._path(name))
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        """Replace `name` whole: readers see the old or the new bytes, never a torn file (an object PUT remotely; a
        temporary file renamed over it locally)."""
        fs, path = self._fs_root[0], self._path(name)
        if not self.remote:
            tmp = f"{path}.{os.getpid()}{TMP_SUFFIX}"
            fs.pipe_file(tmp, data)
            os.replace(tmp, path)
            return
        fs.pipe_file(path, data)

    def create(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist yet, atomically and whole (locally a temporary file hard-linked into
        place, which fails if the name exists; If-None-Match on S3). True if this call created it."""
        fs, path = self._fs_root[0], self._path(name)
        try:
            if self.remote:
                fs.pipe_file(path, data, mode="create")
            else:
                tmp = f"{path}.{uuid.uuid4().hex}{TMP_SUFFIX}"
                fs.pipe_file(tmp, data)
                try:
                    os.link(tmp, path)  # readers never see the record half-written
                finally:
                    os.unlink(tmp)
        except FileExistsError:
            return False
        except OSError as e:  # some backends report the failed precondition as a generic error
            if getattr(e, "errno", None) == errno.EEXIST or "PreconditionFailed" in str(e) or "412" in str(e):
                return False
            raise
        return True

    def delete(self, name: str) -> None:
        try:
            self._fs_root[0].rm_file(self._path(name))
        except FileNotFoundError:
            pass

    def prune(self, prefix: str) -> None:
        """Remove empty local folders under and at `prefix` (object stores have no folders)."""
        if self.remote:
            return
        base = self.local_path / prefix
        for d in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [base]:
            try:
                d.rmdir()
            except OSError:
                pass

    def list(self, prefix: str) -> list[str]:
        """Names (relative to the root) of the files under `prefix`/."""
        fs, root = self._fs_root
        start, path = len(root.rstrip("/")) + 1, self._path(prefix)
        _forget_listings(fs, path)  # what the bucket holds now, not what an earlier listing saw
        names = sorted(p[start:] for p in fs.find(path))
        _forget_listings(fs, path)
        return names

    def remove_all(self) -> None:
        """Delete the store root and everything under it."""
        fs, root = self._fs_root
        if fs.exists(root):
            fs.rm(root, recursive=True)

    def nbytes(self) -> int:
        """Bytes of every file under the root (another builder's temporary files may come and go meanwhile)."""
        fs, root = self._fs_root
        for _ in range(9):
            try:
                return int(fs.du(root, total=True)) if fs.exists(root) else 0
            except FileNotFoundError:  # listed, then renamed or removed by a concurrent writer: list again
                _forget_listings(fs, root)
                continue
        return int(fs.du(root, total=True))


def _forget_listings(fs, path: str) -> None:
    """Drop the filesystem's cached listings of `path` and below: s3fs caches every folder a `find` saw, and chunks
    written since (through zarr's own filesystem instance) would be missing from them, so a later `du` or `info`
    would report them as not found."""
    cache = getattr(fs, "dircache", None)
    if cache:
        path = path.rstrip("/")
        for key in [k for k in list(cache) if k == path or k.startswith(path + "/")]:
            cache.pop(key, None)
