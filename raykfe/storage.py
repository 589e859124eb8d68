"""Where results live: a local path / ``file://`` (the embedded default), ``s3://`` or ``gs://``.

Everything goes through :mod:`pyarrow.fs`. S3-compatible servers are reached with query options
on the URI, e.g. ``s3://bucket/prefix?endpoint_override=http://127.0.0.1:9000&scheme=http``;
credentials come from the environment (never from configs, never written anywhere).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qs, parse_qsl, unquote, urlparse

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
        """Write one file whole: readers see the old content or the new, never a torn file.

        An object store replaces an object atomically; on a local disk the bytes go to a temporary
        sibling that is renamed over ``name`` only once complete.
        """
        path = self.path(name)
        try:
            if not isinstance(self.fs, pafs.LocalFileSystem):
                with self.fs.open_output_stream(path) as f:
                    f.write(data)
                return
            parent = path.rpartition("/")[0]
            if parent:
                self.fs.create_dir(parent, recursive=True)
            tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                self.fs.move(tmp, path)
            except BaseException:
                try:
                    self.fs.delete_file(tmp)
                except Exception:
                    pass
                raise
        except StorageError:
            raise
        except Exception as exc:  # pyarrow raises OSError / ArrowException subclasses
            raise self._wrap(f"write {name!r}", exc) from None

    def read_bytes(self, name: str) -> bytes:
        try:
            # a random-access file reads the whole object with ONE ranged GET; an input stream would
            # issue one GET per ~200 KB (hundreds for a statistics stage)
            with self.fs.open_input_file(self.path(name)) as f:
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


#: a query option whose name holds one of these is a credential (access_key, secret_key, session_token, ...)
SECRET_WORDS = ("key", "secret", "token", "password", "credential", "signature")


def secret_query_keys(uri: str) -> list[str]:
    """The query options of ``uri`` that carry credentials."""
    keys = [k for k, _ in parse_qsl(urlparse(uri).query, keep_blank_values=True)]
    return [k for k in keys if any(word in k.lower() for word in SECRET_WORDS)]


def open_uri(uri: str) -> Location:
    """A :class:`Location` for a local path, ``file://``, ``s3://`` or ``gs://`` URI."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"output URI {uri!r} is empty: give a local directory or an s3:// / gs:// URI")
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            # file://results/run1 would otherwise silently mean /run1
            raise StorageError(
                f"file URI {uri!r} names a host ({parsed.netloc!r}): use file:///absolute/path or a plain local path"
            )
        path = unquote(parsed.path) if parsed.scheme == "file" else uri
        path = os.path.abspath(os.path.expanduser(path)).rstrip("/")
        return Location(pafs.LocalFileSystem(), path, uri)
    if parsed.scheme not in ("s3", "gs", "gcs"):
        raise StorageError(f"URI scheme {parsed.scheme!r} of {uri!r} is not supported: use a local path, file://, s3:// or gs://")
    if parsed.username or parsed.password or secret_query_keys(uri):
        # the URI is saved with the job's config: a secret in it would be written to storage
        raise StorageError(
            f"the URI for bucket {parsed.hostname!r} carries credentials: remove them from the URI and set "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or GOOGLE_APPLICATION_CREDENTIALS) in the environment"
        )
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        if parsed.scheme == "s3":
            fs = _s3_with_endpoint(parsed) or fs
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(f"cannot open {uri!r}: {str(exc).splitlines()[0]}") from None
    return Location(fs, path.rstrip("/"), uri)


# Query options of an s3:// URI that pyarrow's FileSystem.from_uri understands, and their types.
_S3_QUERY = {"region": str, "scheme": str, "endpoint_override": str, "allow_bucket_creation": bool,
             "allow_bucket_deletion": bool, "tls_ca_file_path": str}
S3_MAX_ATTEMPTS = 3  # the AWS SDK's standard retry count


def _s3_with_endpoint(parsed) -> pafs.S3FileSystem | None:
    """An S3 filesystem for an ``endpoint_override`` URI with a bounded retry policy, else None.

    ``FileSystem.from_uri`` retries a refused connection for ~6 s per request, so a mistyped or
    stopped endpoint would take long to report; this builds the same filesystem from the URI's query
    with the SDK's standard retry strategy (3 attempts, ~2 s). Credentials still come from the
    environment / AWS config. URIs with other options (or user info) keep ``from_uri``'s filesystem.
    """
    query = parse_qs(parsed.query, keep_blank_values=True)
    if "endpoint_override" not in query or not set(query) <= set(_S3_QUERY) or parsed.username or parsed.password:
        return None
    kwargs: dict = {}
    for key, values in query.items():
        value = values[-1]
        if _S3_QUERY[key] is bool:
            if value.lower() not in ("true", "1", "false", "0"):
                raise StorageError(f"{key}={value!r} in {parsed.geturl()!r} is not a boolean: use true or false")
            value = value.lower() in ("true", "1")
        kwargs[key] = value
    return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS), **kwargs)
