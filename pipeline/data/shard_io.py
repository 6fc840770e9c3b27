"""Where a shard's bytes come from: a local file, or one of webdataset's URL forms.

    shard-000.tar                          under the manifest's folder (or ``data.shard_root``)
    /mnt/data/shard-000.tar                a local path
    http://host/shards/shard-000.tar       HTTP(S): read with Range requests
    s3://bucket/shards/shard-000.tar       S3 or any other fsspec protocol (``pip install .[s3]``);
                                           credentials and endpoint as those libraries read them
                                           (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ~/.aws/...)
    pipe:curl -s http://host/shard-000.tar a command whose standard output is the tar

A manifest's shard path is one of these; a relative one resolves under ``data.shard_root`` when
the recipe sets it (a folder, a URL prefix, or a ``pipe:`` command with ``{path}`` where the path
goes), else beside the manifest. So a set sharded on one machine and copied to object storage is
read from there by changing one key, not the manifest.

A remote shard is streamed, never copied to disk: :class:`RemoteShard` is a forward-only file
that counts the bytes it hands out. When the connection drops (an error, or the stream ending
before the recorded size) it waits (``backoff_s``, doubling up to 30 s), re-opens the URL at that
byte offset (a Range request; a ``pipe:`` command is re-run and its first bytes discarded) and goes
on, up to ``retries`` times in a row; then the error names the URL, the offset and the last
failure. Nothing is skipped: a read either returns the shard's bytes in order or raises. A missing
object or a refused credential is not retried. The size the manifest records is checked against
the one the server reports when the shard is opened, and again at the end of the bytes read; with
``verify_shards: hash`` the sha256 of the bytes read is checked at the end of each shard.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

MAX_BACKOFF_S = 30.0
logger = logging.getLogger(__name__)


class LoaderError(RuntimeError):
    """The data cannot be loaded as configured (bad fraction exceeded, empty streams, unreadable shards...)."""


class ShardReadError(LoaderError):
    """A shard could not be read (missing, refused, or still failing after the last retry)."""


@dataclass
class ReadSettings:
    """How shards are read (the data section's runtime keys: where from and how patiently, not what)."""

    root: str | None = None   # where relative shard paths resolve; None: the manifest's folder
    retries: int = 5          # re-opens in a row after a dropped connection before the read fails
    backoff_s: float = 1.0    # wait before the first re-open; doubles each time, at most 30 s
    timeout_s: float = 60.0   # a connection silent this long counts as dropped
    hashes: bool = False      # check each remote shard's sha256 on the bytes read (verify_shards: hash)


def backoff(settings: ReadSettings, failures: int) -> float:
    """Seconds to wait after the ``failures``-th failure in a row: backoff_s, doubling, at most 30 s."""
    return min(MAX_BACKOFF_S, settings.backoff_s * 2 ** (failures - 1))


def is_url(location: str) -> bool:
    """Whether a shard location is one of the URL forms (not a local path)."""
    if location.startswith("pipe:"):
        return True
    scheme, separator, _ = location.partition("://")
    return bool(separator) and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum()


def shard_location(root: str, path: str) -> str:
    """A manifest's shard ``path`` as a location: a URL or absolute path as it is, else under ``root``
    (a folder, a URL prefix, or a ``pipe:`` command with ``{path}``)."""
    if is_url(path) or Path(path).is_absolute():
        return path
    if root.startswith("pipe:"):
        if "{path}" not in root:
            raise ShardReadError(f"data.shard_root {root!r}: a pipe: command needs {{path}} where the shard's path goes")
        return root.replace("{path}", path)
    if is_url(root):
        return root.rstrip("/") + "/" + path
    return str(Path(root) / path)


def _opener(location: str, timeout: float):
    """(open at byte offset -> (file, total size or None)) for a URL, by its form."""
    if location.startswith("pipe:"):
        return _PipeOpener(location[len("pipe:"):])
    if location.startswith(("http://", "https://")):
        return _HTTPOpener(location)
    return _FsspecOpener(location, timeout)


class _HTTPOpener:
    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(self, offset: int, timeout: float):
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as error:
            if error.code in (404, 410):
                raise FileNotFoundError(f"HTTP {error.code} {error.reason}") from None
            if error.code in (401, 403):
                raise PermissionError(f"HTTP {error.code} {error.reason}") from None
            raise
        total = _total_size(response, offset)
        if offset and response.status != 206:  # the server ignored the Range: skip to the offset
            _discard(response, offset)
        return response, total

    def size(self, timeout: float) -> int | None:
        request = urllib.request.Request(self.url, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return _total_size(response, 0)
        except urllib.error.HTTPError as error:
            if error.code in (404, 410):
                raise FileNotFoundError(f"HTTP {error.code} {error.reason}") from None
            raise


def _total_size(response, offset: int) -> int | None:
    """The whole object's size from a response: Content-Range's total, or Content-Length at offset 0."""
    content_range = response.headers.get("Content-Range")
    if content_range and "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return int(length) + (offset if response.status == 206 else 0) if length is not None else None


def _discard(stream, count: int) -> None:
    while count > 0:
        block = stream.read(min(count, 1 << 20))
        if not block:
            raise ConnectionError(f"the stream ended {count} bytes before the offset to resume at")
        count -= len(block)


class _FsspecOpener:
    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        # s3fs hands botocore's timeouts through; other protocols keep their own
        options = {"config_kwargs": {"read_timeout": timeout, "connect_timeout": timeout}} if url.startswith("s3://") else {}
        try:
            import fsspec
        except ImportError:  # pragma: no cover - torch installs fsspec
            raise ShardReadError(f"{url}: reading this URL needs fsspec (pip install fsspec)") from None
        try:
            self.filesystem, self.path = fsspec.core.url_to_fs(url, **options)
        except (ImportError, ValueError) as error:
            raise ShardReadError(f"{url}: no reader for this URL's protocol ({error}); for s3:// install the s3 "
                                 f"extra (pip install -e '.[s3]')") from None

    def __call__(self, offset: int, timeout: float):
        stream = self.filesystem.open(self.path, "rb", block_size=4 << 20)
        if offset:
            stream.seek(offset)
        return stream, stream.size

    def size(self, timeout: float) -> int | None:
        return self.filesystem.size(self.path)


class _PipeOpener:
    """``pipe:CMD``: the command's standard output; re-opening at an offset re-runs it and discards
    the first bytes (a pipe cannot seek)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __call__(self, offset: int, timeout: float):
        process = subprocess.Popen(self.command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stream = _ProcessOutput(process, self.command)
        if offset:
            _discard(stream, offset)
        return stream, None

    def size(self, timeout: float) -> int | None:
        return None  # not known before reading; checked at the end of the bytes read


class _ProcessOutput:
    """A command's stdout whose end is an error when the command failed."""

    def __init__(self, process: subprocess.Popen, command: str) -> None:
        self.process, self.command = process, command

    def read(self, size: int = -1) -> bytes:
        block = self.process.stdout.read(size)
        if not block and self.process.wait() != 0:
            message = self.process.stderr.read().decode(errors="replace").strip()[-300:]
            raise ConnectionError(f"the command exited with {self.process.returncode}: {message}")
        return block

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()
        self.process.stderr.close()


# Not retried: the object is not there, or the credentials are refused; a retry cannot help.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError)


class RemoteShard:
    """A remote shard as a forward-only binary file: re-opened at its offset when the connection
    drops, its size (and with ``settings.hashes`` its sha256) checked against the manifest's."""

    def __init__(self, location: str, size: int | None, sha256: str | None, settings: ReadSettings,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.location, self.expected_size, self.expected_sha256 = location, size, sha256
        self.settings, self.sleep = settings, sleep
        self.opener = _opener(location, settings.timeout_s)
        self.offset, self.stream, self.total = 0, None, size
        self.digest = hashlib.sha256() if settings.hashes and sha256 else None
        self.finished = False

    # -- the file protocol tarfile's stream mode uses ------------------------------------------
    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.finished:
            return b""
        failures, last_error = 0, None
        while True:
            try:
                if self.stream is None:
                    self._open()
                # read1 where the stream has it: what has arrived, so a stall keeps what came before it
                block = getattr(self.stream, "read1", self.stream.read)(size if size is not None and size >= 0 else 1 << 20)
            except ShardReadError:
                raise
            except PERMANENT as error:
                raise ShardReadError(f"{self.location}: {error}") from None
            except Exception as error:  # a dropped connection, a timeout, a server error: re-open
                block, last_error = None, error
            else:
                if block:
                    self._count(block)
                    return block
                if self.total is None or self.offset >= self.total:
                    self._finish()
                    return b""
                last_error = ConnectionError(f"the stream ended at byte {self.offset} of {self.total}")
            self._close_stream()
            failures += 1
            if failures > self.settings.retries:
                raise ShardReadError(f"{self.location}: reading failed at byte {self.offset} after {self.settings.retries} "
                                     f"retries: {type(last_error).__name__}: {last_error}")
            wait = backoff(self.settings, failures)
            logger.warning("%s: %s: %s; re-opening at byte %d in %.1f s (retry %d of %d)", self.location,
                           type(last_error).__name__, last_error, self.offset, wait, failures, self.settings.retries)
            self.sleep(wait)

    def close(self) -> None:
        self._close_stream()

    def __enter__(self) -> "RemoteShard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------
    def _open(self) -> None:
        stream, total = self.opener(self.offset, self.settings.timeout_s)
        self.stream = stream
        if total is not None:
            if self.expected_size is not None and total != self.expected_size:
                stream.close()
                raise ShardReadError(f"{self.location} is {total} bytes, the manifest says {self.expected_size}: "
                                     f"copy the shards again, or run the shard stage")
            self.total = total

    def _count(self, block: bytes) -> None:
        self.offset += len(block)
        if self.digest is not None:
            self.digest.update(block)
        if self.total is not None and self.offset > self.total:
            raise ShardReadError(f"{self.location}: more than the {self.total} bytes recorded arrived")

    def _finish(self) -> None:
        self.finished = True
        self._close_stream()
        if self.expected_size is not None and self.offset != self.expected_size:
            raise ShardReadError(f"{self.location} is {self.offset} bytes, the manifest says {self.expected_size}: "
                                 f"copy the shards again, or run the shard stage")
        if self.digest is not None and self.digest.hexdigest() != self.expected_sha256:
            raise ShardReadError(f"{self.location} is corrupted (the sha256 of its bytes differs from the one the "
                                 f"manifest records): copy the shards again, or run the shard stage")

    def _close_stream(self) -> None:
        if self.stream is not None:
            try:
                self.stream.close()
            except Exception:  # closing a broken connection can fail too; it is dropped either way
                pass
            self.stream = None

    def drain(self) -> None:
        """Read to the end (tarfile stops at the end-of-archive blocks) so the checks run."""
        while self.read(1 << 20):
            pass


def indexed_samples(members: Iterator[tuple[str, Callable[[], bytes]]], wanted=None) -> Iterator[tuple[int, dict]]:
    """(i, sample) for the samples of a tar's (name, read) members in order: members grouped by key
    (the name up to the first dot), as bytes; ``wanted(i)``: whether the i-th sample is read (the
    others' bytes are not read where the archive can seek, and they are not yielded)."""
    current: dict[str, bytes] = {}
    key, index = None, -1
    for name, read in members:
        name_key, _, suffix = name.partition(".")
        if name_key != key:
            if current:
                yield index, current
            current, key, index = {}, name_key, index + 1
        if wanted is None or wanted(index):
            current[suffix] = read()  # bytes only, never written to disk
    if current:
        yield index, current


def _tar_members(archive: tarfile.TarFile):
    for member in archive:
        if member.isfile():
            yield member.name, lambda member=member: archive.extractfile(member).read()


def read_local_tar(path: Path, wanted=None) -> Iterator[tuple[int, dict[str, bytes]]]:
    """A local tar's (i, sample) pairs; the archive seeks past the samples not ``wanted``."""
    with tarfile.open(path) as archive:
        yield from indexed_samples(_tar_members(archive), wanted)


def read_remote_tar(location: str, size: int | None, sha256: str | None, settings: ReadSettings,
                    wanted=None) -> Iterator[tuple[int, dict[str, bytes]]]:
    """A remote tar's (i, sample) pairs, streamed (tarfile's stream mode: no seeking, nothing on
    disk). Read to its end, its size and hash are checked after the last sample is handed out."""
    with RemoteShard(location, size, sha256, settings) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|") as archive:
                yield from indexed_samples(_tar_members(archive), wanted)
        except tarfile.TarError as error:
            raise ShardReadError(f"{location}: not a readable tar at byte {stream.offset}: {error}") from None
        stream.drain()


def remote_problems(locations: list[tuple[str, str, int | None]], settings: ReadSettings) -> list[str]:
    """The remote shards (name, location, recorded size) missing or of another size than recorded,
    asked of the server (HEAD, or the object store's metadata), 16 at a time; a ``pipe:`` shard is
    checked only as it is read."""
    def problem(item: tuple[str, str, int | None]) -> str | None:
        name, location, recorded = item
        opener = _opener(location, settings.timeout_s)
        for attempt in range(settings.retries + 1):
            try:
                size = opener.size(settings.timeout_s)
                break
            except PERMANENT as error:
                return f"{location} is missing or refused ({error})"
            except Exception as error:
                if attempt == settings.retries:
                    return f"{location} could not be reached after {settings.retries} retries: {error}"
                time.sleep(backoff(settings, attempt + 1))
        if size is not None and recorded is not None and size != recorded:
            return f"{location} is {size} bytes, the manifest says {recorded}"
        return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        return [found for found in pool.map(problem, locations) if found is not None]

