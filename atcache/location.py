"""Where a cache store lives: a local directory or an fsspec URL (s3://, gs://, file://, memory://, ...).

zarr opens both through its own storage layer (LocalStore / FsspecStore); this module holds the few operations a
build needs around zarr: exists, atomic create-if-absent (ownership records), delete, size. Remote credentials and
endpoints come from the usual places (AWS_* / GOOGLE_* environment, fsspec config such as FSSPEC_S3_ENDPOINT_URL)."""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from atcache.errors import AtcacheError


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

    # ------------------------------------------------------------------ fsspec for remote stores
    def _fs(self):
        try:
            from fsspec.core import url_to_fs
        except ImportError:  # pragma: no cover - fsspec comes with dask
            raise AtcacheError("stores at URLs need fsspec: pip install fsspec") from None
        try:
            return url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            scheme = self.url.split("://", 1)[0]
            extra = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(scheme, scheme)
            raise AtcacheError(f"cannot open {self.url}: {e}; install the fsspec backend for {scheme}:// (pip install {extra})") from None

    def _key(self, name: str) -> str:
        return f"{self.url}/{name}" if name else self.url

    # ------------------------------------------------------------------ operations
    def exists(self, name: str = "") -> bool:
        """Is there a file (or, for name '', anything at all) at the store root / `name`?"""
        if not self.remote:
            return (self.local_path / name).exists() if name else self.local_path.exists()
        fs, root = self._fs()
        path = f"{root}/{name}" if name else root
        return bool(fs.exists(path))

    def is_empty(self) -> bool:
        if not self.remote:
            return not self.local_path.exists() or (self.local_path.is_dir() and not any(self.local_path.iterdir()))
        fs, root = self._fs()
        return not fs.exists(root) or not fs.find(root, maxdepth=1)

    def read(self, name: str) -> bytes | None:
        """The bytes of `name`, or None if it does not exist."""
        try:
            if not self.remote:
                return (self.local_path / name).read_bytes()
            fs, root = self._fs()
            return fs.cat_file(f"{root}/{name}")
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        if not self.remote:
            path = self.local_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            return
        fs, root = self._fs()
        fs.pipe_file(f"{root}/{name}", data)

    def create(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist yet, atomically (O_EXCL locally, If-None-Match on S3).
        True if this call created it."""
        if not self.remote:
            path = self.local_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        fs, root = self._fs()
        try:
            fs.pipe_file(f"{root}/{name}", data, mode="create")
        except FileExistsError:
            return False
        except OSError as e:  # some backends report the failed precondition as a generic error
            if getattr(e, "errno", None) == errno.EEXIST or "PreconditionFailed" in str(e) or "412" in str(e):
                return False
            raise
        return True

    def delete(self, name: str) -> None:
        try:
            if not self.remote:
                (self.local_path / name).unlink()
                return
            fs, root = self._fs()
            fs.rm_file(f"{root}/{name}")
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
        if not self.remote:
            base = self.local_path / prefix
            return sorted(p.relative_to(self.local_path).as_posix() for p in base.rglob("*") if p.is_file()) if base.is_dir() else []
        fs, root = self._fs()
        return sorted(p[len(root.rstrip("/")) + 1:] for p in fs.find(f"{root}/{prefix}"))

    def remove_all(self) -> None:
        """Delete the store root and everything under it."""
        if not self.remote:
            path = self.local_path
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            return
        fs, root = self._fs()
        if fs.exists(root):
            fs.rm(root, recursive=True)

    def nbytes(self) -> int:
        if not self.remote:
            return sum(f.stat().st_size for f in self.local_path.rglob("*") if f.is_file())
        fs, root = self._fs()
        return int(fs.du(root, total=True))
