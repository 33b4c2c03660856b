"""The disk's floor for a merge: read every input once, write the output's bytes once, durably.

    python bench/io_floor.py --model DIR --model DIR --write-bytes N --out FILE [--json RESULT]

Reads each model's safetensors files front to back, one thread per model, the models in parallel (as
``cat`` does: buffered reads with the kernel's read-ahead, 8 MiB at a time), each block dropped from the
page cache once read (``posix_fadvise`` DONTNEED, as ``dd iflag=nocache``); then writes ``N`` bytes of
incompressible data to FILE, 8 MiB at a time with O_DIRECT (buffered where the filesystem refuses it),
and fsyncs it (as ``dd ... oflag=direct conv=fsync``). The two steps run one after the other: on a
machine with one disk they share it, so their sum is the least time a merge of these inputs into an
output of N bytes can take there (nothing computed, nothing planned).

Why drop and write direct: the bytes are what count, not the page cache. Without either, the 15 GB of
input pages the reads leave behind (a 7B-class pair on a 24 GiB machine) make the kernel reclaim memory
while the write dirties 7.5 GB more: measured on the 2-core development VM (2026-12-02, inputs evicted
first), the same 7.5 GB write took 13.7-19.2 s after the reads against 3.0-3.6 s buffered and 1.9-2.0 s
O_DIRECT with the memory free, so the old floor (buffered both ways) was 18.5-24.8 s where the disk
needs about 8 s.
``--json`` writes {"read_s", "write_s", "floor_s", "read_bytes", "write_bytes"} to RESULT. Needs
neither torch nor mergekit_fast.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import threading
import time
from pathlib import Path

BLOCK = 8 << 20


def read_model(files: list[Path], counts: list[int]) -> None:
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    total = 0
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            pos = 0
            while n := os.readv(fd, [view]):
                os.posix_fadvise(fd, pos, n, os.POSIX_FADV_DONTNEED)
                pos += n
            total += pos
        finally:
            os.close(fd)
    counts.append(total)


def read_parallel(models: list[Path]) -> tuple[float, int]:
    counts: list[int] = []
    threads = [
        threading.Thread(target=read_model, args=(sorted(m.glob("*.safetensors")), counts)) for m in models
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sum(counts)


def _open_write(path: Path) -> tuple[int, bool]:
    """(descriptor, direct): O_DIRECT where the filesystem allows it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError:
            pass
    return os.open(path, flags, 0o644), False


def write_synced(path: Path, nbytes: int) -> float:
    # Incompressible, larger than any plausible deduplication unit; an anonymous mapping is page-aligned.
    pattern = mmap.mmap(-1, 64 << 20)
    pattern.write(os.urandom(len(pattern)))
    view = memoryview(pattern)
    t0 = time.perf_counter()
    fd, direct = _open_write(path)
    try:
        pos = 0
        while pos < nbytes:
            off = pos % len(pattern)
            n = min(BLOCK, nbytes - pos, len(pattern) - off)
            if direct and n % 4096:  # the unaligned tail: through the page cache
                os.close(fd)
                fd, direct = os.open(path, os.O_WRONLY), False
            pos += os.pwritev(fd, [view[off : off + n]], pos)
        os.fsync(fd)
    finally:
        os.close(fd)
        view.release()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, action="append", required=True, help="an input model directory")
    p.add_argument("--write-bytes", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="the file written (removed afterwards)")
    p.add_argument("--keep", action="store_true",
                   help="leave the file for the caller to remove: unlinking 14.5 GB takes ext4 about 2 s, "
                        "which is not the merge's work (bench_merge removes every tool's output untimed)")  # fmt: skip
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--overlap", action="store_true",
                   help="read and write at the same time (as a merge does) instead of one after the other")  # fmt: skip
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.overlap:
            got: list = []
            reader = threading.Thread(target=lambda: got.append(read_parallel(args.model)))
            reader.start()
            try:
                write_s = write_synced(args.out, args.write_bytes)
            finally:
                reader.join()
            read_s, read_bytes = got[0]
        else:
            read_s, read_bytes = read_parallel(args.model)
            write_s = write_synced(args.out, args.write_bytes)
        floor_s = time.perf_counter() - t0
    finally:
        if not args.keep:
            args.out.unlink(missing_ok=True)
    res = {"read_s": read_s, "write_s": write_s, "floor_s": floor_s, "read_bytes": read_bytes,
           "write_bytes": args.write_bytes, "overlap": args.overlap}  # fmt: skip
    print(f"read {read_bytes / 1e9:.2f} GB in {read_s:.2f} s ({read_bytes / read_s / 1e6:.0f} MB/s), wrote "
          f"{args.write_bytes / 1e9:.2f} GB + fsync in {write_s:.2f} s "
          f"({args.write_bytes / write_s / 1e6:.0f} MB/s){' at the same time' if args.overlap else ''}: "
          f"floor {floor_s:.2f} s")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
