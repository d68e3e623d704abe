"""The tar shard writer: WebDataset samples written as the very bytes of webdataset's `TarWriter`,
hashed while written, with the files of a sample copied in as they are."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import math
import os
import queue
import tarfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.webds.sample import MEMBER_EXTENSIONS, ShardError, check_key, npy_bytes, npy_header

PADDING = [tarfile.NUL * n for n in range(tarfile.BLOCKSIZE)]  # zeros that fill a member's last block


class FileMember:
    """A file to copy into a shard as it is: opened, checked and sized by the thread building the
    sample, its bytes read by the shard writer's thread from the same open file, so reading
    overlaps building the next samples. The file is closed once read, or when dropped."""

    __slots__ = ("fd", "size", "path")

    def __init__(self, path: str | Path) -> None:
        self.fd = -1
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def __len__(self) -> int:
        return self.size

    def head(self, size: int) -> bytes:
        return os.pread(self.fd, size, 0)

    def read(self) -> bytes:
        data = bytearray(self.size)
        self.read_into(memoryview(data))
        return bytes(data)

    def read_into(self, buffer: memoryview) -> None:
        try:
            got = os.preadv(self.fd, [buffer], 0)
        finally:
            self.close()
        if got != self.size or len(buffer) != self.size:
            raise OSError(errno.EIO, f"{self.name} changed size while being read")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


NPY_HEAD = 512  # bytes read to check an .npy header (numpy's are 64-byte multiples, these ~128)


def npy_artifact(path: str | Path, dtype: str, ndim: int, data: bytes | None = None) -> FileMember | bytes:
    """An .npy file for a shard: the file itself when its header already says C-order `dtype`
    with `ndim` dimensions and its data are complete (the common case), else its array loaded
    and converted. `data`: the file's bytes when already read (from an object store), used instead."""
    member = FileMember(path) if data is None else None
    raw = data or b""
    head, size = (member.head(NPY_HEAD), member.size) if member is not None else (raw[:NPY_HEAD], len(raw))
    header = npy_header(head)
    if header:
        shape, fortran, file_dtype, offset = header
        complete = size - offset == math.prod(shape) * file_dtype.itemsize
        if file_dtype == np.dtype(dtype) and len(shape) == ndim and not fortran and complete:
            return member if member is not None else raw
    name = os.path.basename(str(path))
    try:
        array = np.load(io.BytesIO(member.read() if member is not None else raw), allow_pickle=False)
    except (ValueError, EOFError) as e:
        raise ShardError(f"bad_array: {name} is not a readable .npy ({e})") from e
    if array.ndim != ndim:
        raise ShardError(f"bad_array: {name} has shape {array.shape}, expected {ndim} dimensions")
    return npy_bytes(array.astype(dtype))



