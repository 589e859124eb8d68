"""A real S3-compatible server on loopback for the tests: ``moto_server`` in a subprocess.

Use the session fixture :func:`s3_server` (import it into a test module or a conftest)::

    def test_x(s3_server):
        uri = s3_server.uri("run1")   # s3://<bucket>/run1?endpoint_override=http://127.0.0.1:PORT&...

For the whole session the fixture puts FAKE credentials in ``os.environ`` (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``; the secret is random per session so tests can search written files for
it) and restores the previous environment at the end. moto accepts any credentials unless told
otherwise; :meth:`S3Server.enforce_auth` switches on moto's IAM authentication for a block and
yields credentials of an IAM user that may use S3, so tests can see wrong keys being rejected.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

__all__ = ["S3Server", "s3_server", "free_port", "start_moto_server"]

STARTUP_TIMEOUT = 30.0  # seconds to wait for moto_server to answer
STOP_TIMEOUT = 10.0  # seconds to wait for it to exit after SIGTERM before SIGKILL
REGION = "us-east-1"

# Variables that would change which credentials the AWS SDKs pick; unset for the session.
_SHADOWING = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN",
              "AWS_WEB_IDENTITY_TOKEN_FILE")


def free_port() -> int:
    """A loopback TCP port with nothing listening on it (at the time of the call)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)


def start_moto_server(log_path: Path, timeout: float = STARTUP_TIMEOUT) -> tuple[subprocess.Popen, int]:
    """Start ``moto_server`` from this interpreter's environment on a free loopback port.

    Returns ``(process, port)`` once the server answers; fails the test (never hangs) if it does not
    answer within ``timeout`` seconds or exits early, quoting the end of its log.
    """
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        pytest.fail(f"{exe} not found: install the test extras (pip install -e '.[test]', which brings moto[server])")
    last_error = ""
    for _attempt in range(3):  # the free port may be taken between picking it and binding it
        port = free_port()
        log = open(log_path, "ab")
        try:
            proc = subprocess.Popen(
                [str(exe), "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            log.close()  # the child holds its own descriptor
        deadline = time.monotonic() + timeout
        exited = False
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    exited = True
                    break
                if _answers(port):
                    return proc, port
                time.sleep(0.1)
        except BaseException:  # e.g. Ctrl-C while waiting: leave no server behind
            _stop(proc)
            raise
        _stop(proc)
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        last_error = (f"exited with status {proc.returncode}" if exited else f"did not answer within {timeout:.0f} s") + (
            ": " + " | ".join(tail) if tail else ""
        )
        if not exited:  # a timeout is not a port clash: do not retry
            break
    pytest.fail(f"moto_server on 127.0.0.1 could not be started ({last_error}); log: {log_path}")


@dataclass
class S3Server:
    """The running server: ``.port``, ``.bucket``, ``.endpoint`` and ``.uri(prefix)``."""

    port: int
    bucket: str
    region: str = REGION

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def uri(self, prefix: str = "", bucket: str | None = None) -> str:
        """``s3://bucket/prefix?endpoint_override=...&scheme=http&region=us-east-1`` for pyarrow / raykfe."""
        path = f"{bucket or self.bucket}/{prefix.strip('/')}".rstrip("/")
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http&region={self.region}"

    def client(self, **credentials):
        """A boto3 S3 client for this server (credentials from the environment unless given)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region, **credentials)

    def objects(self, prefix: str = "") -> dict[str, bytes]:
        """Every object under ``prefix`` in the bucket: key -> bytes (read with boto3, not pyarrow)."""
        s3 = self.client()
        out: dict[str, bytes] = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = s3.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
        return out

    def _set_auth(self, initial_no_auth_action_count: str) -> None:
        req = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth", data=initial_no_auth_action_count.encode(), method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            if r.status != 200:
                raise RuntimeError(f"moto_server did not accept reset-auth: HTTP {r.status}")

    @contextlib.contextmanager
    def enforce_auth(self) -> Iterator[tuple[str, str]]:
        """Within the block moto checks every request's signature against its IAM users.

        Yields ``(access_key_id, secret_access_key)`` of an IAM user allowed ``s3:*``; any other key
        (e.g. the session's fake ones) is rejected. Authentication is switched off again afterwards.
        """
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name=self.region)
        user = f"raykfe-test-{secrets.token_hex(4)}"
        iam.create_user(UserName=user)
        iam.put_user_policy(
            UserName=user, PolicyName="s3-all",
            PolicyDocument='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}',
        )
        key = iam.create_access_key(UserName=user)["AccessKey"]
        self._set_auth("0")
        try:
            yield key["AccessKeyId"], key["SecretAccessKey"]
        finally:
            self._set_auth("inf")


@contextlib.contextmanager
def _fake_credentials() -> Iterator[None]:
    values = {
        "AWS_ACCESS_KEY_ID": "raykfe-test-key-id",
        "AWS_SECRET_ACCESS_KEY": f"raykfe-test-secret-{secrets.token_hex(12)}",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance-metadata service
    }
    saved = {k: os.environ.get(k) for k in (*values, *_SHADOWING)}
    try:
        for k in _SHADOWING:
            os.environ.pop(k, None)
        os.environ.update(values)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """A moto S3 server on loopback with one empty bucket, fake credentials in the environment."""
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with _fake_credentials():
        proc, port = start_moto_server(log_path)
        try:
            server = S3Server(port=port, bucket=f"raykfe-test-{secrets.token_hex(4)}")
            server.client().create_bucket(Bucket=server.bucket)
            yield server
        finally:
            _stop(proc)
