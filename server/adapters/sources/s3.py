"""S3 and S3-compatible stores (MinIO, Ceph, R2) through boto3: `s3://bucket/prefix/`.

Credentials come from the standard AWS chain (environment, shared files, instance or pod roles); the endpoint from
MIXSERVE_S3_ENDPOINT_URL, else botocore's own (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, then AWS). An adapter at key
`k` is the two objects `prefix/k/adapter_config.json` and `prefix/k/adapter_model.safetensors`; its version is their
two ETags. A fetch asks for exactly those (If-Match), checks each object's length, its MD5 where the ETag is one
(single-part uploads), and the object's own checksum where it has one (botocore validates it).
"""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    FlexibleChecksumError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from server.adapters.sources import ADAPTER_FILES as FILES
from server.adapters.sources import AdapterSource, SourceError, SourceOptions

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
CHUNK = 1 << 20


class S3Source(AdapterSource):
    scheme = "s3"
    kind = "s3"

    def __init__(self, location: str, options: SourceOptions):
        super().__init__(location, options)
        bucket, _, prefix = location.partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"{bucket!r} is not an S3 bucket name")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self._client = None
        self._lock = threading.Lock()

    def client(self):
        """One client per mount, made on first use (boto3 clients are thread-safe; sessions are not)."""
        with self._lock:
            if self._client is None:
                endpoint = self.options.s3_endpoint_url
                config = Config(
                    connect_timeout=self.options.timeout,
                    read_timeout=self.options.timeout,
                    retries={"mode": "standard", "max_attempts": 2},
                    s3={"addressing_style": "path"} if endpoint else None,
                )
                self._client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
            return self._client

    def version(self, key: str) -> str:
        etags = [
            _call(lambda k=k: self.client().head_object(Bucket=self.bucket, Key=k))["ETag"] for k in self._keys(key)
        ]
        return "/".join(etag.strip('"') for etag in etags)

    def fetch(self, key: str, version: str, into: Path) -> None:
        etags = version.split("/")
        if len(etags) != len(FILES):
            raise SourceError("error", f"not a version of this source: {version!r}")
        for filename, object_key, etag in zip(FILES, self._keys(key), etags, strict=True):
            self._download(object_key, etag, into / filename)

    def _keys(self, key: str) -> list[str]:
        folder = "/".join(part for part in (self.prefix, key) if part)
        return [f"{folder}/{filename}" if folder else filename for filename in FILES]

    def _download(self, object_key: str, etag: str, path: Path) -> None:
        response = _call(
            lambda: self.client().get_object(
                Bucket=self.bucket, Key=object_key, IfMatch=f'"{etag}"', ChecksumMode="ENABLED"
            )
        )
        md5, size = hashlib.md5(usedforsecurity=False), 0
        with path.open("wb") as out:
            body = response["Body"]
            while chunk := _call(lambda: body.read(CHUNK)):
                md5.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if size != response["ContentLength"]:
            raise SourceError("incomplete", f"{object_key}: {size} of {response['ContentLength']} bytes")
        if _MD5.fullmatch(etag) and md5.hexdigest() != etag:
            raise SourceError("corrupt", f"{object_key}: MD5 {md5.hexdigest()} is not the ETag {etag}")


def _call(call):
    """call(), with botocore's errors as SourceError reasons."""
    try:
        return call()
    except (ConnectTimeoutError, ReadTimeoutError) as exc:
        raise SourceError("timeout", str(exc)) from exc
    except (IncompleteReadError, ResponseStreamingError) as exc:
        raise SourceError("incomplete", str(exc)) from exc
    except FlexibleChecksumError as exc:
        raise SourceError("corrupt", str(exc)) from exc
    except EndpointConnectionError as exc:
        raise SourceError("unreachable", str(exc)) from exc
    except NoCredentialsError as exc:
        raise SourceError("access_denied", "no credentials found") from exc
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _NOT_FOUND or status == "404":
            raise SourceError("not_found", str(exc)) from exc
        if code in _DENIED or status == "403":
            raise SourceError("access_denied", str(exc)) from exc
        if code == "PreconditionFailed" or status == "412":
            raise SourceError("changed", str(exc)) from exc
        raise SourceError("error", str(exc)) from exc
    except BotoCoreError as exc:
        raise SourceError("unreachable" if "connect" in type(exc).__name__.lower() else "error", str(exc)) from exc
