"""The Linux interfaces the readers and writers use, called without holding Python's GIL.

CPython's ``mmap.madvise`` keeps the GIL for the whole call, and ``MADV_POPULATE_READ`` on a tensor
that is not in the page cache lasts as long as the disk takes to read it (0.1 to 0.3 s for a 7B
model's MLP tensor): every other thread of the merge -- the compute stage between two kernels, the
writer -- stood still meanwhile. The functions here call the C library through ctypes, which releases
the GIL around the call, so that a thread waiting on the disk stops nobody else. Where something is
missing (another OS, no C library, no address for a buffer) each falls back to the standard library's
call or to nothing, as its docstring says; the hints never change results, only timing.

    madvise(mm, base, advice, start, end)  page advice over the pages of bytes [start, end) of a mapping
    sync_file_range(fd, start, n, flags)    start (and/or wait for) the write-back of a file range
    fadvise(fd, start, n, advice)           posix_fadvise (the os module's: it releases the GIL)
    resident(mm, base, start, end)          the fraction of a file range's pages in the page cache
    buffer_address(buf)                     the address of a buffer's first byte (for madvise)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

# Linux values; Python 3.11 lacks the names.
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
PAGE = mmap.PAGESIZE


def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None, None, None
    madv = getattr(lib, "madvise", None)
    if madv is not None:
        madv.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        madv.restype = ctypes.c_int
    mincore = getattr(lib, "mincore", None)
    if mincore is not None:
        mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
        mincore.restype = ctypes.c_int
    sfr = getattr(lib, "sync_file_range", None)
    if sfr is not None:
        sfr.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        sfr.restype = ctypes.c_int
    return lib, madv, sfr, mincore


_LIB, _MADVISE, _SYNC_FILE_RANGE, _MINCORE = _libc()


def buffer_address(buf) -> int | None:
    """The address of the first byte of ``buf`` (an mmap, read-only ones included), or None where it
    cannot be had without holding an export of the buffer (which would keep an mmap from closing)."""
    try:
        from mergekit_fast import _native

        if _native.C is not None:
            return _native.C.address(buf)
    except (ImportError, TypeError, BufferError):
        pass
    try:  # a writable buffer: ctypes sees its address (the export ends with the temporary object)
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except (TypeError, ValueError, BufferError):
        return None


def page_range(size: int, start: int, end: int) -> tuple[int, int]:
    """(offset, length) of the whole pages covering bytes [start, end) of a mapping of ``size`` bytes."""
    first = start // PAGE * PAGE
    return first, min(size, -(-end // PAGE) * PAGE) - first


def madvise(mm: mmap.mmap, base: int | None, advice: int, start: int, end: int) -> None:
    """madvise ``advice`` over the pages of bytes [start, end) of mapping ``mm`` whose first byte is at
    ``base``: through the C library without the GIL where ``base`` is known, else mmap.madvise. A no-op
    where the kernel lacks the advice (errors are ignored: these are hints)."""
    if end <= start or mm.closed:
        return
    off, length = page_range(len(mm), start, end)
    if length <= 0:
        return
    if base is not None and _MADVISE is not None:
        _MADVISE(base + off, length, advice)
        return
    try:
        mm.madvise(advice, off, length)
    except (AttributeError, OSError, ValueError):
        pass


def resident(mm: mmap.mmap, base: int | None, start: int, end: int) -> float | None:
    """The fraction of the pages of bytes [start, end) of the file mapping ``mm`` (first byte at ``base``)
    that are in the page cache (mincore: it reports the file's cached pages, mapped here or not), or
    None where unknown (no address, no mincore, an error)."""
    if base is None or _MINCORE is None or mm.closed or end <= start:
        return None
    off, length = page_range(len(mm), start, end)
    pages = -(-length // PAGE)
    if pages <= 0:
        return None
    vec = ctypes.create_string_buffer(pages)
    if _MINCORE(base + off, length, vec) != 0:
        return None
    return (pages - vec.raw[:pages].count(0)) / pages


def fadvise(fd: int, start: int, nbytes: int, advice: int) -> None:
    """posix_fadvise, ignoring every error (a hint)."""
    try:
        os.posix_fadvise(fd, start, nbytes, advice)
    except (OSError, AttributeError):
        pass


def has_sync_file_range() -> bool:
    return _SYNC_FILE_RANGE is not None


def sync_file_range(fd: int, start: int, nbytes: int, flags: int) -> bool:
    """Linux sync_file_range (without the GIL): SYNC_FILE_RANGE_WRITE starts the write-back of the dirty
    pages of the range and returns; with WAIT_BEFORE / WAIT_AFTER it waits for the write-back of the
    range to end. Returns False where unavailable or refused (the caller then leaves write-back to the
    kernel); an I/O error surfaces at the file's close or fsync, as for any write-back."""
    if _SYNC_FILE_RANGE is None or nbytes <= 0:
        return False
    return _SYNC_FILE_RANGE(fd, start, nbytes, flags) == 0
