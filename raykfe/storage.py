"""Where results live: a local path / ``file://`` (the embedded default), ``s3://`` or ``gs://``.

Everything goes through :mod:`pyarrow.fs`. S3-compatible servers are reached with query options
on the URI, e.g. ``s3://bucket/prefix?endpoint_override=http://127.0.0.1:9000&scheme=http``;
credentials come from the environment (never from configs, never written anywhere).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from .errors import StorageError

__all__ = ["Location", "open_uri"]


@dataclass
class Location:
    """A directory-like prefix on some filesystem."""

    fs: pafs.FileSystem
    root: str  # path inside fs, no trailing slash
    uri: str

    def path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise StorageError(f"file name {name!r} would escape the output prefix {self.uri!r}")
        return f"{self.root}/{name}" if self.root else name

    def _wrap(self, what: str, exc: Exception) -> StorageError:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StorageError(f"cannot {what} under {self.uri!r}: {msg} (check the URI, the endpoint and the credentials)")

    def write_bytes(self, name: str, data: bytes) -> None:
        try:
            parent = self.path(name).rpartition("/")[0]
            if parent and isinstance(self.fs, pafs.LocalFileSystem):
                self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(self.path(name)) as f:
                f.write(data)
        except StorageError:
            raise
        except Exception as exc:  # pyarrow raises OSError / ArrowException subclasses
            raise self._wrap(f"write {name!r}", exc) from None

    def read_bytes(self, name: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(name)) as f:
                return f.read()
        except FileNotFoundError:
            raise StorageError(f"{name!r} not found under {self.uri!r}") from None
        except Exception as exc:
            raise self._wrap(f"read {name!r}", exc) from None

    def exists(self, name: str) -> bool:
        try:
            return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound
        except Exception as exc:
            raise self._wrap(f"look up {name!r}", exc) from None

    def delete(self, name: str) -> None:
        try:
            if self.exists(name):
                self.fs.delete_file(self.path(name))
        except StorageError:
            raise
        except Exception as exc:
            raise self._wrap(f"delete {name!r}", exc) from None


def open_uri(uri: str) -> Location:
    """A :class:`Location` for a local path, ``file://``, ``s3://`` or ``gs://`` URI."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"output URI {uri!r} is empty: give a local directory or an s3:// / gs:// URI")
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = parsed.path if parsed.scheme == "file" else uri
        path = os.path.abspath(os.path.expanduser(path)).rstrip("/")
        return Location(pafs.LocalFileSystem(), path, uri)
    if parsed.scheme not in ("s3", "gs", "gcs"):
        raise StorageError(f"URI scheme {parsed.scheme!r} of {uri!r} is not supported: use a local path, file://, s3:// or gs://")
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:
        raise StorageError(f"cannot open {uri!r}: {str(exc).splitlines()[0]}") from None
    return Location(fs, path.rstrip("/"), uri)
