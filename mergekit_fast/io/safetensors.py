"""safetensors reading and writing, with every header validated before use.

Reading maps the file and hands out zero-copy tensor views; ``release`` drops a range's pages from
the process (madvise DONTNEED: the page cache keeps them), so resident memory stays bounded by what
is in flight, not by the model. Writing lays the whole shard out up front (header first, file
preallocated: a full disk fails here, before any work), then writes each tensor at its offset as
soon as it is ready, in any order: from a buffer (pwrite), or computed in place into a shared
mapping of the shard (``target``, then ``commit``).

Format: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

from mergekit_fast import dtypes
from mergekit_fast.dtypes import DType
from mergekit_fast.io import direct, kernel

# safetensors dtype codes -> dtypes (DType compares equal to the torch dtype of the same name).
DTYPES: dict[str, DType] = dtypes.BY_CODE

MAX_HEADER_BYTES = 100 * 1024 * 1024
_MADV_POPULATE_READ = kernel.MADV_POPULATE_READ
_MADV_POPULATE_WRITE = kernel.MADV_POPULATE_WRITE
MAX_DIMS = 32


class SafetensorsError(ValueError):
    """A safetensors file is malformed; the message names the file (and tensor)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def itemsize(dtype) -> int:
    """Bytes per element of a DType or torch dtype."""
    return dtypes.of(dtype).itemsize


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: (tensors by name, metadata)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{path}: file too short for a safetensors header ({size} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise SafetensorsError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise SafetensorsError(
                    f"{path}: header length {n} runs past the end of the file ({size} bytes)"
                )
            raw = f.read(n)
    except OSError as exc:
        raise SafetensorsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SafetensorsError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object")
    data_start = 8 + n
    data_size = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise SafetensorsError(f"{where}: entry must be an object")
        dtype_name = entry.get("dtype")
        if dtype_name not in DTYPES:
            raise SafetensorsError(f"{where}: unknown dtype {dtype_name!r}")
        shape = entry.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise SafetensorsError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        offs = entry.get("data_offsets")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise SafetensorsError(f"{where}: data_offsets must be two integers, got {offs!r}")
        begin, end = offs
        if not 0 <= begin <= end <= data_size:
            raise SafetensorsError(
                f"{where}: data_offsets [{begin}, {end}] outside the data area of {data_size} bytes"
            )
        dtype = DTYPES[dtype_name]
        expected = math.prod(shape) * itemsize(dtype)
        if end - begin != expected:
            raise SafetensorsError(
                f"{where}: {end - begin} bytes stored, but shape {shape} of {dtype_name} needs {expected}"
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    last_end, last_name = 0, None
    for s, e, name in spans:
        if s < last_end:
            raise SafetensorsError(f"{path}: tensors {last_name!r} and {name!r} overlap")
        if e > last_end:
            last_end, last_name = e, name
    return tensors, metadata


class ShardReader:
    """Zero-copy, read-only views of one safetensors file's tensors."""

    def __init__(self, path: str | os.PathLike, tensors: dict[str, TensorInfo] | None = None):
        self.path = Path(path)
        self.tensors = tensors if tensors is not None else read_header(self.path)[0]
        self._file = open(self.path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self._base: int | None = None
        self._advise_base: int | None | bool = False  # False: not looked up yet
        self._direct = direct.Descriptor(self.path)

    def _hint_base(self) -> int | None:
        """The mapping's address for the kernel calls (madvise, mincore), looked up once."""
        if self._advise_base is False:
            self._advise_base = kernel.buffer_address(self._mm)
        return self._advise_base

    def _madvise(self, advice: int, start: int, end: int) -> None:
        kernel.madvise(self._mm, self._hint_base(), advice, start, end)

    def _check(self, info: TensorInfo) -> None:
        if info.end > len(self._mm):
            raise SafetensorsError(
                f"{self.path}: tensor {info.name!r} lies past the end of the file (was it truncated?)"
            )

    def view(self, name: str):
        """The tensor as a zero-copy torch view of the mapped file. Never write to it."""
        import torch

        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype.torch)
        self._check(info)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "non-writable buffer": the view is read-only by contract
            flat = torch.frombuffer(self._mm, dtype=torch.uint8, count=info.nbytes, offset=info.start)
        return flat.view(info.dtype.torch).view(info.shape)

    def address(self, name: str) -> int:
        """The address of the tensor's first byte in the mapping (for the native kernels, without
        torch); valid until ``close``. Never write through it."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return 0
        self._check(info)
        if self._base is None:
            from mergekit_fast import _native

            self._base = _native.C.address(self._mm)
            self._advise_base = self._base
        return self._base + info.start

    def read(self, name: str):
        """A private, writable copy of the tensor."""
        return self.view(name).clone()

    def prefault(self, name: str) -> None:
        """Map the tensor's pages now (MADV_POPULATE_READ, Linux 5.14+), so that the thread that
        computes on it does not take the page faults; a no-op where unsupported."""
        info = self.tensors[name]
        if self._mm is None or info.nbytes == 0:
            return
        self._madvise(_MADV_POPULATE_READ, info.start, info.end)

    def willneed(self, name: str) -> int:
        """Ask the kernel to start reading the tensor's bytes now (posix_fadvise WILLNEED); returns
        the tensor's size. A no-op where unsupported."""
        info = self.tensors[name]
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(self._file.fileno(), info.start, info.nbytes, os.POSIX_FADV_WILLNEED)
        return info.nbytes

    def willneed_range(self, name: str, lo: int, hi: int) -> None:
        """``willneed`` for bytes [lo, hi) of the tensor only."""
        info = self.tensors[name]
        if hi > lo:
            kernel.fadvise(self._file.fileno(), info.start + lo, hi - lo, os.POSIX_FADV_WILLNEED)

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes, zero-copy, read-only (a view of the mapping; valid until ``close``)."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return memoryview(b"")
        self._check(info)
        return memoryview(self._mm)[info.start : info.end]

    def fileno(self) -> int:
        return self._file.fileno()

    def direct_fd(self) -> int | None:
        """An O_DIRECT descriptor of the file (opened once), or None where the filesystem refuses it."""
        return self._direct.get()

    def read_direct(self, name: str, buf) -> int:
        """Read the tensor's bytes into ``buf`` (a page-aligned buffer of at least ``direct_span(name)``
        bytes) past the page cache; returns the offset in ``buf`` of its first byte."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return 0
        self._check(info)
        fd = self.direct_fd()
        if fd is None:
            raise OSError(errno.EINVAL, f"{self.path}: the filesystem does not do direct I/O")
        try:
            return direct.read_into(fd, self._file.fileno(), info.start, info.nbytes, buf)
        except (OSError, EOFError) as exc:
            raise SafetensorsError(f"{self.path}: reading tensor {name!r} failed: {exc}") from None

    def resident(self, name: str) -> float | None:
        """The fraction of the tensor's pages in the page cache (None: unknown)."""
        info = self.tensors[name]
        if self._mm is None or info.nbytes == 0:
            return None
        return kernel.resident(self._mm, self._hint_base(), info.start, info.end)

    def direct_span(self, name: str) -> int:
        info = self.tensors[name]
        return direct.span(info.start, info.nbytes) if info.nbytes else 0

    def addressable(self, name: str) -> bool:
        return True

    def prefault_range(self, name: str, lo: int, hi: int) -> None:
        """``prefault`` for bytes [lo, hi) of the tensor only."""
        info = self.tensors[name]
        if self._mm is not None and hi > lo:
            self._madvise(_MADV_POPULATE_READ, info.start + lo, info.start + hi)

    def release_range(self, name: str, lo: int, hi: int) -> None:
        """``release`` for bytes [lo, hi) of the tensor only (whole pages inside the range, plus the pages
        the range shares with its neighbours: a page dropped early is simply read again)."""
        info = self.tensors[name]
        if self._mm is not None and hi > lo:
            self._madvise(kernel.MADV_DONTNEED, info.start + lo, info.start + hi)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (they stay in the page cache)."""
        info = self.tensors[name]
        if self._mm is None or info.nbytes == 0:
            return
        self._madvise(kernel.MADV_DONTNEED, info.start, info.end)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                # Views are still alive somewhere; the mapping goes when they do.
                pass
            self._mm = None
        self._direct.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _preallocate(fd: int, size: int) -> bool:
    """Size the file and reserve its blocks, so that a full disk fails now and never as a SIGBUS in
    a mapping. False where the filesystem (or OS) cannot reserve: the file is only sized."""
    try:
        os.posix_fallocate(fd, 0, size)
        return True
    except (OSError, AttributeError) as exc:  # AttributeError: no posix_fallocate on this OS
        if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    os.ftruncate(fd, size)
    return False


def layout(entries: list[tuple[str, DType, tuple[int, ...]]], metadata: dict[str, str] | None = None):
    """Header bytes and absolute (start, end) offsets for tensors written in the given order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in entries:
        if name in offsets:
            raise ValueError(f"duplicate tensor name {name!r} in one shard")
        nbytes = math.prod(shape) * itemsize(dtype)
        header[name] = {
            "dtype": dtypes.of(dtype).code,
            "shape": list(shape),
            "data_offsets": [pos, pos + nbytes],
        }
        offsets[name] = (pos, pos + nbytes)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
    base = 8 + len(raw)
    absolute = {k: (base + s, base + e) for k, (s, e) in offsets.items()}
    return struct.pack("<Q", len(raw)) + raw, absolute, base + pos


class ShardWriter:
    """A safetensors file written out of order: header first, each tensor at its offset.

    ``write_behind`` (bytes; 0: off): each tensor's bytes are handed to the disk as soon as they are
    written (sync_file_range WRITE, which starts their write-back and returns), and once more than that many
    bytes are in flight the oldest are waited for (WAIT_BEFORE | WRITE | WAIT_AFTER) and dropped from the
    page cache (posix_fadvise DONTNEED: clean pages nobody reads again). The kernel's own write-back starts
    only once dirty pages pass its background threshold (10% of memory), then throttles every writer and
    competes with the reads in bursts; written behind, the output streams to the disk while the inputs
    are read, dirty pages stay under ``write_behind``, and little is left to flush at the end. A hint
    only: where sync_file_range is missing it does nothing, and the bytes written never change."""

    def __init__(self, path: str | os.PathLike, entries, metadata: dict[str, str] | None = None,
                 write_behind: int = 0):  # fmt: skip
        self.path = Path(path)
        self.write_behind = write_behind if kernel.has_sync_file_range() else 0
        self._in_flight: collections.deque[tuple[int, int]] = collections.deque()
        self._in_flight_bytes = 0
        header, self.offsets, self.size = layout(entries, metadata)
        self._shapes = {name: (dtypes.of(dtype), tuple(shape)) for name, dtype, shape in entries}
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.written: set[str] = set()
        self._partial: dict[str, int] = {}  # bytes written so far of tensors written in pieces
        self._mm: mmap.mmap | None = None
        self._base = 0
        self._direct = direct.Descriptor(self.path, write=True)  # for write_placed
        try:
            os.pwrite(self._fd, header, 0)
            # Blocks reserved: tensors may be computed in place (target/commit); else pwrite only.
            self.mappable = _preallocate(self._fd, self.size)
        except OSError:
            self.abort()
            raise

    def target(self, name: str) -> int:
        """The address where tensor ``name``'s bytes go, in a shared mapping of the shard, with its
        pages mapped now (on the calling thread). Write them, then ``commit(name)``."""
        if not self.mappable:
            raise RuntimeError(f"{self.path}: the shard cannot be written through a mapping")
        if self._mm is None:
            from mergekit_fast import _native

            self._mm = mmap.mmap(self._fd, self.size)
            self._base = _native.C.address(self._mm)
        start, end = self.offsets[name]
        kernel.madvise(self._mm, self._base, _MADV_POPULATE_WRITE, start, end)
        return self._base + start

    def peek(self, name: str, nbytes: int) -> bytes:
        """The first ``nbytes`` of a ``target``-ed tensor (read before ``commit``)."""
        start, end = self.offsets[name]
        return self._mm[start : min(end, start + nbytes)]

    def commit(self, name: str) -> int:
        """Tensor ``name`` was written through ``target``: count it, and drop its pages from this
        process (the page cache keeps and writes them back)."""
        start, end = self.offsets[name]
        kernel.madvise(self._mm, self._base, kernel.MADV_DONTNEED, start, end)
        self._behind(start, end)
        self.written.add(name)
        return end - start

    def _behind(self, start: int, end: int) -> None:
        """Bytes [start, end) are written: start their write-back; wait for the oldest beyond the window."""
        if not self.write_behind or end <= start or self._fd is None:
            return
        kernel.sync_file_range(self._fd, start, end - start, kernel.SYNC_FILE_RANGE_WRITE)
        self._in_flight.append((start, end))
        self._in_flight_bytes += end - start
        while self._in_flight_bytes > self.write_behind and len(self._in_flight) > 1:
            s, e = self._in_flight.popleft()
            self._in_flight_bytes -= e - s
            kernel.sync_file_range(self._fd, s, e - s, kernel.SYNC_FILE_RANGE_WAIT_BEFORE
                                   | kernel.SYNC_FILE_RANGE_WRITE | kernel.SYNC_FILE_RANGE_WAIT_AFTER)  # fmt: skip
            kernel.fadvise(self._fd, s, e - s, os.POSIX_FADV_DONTNEED)

    def write(self, name: str, tensor) -> int:
        """Write a torch tensor of the planned dtype and shape, or a buffer of exactly its bytes."""
        dtype, shape = self._shapes[name]
        start, end = self.offsets[name]
        if hasattr(tensor, "dtype"):
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{self.path.name}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                    f"the plan says {dtype} {shape}"
                )
            mv = memoryview(tensor.detach().contiguous().reshape(-1).view(dtypes.uint8.torch).numpy())
        else:
            mv = memoryview(tensor).cast("B")
            if len(mv) != end - start:
                raise ValueError(
                    f"{self.path.name}: tensor {name!r}: {len(mv)} bytes given, the plan says {end - start}"
                )
        if end > start:
            pos = 0
            try:
                while pos < len(mv):  # pwrite may write less than asked
                    pos += os.pwrite(self._fd, mv[pos:], start + pos)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"{self.path}: writing tensor {name!r} failed: {exc.strerror}"
                ) from None
            self._behind(start, end)
        self.written.add(name)
        return end - start

    def copy_in(self, name: str, parts: list[tuple[ShardReader, str]]) -> int:
        """Fill tensor ``name`` with the bytes of the given input tensors, one after another, file to file
        (copy_file_range: no copy through this process), or through the mappings where the kernel or the
        filesystem cannot. The parts' sizes must add up to the tensor's; returns the bytes written."""
        start, end = self.offsets[name]
        total = sum(r.tensors[n].nbytes for r, n in parts)
        if total != end - start:
            raise ValueError(
                f"{self.path.name}: tensor {name!r}: the inputs hold {total} bytes, it needs {end - start}"
            )
        pos = start
        for reader, tensor in parts:
            info = reader.tensors[tensor]
            done = 0
            try:
                while done < info.nbytes:
                    k = os.copy_file_range(
                        reader.fileno(), self._fd, info.nbytes - done, info.start + done, pos + done
                    )
                    if k == 0:
                        raise OSError(errno.EIO, "copy_file_range copied nothing")
                    done += k
            except (OSError, AttributeError, TypeError) as exc:
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                    raise OSError(
                        exc.errno, f"{self.path}: writing tensor {name!r} failed: {exc.strerror}"
                    ) from None
                mv = reader.raw(tensor)[done:]
                w = 0
                try:
                    while w < len(mv):
                        w += os.pwrite(self._fd, mv[w:], pos + done + w)
                except OSError as err:
                    raise OSError(
                        err.errno, f"{self.path}: writing tensor {name!r} failed: {err.strerror}"
                    ) from None
            pos += info.nbytes
        self._behind(start, end)
        self.written.add(name)
        return end - start

    def lead(self, name: str) -> int:
        """Where tensor ``name``'s first byte goes in a page-aligned buffer for ``write_placed``."""
        return self.offsets[name][0] % direct.ALIGN

    def write_placed(self, name: str, buf) -> int:
        """Write tensor ``name`` from ``buf`` (page-aligned), where its bytes start at ``lead(name)``: its
        whole pages with direct I/O, past the page cache (io/direct.py), the partial first and last
        pages through it. Returns the bytes written."""
        start, end = self.offsets[name]
        if end > start:
            lead = self.lead(name)
            try:
                direct.write_from(
                    self._direct.get(), self._fd, start, memoryview(buf)[lead : lead + end - start]
                )
            except OSError as exc:
                raise OSError(
                    exc.errno, f"{self.path}: writing tensor {name!r} failed: {exc.strerror}"
                ) from None
        self.written.add(name)
        return end - start

    def write_at(self, name: str, offset: int, tensor) -> int:
        """Write part of tensor ``name``: a torch tensor's (or a buffer's) bytes at byte ``offset`` of the
        tensor. The tensor counts as written once all of its bytes have been (pieces must not overlap)."""
        start, end = self.offsets[name]
        mv = (memoryview(tensor.detach().contiguous().reshape(-1).view(dtypes.uint8.torch).numpy())
              if hasattr(tensor, "dtype") else memoryview(tensor).cast("B"))  # fmt: skip
        if offset < 0 or start + offset + len(mv) > end:
            raise ValueError(
                f"{self.path.name}: tensor {name!r}: bytes [{offset}, {offset + len(mv)}) outside its {end - start}"
            )
        pos = 0
        try:
            while pos < len(mv):
                pos += os.pwrite(self._fd, mv[pos:], start + offset + pos)
        except OSError as exc:
            raise OSError(exc.errno, f"{self.path}: writing tensor {name!r} failed: {exc.strerror}") from None
        self._behind(start + offset, start + offset + len(mv))
        done = self._partial.get(name, 0) + len(mv)
        self._partial[name] = done
        if done == end - start:
            self.written.add(name)
        return len(mv)

    @property
    def complete(self) -> bool:
        return len(self.written) == len(self.offsets)

    def close(self, fsync: bool = False) -> None:
        if self._fd is None:
            return
        if not self.complete:
            missing = sorted(set(self.offsets) - self.written)[:5]
            raise RuntimeError(
                f"{self.path.name}: closed before all tensors were written (missing {missing})"
            )
        self._unmap()
        self._direct.close()
        if fsync:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None

    def _unmap(self) -> None:
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # a view still alive: unmapped when it goes
                self._mm.close()
            self._mm = None

    def abort(self) -> None:
        self._unmap()
        self._direct.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
