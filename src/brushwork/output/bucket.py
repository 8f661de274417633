"""The server's pictures in an S3-compatible bucket as well (setting ``outputs_bucket``: ``s3://bucket/prefix``).

For a cluster whose machines share no folder (docs/scale.md): every picture is still written to this machine's
outputs folder first (atomically, with its journal link: ``output/files.py``), then put in the bucket under the
same relative path (``<prefix>/txt2img/00012-1234-<job>.png``) before the job is recorded, so a picture in the
history is always in the bucket. The history keeps the relative path. A server that is asked for a picture
another machine made reads it from the bucket into its cache (``<home>/cache/bucket/``), once.

Names carry the job's id (``files.save_result_linked``'s ``unique``), so two machines numbering their own folders
never write the same key. The endpoint is AWS's unless ``outputs_bucket_endpoint`` names another (MinIO, Ceph,
Swift's s3api, R2 ...); credentials come from boto3's usual places (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``~/.aws``). boto3 is an optional extra: ``pip install 'brushwork[s3]'``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from pathlib import Path

from ..request import BrushworkError

log = logging.getLogger(__name__)

_S3_ERROR = re.compile(r"An error occurred \((?P<code>[^)]+)\) when calling the \w+ operation: (?P<message>.*)$")
_URL = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<prefix>[^\s]*))?$")


class BucketError(BrushworkError):
    """The bucket cannot be used: a bad setting, boto3 missing, or the bucket not reachable (one line)."""


class StorageError(Exception):
    """A picture could not be stored in the bucket: the server's storage failed, not the request (HTTP 5xx)."""


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket/prefix`` (the prefix may be empty), or a BucketError naming the fix."""
    found = _URL.match(str(url).strip())
    if found is None or ".." in (found["prefix"] or "").split("/"):
        raise BucketError(f"setting outputs_bucket must be s3://bucket or s3://bucket/prefix (a bucket name of 3-63 "
                          f"lower-case letters, digits, dots and dashes), got {str(url)[:200]!r}")
    return found["bucket"], (found["prefix"] or "").strip("/")


class Bucket:
    """One bucket (and prefix) the pictures go to; the boto3 client is made on first use."""

    def __init__(self, url: str, endpoint: str | None = None, cache_dir: Path | None = None):
        self.url = url
        self.name, self.prefix = parse_url(url)
        self.endpoint = endpoint or None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._client = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Bucket({self.url!r}, endpoint={self.endpoint!r})"

    def key(self, rel: str) -> str:
        rel = str(rel).replace(os.sep, "/").lstrip("/")
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def client(self):
        with self._lock:
            if self._client is None:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError as err:
                    raise BucketError("outputs_bucket needs boto3: pip install 'brushwork[s3]'") from err
                config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30,
                                s3={"addressing_style": "path"} if self.endpoint else {})
                self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint, config=config)
            return self._client

    def _why(self, err: BaseException) -> str:
        """One short line for a boto3 error: the S3 error code and message where there is one."""
        text = str(err).splitlines()[0] if str(err) else ""
        found = _S3_ERROR.search(text)
        return (f"{found['code']}: {found['message']}" if found else f"{type(err).__name__}: {text}")[:300]

    def check(self) -> None:
        """A BucketError unless the bucket can be reached with these credentials (the server checks at start)."""
        try:
            self.client().head_bucket(Bucket=self.name)
        except BucketError:
            raise
        except Exception as err:  # botocore's errors: no such bucket, refused, bad credentials, no endpoint
            where = f" at {self.endpoint}" if self.endpoint else ""
            raise BucketError(f"the pictures' bucket {self.url}{where} cannot be used ({self._why(err)}); check "
                              "outputs_bucket, outputs_bucket_endpoint and the AWS_* credentials") from err

    def put(self, rel: str, path: Path) -> None:
        """The file at ``path`` as ``rel`` in the bucket (a StorageError, one line, if it cannot be stored)."""
        try:
            self.client().upload_file(str(path), self.name, self.key(rel), ExtraArgs={"ContentType": "image/png"})
        except BucketError:
            raise
        except Exception as err:
            raise StorageError(f"could not store {rel} in {self.url} ({self._why(err)})") from err

    def delete(self, rel: str) -> None:
        try:
            self.client().delete_object(Bucket=self.name, Key=self.key(rel))
        except Exception:  # an orphan object is harmless: no history row names it
            log.warning("could not remove %s from %s", rel, self.url, exc_info=True)

    def fetch(self, rel: str) -> Path | None:
        """The picture ``rel`` read from the bucket into this machine's cache (once), or None if it is not there."""
        if self.cache_dir is None:
            return None
        dest = (self.cache_dir / rel).resolve()
        if not dest.is_relative_to(self.cache_dir.resolve()):
            return None
        if dest.is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=".png")
        try:
            with os.fdopen(fd, "wb") as f:
                self.client().download_fileobj(self.name, self.key(rel), f)
            os.replace(tmp, dest)
        except Exception as err:
            Path(tmp).unlink(missing_ok=True)
            if not isinstance(err, BucketError):
                log.warning("could not read %s from %s: %s", rel, self.url, self._why(err))
            return None
        return dest


def open_bucket(settings) -> Bucket | None:
    """The bucket the settings name (None: pictures stay in the outputs folder only)."""
    url = getattr(settings, "outputs_bucket", None)
    if not url:
        return None
    return Bucket(url, getattr(settings, "outputs_bucket_endpoint", None), Path(settings.cache_dir) / "bucket")
