"""Object stores (s3://, gs://, https://, ... any fsspec protocol) for shards, manifests, checkpoints and logs.

- `is_url`: a path with a protocol, other than file:// (a local path).
- `filesystem`: the fsspec file system of a URL; a protocol whose package is missing names the extra to install.
- `reachable`: raises one line naming the fix for a missing bucket, object, credential or endpoint; called before
  training starts.
- `open_shard`: a shard's byte stream, read ahead in the background (the data workers' reads overlap their decode).
- `write_object`: an object that is never visible half-written (how: its docstring).

Credentials and endpoints come from the store's usual environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, AWS_ENDPOINT_URL for S3; GOOGLE_APPLICATION_CREDENTIALS for GCS) or from `storage_options`,
passed to fsspec as they are (e.g. {"client_kwargs": {"endpoint_url": ...}} for s3fs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

import fsspec

# The extra of this package that installs a protocol's fsspec implementation.
EXTRAS = {"s3": "s3", "s3a": "s3", "http": "s3", "https": "s3"}  # s3fs brings aiohttp, fsspec's http client
BUCKETS = ("s3", "s3a", "gs", "gcs")  # protocols whose first path part is a bucket
READ_BLOCK = 8 * 2**20  # ours: bytes per request when streaming a shard; the next block is fetched in the background
PART = 64 * 2**20  # ours: multipart upload part (S3's minimum is 5 MiB)


def is_url(path: Any) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def protocol(url: str) -> str:
    return str(url).split("://", 1)[0]


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(file system, path within it) of `url`; a missing implementation package is one line naming the extra."""
    try:
        return fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    except ImportError as error:
        extra = EXTRAS.get(protocol(url))
        fix = (f"pip install 'xception_pl[{extra}]'" if extra
               else f"install the fsspec implementation of {protocol(url)}://")
        raise ModuleNotFoundError(f"{url}: reading {protocol(url)}:// needs a package that is not installed "
                                  f"({str(error).splitlines()[0]}): {fix}") from None


def reachable(url: str, storage_options: dict[str, Any] | None = None, *, what: str, must_exist: bool = True) -> None:
    """Raise one line naming the fix if the store of `url` cannot be reached, its bucket is missing or (with
    `must_exist`) nothing is at `url`. Called before training starts."""
    fs, path = filesystem(url, storage_options)
    bucket = path.split("/", 1)[0] if protocol(url) in BUCKETS else None
    try:
        fs.invalidate_cache()
        if not fs.exists(path if must_exist or bucket is None else bucket):
            if bucket is not None:
                fs.ls(bucket, detail=False)  # only to say why: a missing bucket, a credential, the endpoint
            raise FileNotFoundError(f"no object or prefix {path}")
    except Exception as error:  # noqa: BLE001 - every store error becomes one line with the fix
        raise store_error(error, url, what) from None


def store_error(error: BaseException, url: str, what: str) -> OSError:
    text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    name = type(error).__name__
    if "Credentials" in name or "credentials" in str(error):
        fix = ("no credentials for the store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or "
               "give them as storage_options {key: ..., secret: ...}")
    elif isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        fix = "access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket's policy"
    elif isinstance(error, FileNotFoundError) and "bucket" in str(error).lower():
        fix = f"the bucket does not exist: create it or fix the URL ({text})"
    elif isinstance(error, FileNotFoundError):
        fix = f"nothing there ({text}): check the URL"
    elif "connect" in text.lower() or "Endpoint" in name:
        fix = (f"cannot reach the store ({text}): check AWS_ENDPOINT_URL or storage_options' endpoint_url, and "
               "the network")
    else:
        fix = text
    return OSError(f"{what} {url}: {fix}")


def open_shard(url: str, storage_options: dict[str, Any] | None = None) -> IO[bytes]:
    """A shard's bytes, streamed in READ_BLOCK requests with the next block fetched in the background."""
    fs, path = filesystem(url, storage_options)
    return fs.open(path, "rb", block_size=READ_BLOCK, cache_type="background")


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path)


def write_object(url: str, write: Callable[[IO[bytes]], None], storage_options: dict[str, Any] | None = None,
                 part_size: int = PART) -> None:
    """`write(f)` into the object at `url`, visible only once whole. On S3 the bytes go out as a multipart upload
    (parts of PART bytes, or one PUT below that) that is completed only after `write` returns: until then readers
    see the old object or none, and a kill leaves an incomplete upload that is never visible (a bucket lifecycle
    rule, AbortIncompleteMultipartUpload, frees its parts). If `write` raises, the upload is aborted. (S3 parts
    are 5 MiB to 5 GiB, at most 10,000 of them: 64 MiB parts hold checkpoints up to 625 GiB.)"""
    fs, path = filesystem(url, storage_options)
    fs.makedirs(fs._parent(path), exist_ok=True)
    f = fs.open(path, "wb", block_size=part_size)
    try:
        write(f)
    except BaseException:
        f.discard()  # S3: aborts the multipart upload
        if isinstance(f, fsspec.spec.AbstractBufferedFile):
            f.closed = True  # close(), also at garbage collection, would complete the upload with what was written
        raise
    f.close()
    fs.invalidate_cache(fs._parent(path))