class TarShardWriter:
    """Writes WebDataset samples as a plain tar — the very bytes of webdataset's
    `TarWriter(encoder=False, mtime=0)` — while hashing it, and fsyncs it on `close` unless
    `durable=False` (then a power loss, not a process crash, can leave it short; verify tells).

    Member headers are tarfile's (see `member_header`), but the member data go to the file as they
    are, skipping tarfile's stream layer that copies every member through a 10 KB buffer. The
    caller's thread lays each ~1 MB batch out in one buffer (headers, bytes, and `FileMember`s read
    straight into place); a second thread writes it while a third hashes it. Both of those release
    the GIL for the whole batch, so they run beside the caller building the next samples instead of
    queueing for the GIL once per member. A few batch buffers circulate between the threads (reused
    buffers are already paged in; fresh ones fault every page on first touch), so memory and open
    files are bounded. A write error (disk full) is raised by the next `write` or by `close`.
    """

    # About a core's L2 cache: the batch is still in cache when hashed and written. With 4 MB
    # batches the same stage ran ~1.45x slower (bench/shards.py; writes from a 4 MB buffer cost
    # 2-5x the CPU of writes from a 1 MB one on the 2-core AMD EPYC the figures come from).
    BATCH_BYTES = 1 << 20
    QUEUED_BATCHES = 3
    WRITEBACK_BYTES = 8 << 20  # when durable, ask the kernel to start writing back every this many bytes

    def __init__(self, path: Path, durable: bool = True, sink: Any = None) -> None:
        """`sink`: instead of the file at `path`, a writable file object that publishes its bytes
        only on `close()` and drops them on `discard()` (an s3fs file: a multipart upload, completed
        at the end or aborted); the upload then overlaps building the next samples."""
        self.path = path
        self.durable = durable
        self.sink = sink
        self.fd = -1 if sink is not None else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.sha = hashlib.sha256()
        self.sent_bytes = 0
        self.written_bytes = 0  # by the writer thread
        self.writeback_from = 0  # start of the written bytes not yet handed to writeback
        self.batch: list[bytes | FileMember] = []
        self.batch_bytes = 0
        self.error: Exception | None = None
        self.finished = False  # closed or aborted: no more writes
        self.hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-sha256")
        self.batches: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self.free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(self.QUEUED_BATCHES + 1):
            self.free.put(bytearray())
        self.thread = threading.Thread(target=self._drain, name=f"shard-writer {path.name}", daemon=True)
        self.thread.start()

    def write(self, sample: dict[str, Any]) -> None:
        """Members `{key}.{ext}` in sorted order, as `TarWriter.write` lays them out. Values are
        bytes or `FileMember`s. Only a safe key with known extensions is written, so no member
        name can escape or confuse a reader (the checks of `split_member`, once per sample)."""
        if self.finished:
            raise ValueError(f"{self.path.name}: write after close or abort")
        key = check_key(sample["__key__"])
        extensions = sorted(ext for ext in sample if not ext.startswith("_"))
        if unknown := [ext for ext in extensions if ext not in MEMBER_EXTENSIONS]:
            raise ShardError(f"unexpected tar member {key}.{unknown[0]!r}")
        for ext in extensions:
            data = sample[ext]
            size = len(data)
            header = member_header(f"{key}.{ext}", size)  # 512 bytes, more for a PAX name
            padding = -size % tarfile.BLOCKSIZE
            self.batch += (header, data, PADDING[padding])
            self.batch_bytes += len(header) + size + padding
        if self.batch_bytes >= self.BATCH_BYTES:
            self._send()

    def close(self) -> tuple[int, str]:
        """End the archive (two zero blocks, padded to a whole record like tarfile), wait for the
        writes, fsync (when durable). Returns (bytes, sha256 hex). On error the partial file is
        removed."""
        if self.finished:
            raise ValueError(f"{self.path.name}: already closed or aborted")
        end = self.size + 2 * tarfile.BLOCKSIZE
        trailer = tarfile.NUL * (2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE)
        self.batch.append(trailer)
        self.batch_bytes += len(trailer)
        try:
            self._send()
            self._stop()
            if self.error:
                raise self.error
            if self.written_bytes != self.sent_bytes:  # the writer thread died without a word
                raise OSError(errno.EIO, f"{self.path.name}: {self.written_bytes} of {self.sent_bytes} bytes written")
            if self.sink is not None:
                self.sink.close()  # completes the upload: the object appears whole
            elif self.durable:
                os.fsync(self.fd)
        except BaseException:
            self.abort()
            raise
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
        self.finished = True
        return self.size, self.sha.hexdigest()

    def abort(self) -> None:
        """Stop writing and remove the partial file (nothing, once `close` has succeeded)."""
        if self.finished:
            return
        self.finished = True  # the writer thread drops what is still queued
        self._stop()
        release(self.batch)
        self.batch = []
        if self.sink is not None:
            with contextlib.suppress(Exception):  # best effort: an unfinished upload is invisible anyway
                self.sink.discard()
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()

    @property
    def size(self) -> int:
        """Bytes of the tar so far, counting samples not yet written out."""
        return self.sent_bytes + self.batch_bytes

    def _send(self) -> None:
        if self.error:
            raise self.error
        buffer = self.free.get()  # waits while every buffer is queued or being written
        if len(buffer) < self.batch_bytes:
            buffer = bytearray(self.batch_bytes)
        try:
            if lay_out(self.batch, memoryview(buffer)) != self.batch_bytes:
                raise RuntimeError(f"{self.path.name}: batch laid out to a length other than counted (a bug)")
        except BaseException:
            self.free.put(buffer)
            raise
        finally:
            release(self.batch)
        self.batches.put((buffer, self.batch_bytes))
        self.sent_bytes += self.batch_bytes
        self.batch, self.batch_bytes = [], 0

    def _stop(self) -> None:
        if self.thread.is_alive():
            self.batches.put(None)
            self.thread.join()
        self.hasher.shutdown()

    def _drain(self) -> None:
        while (item := self.batches.get()) is not None:
            buffer, length = item
            if self.error is not None or self.finished:
                self.free.put(buffer)
                continue
            batch = memoryview(buffer)[:length]
            try:
                hashing = self.hasher.submit(self.sha.update, batch)  # one hasher thread: in order
            except BaseException as e:  # noqa: BLE001 - e.g. interpreter shutdown: handed to the producer
                self.error = e
                self.free.put(buffer)
                continue
            try:
                self._write(batch)
            except Exception as e:  # noqa: BLE001 - handed to the producer, which raises it
                self.error = e
            # The buffer is free once hashed too; meanwhile this thread writes the next batch.
            hashing.add_done_callback(functools.partial(self._hashed, buffer))

    def _hashed(self, buffer: bytearray, hashing: Future) -> None:
        if hashing.exception() is not None:
            self.error = self.error or hashing.exception()
        self.free.put(buffer)

    def _write(self, buffer: memoryview) -> None:
        if self.sink is not None:
            self.sink.write(buffer)
            self.written_bytes += len(buffer)
            return
        write_all(self.fd, buffer)
        self.written_bytes += len(buffer)
        pending = self.written_bytes - self.writeback_from
        if self.durable and hasattr(os, "posix_fadvise") and pending >= self.WRITEBACK_BYTES:
            # On Linux this starts writing these pages to disk now (and lets the kernel drop them
            # once clean), so the fsync in close() waits for the last few MB, not the whole shard.
            os.posix_fadvise(self.fd, self.writeback_from, pending, os.POSIX_FADV_DONTNEED)
            self.writeback_from = self.written_bytes


