"""The Hugging Face Hub through huggingface_hub: `hf://org` (each name under the mount a repo of org), `hf://org/repo`
(names under the mount: folders of that repo), with an optional revision pin: `hf://org/repo@v1.2`.

huggingface_hub does the work: the token is its own (HF_TOKEN, or a logged-in token), the endpoint too (HF_ENDPOINT).
An adapter's version is the commit its revision points at; files are fetched at that commit into a cache of that
fetch's own, inside the disk tier's folder being written (so within MIXSERVE_DISK_CACHE, and a damaged download is
never read again: the next attempt downloads afresh), and removed once copied. With HF_HUB_OFFLINE=1 everything is
read from huggingface_hub's cache (HF_HUB_CACHE: the operator's, only read) without a network call.

Each file's bytes are checked against its ETag at that commit: the SHA-256 of an LFS (or Xet) file, the git blob SHA-1
of another. huggingface_hub names each blob by that ETag, and a snapshot's file is a link to its blob: the link's
target names it (only the link is read: with hf_xet the blob may link on into the store shared between repos, named by
its Xet hash). Where the cache has no links (a filesystem without symlinks: SMB/CIFS, some FUSE or NFS mounts, Windows
without developer mode; huggingface_hub then moves the blob to the snapshot's file), the ETag is asked again (one HEAD
per file); offline, nothing records it, and such a file is read unchecked.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils.sha import git_hash

from server.adapters.sources import ADAPTER_FILES as FILES
from server.adapters.sources import AdapterSource, SourceError, SourceOptions
from server.adapters.sources.disk import sha256_of

try:  # the HTTP client of huggingface_hub 2 (an httpx fork); 1.x used httpx itself
    import httpx2 as httpx
except ImportError:
    import httpx

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")


class HubSource(AdapterSource):
    scheme = "hf"
    kind = "hub"

    def __init__(self, location: str, options: SourceOptions):
        super().__init__(location, options)
        path, at, revision = location.partition("@")
        self.path = path.strip("/")
        self.revision = revision if at else None
        if not all(_PART.fullmatch(part) for part in self.path.split("/")) or (at and not revision):
            raise ValueError("expected hf://org, hf://org/repo or hf://org/repo/folder, optionally @revision")

    def version(self, key: str) -> str:
        repo_id, subfolder = self._repo(key)
        if constants.is_offline_mode():  # the commit the revision points at in the local cache
            path = Path(_call(lambda: self._download(repo_id, FILES[0], subfolder, self.revision)))
            return path.parts[path.parts.index("snapshots") + 1]
        info = _call(lambda: HfApi().model_info(repo_id, revision=self.revision, timeout=self.options.timeout))
        return info.sha

    def fetch(self, key: str, version: str, into: Path) -> None:
        repo_id, subfolder = self._repo(key)
        offline = constants.is_offline_mode()
        cache = None if offline else into / ".hub"
        try:
            for filename in FILES:
                cached = Path(_call(lambda f=filename: self._download(repo_id, f, subfolder, version, cache)))
                etag = _linked_etag(cached)
                if etag is None and not offline:  # no links in the cache: the ETag is asked again, at that commit
                    etag = _call(lambda f=filename: self._etag(repo_id, f, subfolder, version)) or ""
                if etag is not None:
                    _check(cached, etag, f"{repo_id}/{filename}")
                shutil.copyfile(cached, into / filename)
        finally:
            if cache is not None:
                shutil.rmtree(cache, ignore_errors=True)

    def _repo(self, key: str) -> tuple[str, str | None]:
        parts = [p for p in f"{self.path}/{key}".split("/") if p]
        if len(parts) < 2:
            raise SourceError("not_found", "a Hub adapter needs a repository: org/repo")
        return "/".join(parts[:2]), "/".join(parts[2:]) or None

    def _download(
        self, repo_id: str, filename: str, subfolder: str | None, revision: str | None, cache: Path | None = None
    ) -> str:
        return hf_hub_download(
            repo_id,
            filename,
            subfolder=subfolder,
            revision=revision,
            cache_dir=cache,
            etag_timeout=self.options.timeout,
            local_files_only=constants.is_offline_mode(),
        )

    def _etag(self, repo_id: str, filename: str, subfolder: str | None, revision: str) -> str | None:
        """The file's ETag at that revision, from the Hub (the HEAD request huggingface_hub's download makes)."""
        url = hf_hub_url(repo_id, filename, subfolder=subfolder, revision=revision)
        return get_hf_file_metadata(url, timeout=self.options.timeout).etag


def _linked_etag(pointer: Path) -> str | None:
    """The name of the blob a snapshot's file links to (huggingface_hub names a blob by the ETag it was downloaded
    under), or None where the file is no link to a blob (a cache on a filesystem without symlinks)."""
    if not pointer.is_symlink():
        return None
    target = Path(os.readlink(pointer))
    return target.name if target.parent.name == "blobs" else None


def _check(path: Path, etag: str, what: str) -> None:
    """That the file's bytes match its ETag: the SHA-256 of an LFS file, the git SHA-1 of another (a small file). An
    ETag of another form cannot be checked against: the file is not served either."""
    if _SHA256.fullmatch(etag):
        intact = sha256_of(path) == etag
    elif _SHA1.fullmatch(etag):
        intact = git_hash(path.read_bytes()) == etag
    else:
        raise SourceError("corrupt", f"{what}: its ETag is neither a SHA-256 nor a git SHA-1 to check it against")
    if not intact:
        raise SourceError("corrupt", f"{what}: its bytes do not match their hash")


def _call(call):
    """call(), with huggingface_hub's errors as SourceError reasons."""
    try:
        return call()
    except GatedRepoError as exc:
        raise SourceError("access_denied", str(exc)) from exc
    except LocalEntryNotFoundError as exc:  # offline, or the Hub unreachable, and not in the cache
        reason = "not_cached" if constants.is_offline_mode() else "unreachable"
        raise SourceError(reason, str(exc)) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise SourceError("not_found", str(exc)) from exc
    except OfflineModeIsEnabled as exc:
        raise SourceError("not_cached", str(exc)) from exc
    except HFValidationError as exc:  # a store name the Hub cannot have as a repo id: no such adapter there
        raise SourceError("not_found", str(exc)) from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise SourceError("access_denied" if status in (401, 403) else "error", str(exc)) from exc
    except httpx.TimeoutException as exc:
        raise SourceError("timeout", str(exc)) from exc
    except (httpx.TransportError, ConnectionError) as exc:
        raise SourceError("unreachable", str(exc)) from exc
    except OSError as exc:
        raise SourceError("error", f"{type(exc).__name__}: {os.strerror(exc.errno) if exc.errno else exc}") from exc