def lay_out(batch: list[bytes | FileMember], buffer: memoryview) -> int:
    """The batch's bytes into the front of `buffer`, files read straight into their place; returns
    their length."""
    start = 0
    for item in batch:
        end = start + len(item)
        if isinstance(item, FileMember):
            item.read_into(buffer[start:end])
        else:
            buffer[start:end] = item
        start = end
    return start


def release(batch: list[bytes | FileMember]) -> None:
    """Close the files of a batch that won't be (or wasn't fully) written."""
    for item in batch:
        if isinstance(item, FileMember):
            item.close()


def member_header(name: str, size: int) -> bytes:
    """The header TarWriter gives a member. tarfile's default PAX format adds an extended header
    only for names over 100 bytes (or non-ASCII, or huge sizes); otherwise its bytes are exactly
    the USTAR header. That header differs between members of one size only in the name and the
    checksum (the sum of the header's bytes), so tarfile makes it once per size and the name is
    patched in: a sample's six headers cost ~3 µs instead of ~150 µs."""
    encoded = name.encode("ascii") if name.isascii() else b""
    if not encoded or len(encoded) > tarfile.LENGTH_NAME or size >= 0o77777777777:
        return tarfile_header(name, size, tarfile.PAX_FORMAT)
    blank, blank_sum = nameless_header(size)
    checksum = b"%06o\0" % (blank_sum + sum(encoded))
    return encoded.ljust(tarfile.LENGTH_NAME, tarfile.NUL) + blank[100:148] + checksum + blank[155:]


def tarfile_header(name: str, size: int, fmt: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "bigdata", "bigdata"
    return info.tobuf(fmt, "utf-8", "surrogateescape")


@functools.lru_cache(maxsize=4096)
def nameless_header(size: int) -> tuple[bytes, int]:
    """tarfile's USTAR header for a member of `size` bytes with an empty name, its checksum field
    blank (8 spaces, as tarfile sums it), and the sum of its bytes."""
    header = tarfile_header("", size, tarfile.USTAR_FORMAT)
    blank = header[:148] + b" " * 8 + header[156:]
    return blank, sum(blank)


def write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def write_failure(error: OSError, what: str) -> str:
    """A row reason for a failed write: `disk_full: ...` when out of space or quota."""
    kind = "disk_full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "write_error"
    return f"{kind}: {error.strerror or error} while writing {what}"
