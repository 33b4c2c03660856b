"""The disk's floor for a merge: read every input once, write the output's bytes once, durably.

    python bench/io_floor.py --model DIR --model DIR --write-bytes N --out FILE [--json RESULT]

Reads each model's safetensors files front to back, one thread per model, the models in parallel (as
``cat`` does: buffered reads through the page cache, 8 MiB at a time); then writes ``N`` bytes of
incompressible data to FILE, 8 MiB at a time, and fsyncs it (as ``dd ... conv=fsync``). The two steps
run one after the other: on a machine with one disk they share it, so their sum is the least time a
merge of these inputs into an output of N bytes can take there (nothing computed, nothing planned).
``--json`` writes {"read_s", "write_s", "floor_s", "read_bytes", "write_bytes"} to RESULT. Needs
neither torch nor mergekit_fast.
"""

from __future__ import annotations

import argparse
import json
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
            while n := os.readv(fd, [view]):
                total += n
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


def write_synced(path: Path, nbytes: int) -> float:
    pattern = os.urandom(64 << 20)  # incompressible, and larger than any plausible deduplication unit
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pos = 0
        while pos < nbytes:
            off = pos % len(pattern)
            n = min(BLOCK, nbytes - pos, len(pattern) - off)
            pos += os.write(fd, pattern[off : off + n])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, action="append", required=True, help="an input model directory")
    p.add_argument("--write-bytes", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="the file written (removed afterwards)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    read_s, read_bytes = read_parallel(args.model)
    try:
        write_s = write_synced(args.out, args.write_bytes)
    finally:
        args.out.unlink(missing_ok=True)
    res = {"read_s": read_s, "write_s": write_s, "floor_s": read_s + write_s, "read_bytes": read_bytes,
           "write_bytes": args.write_bytes}  # fmt: skip
    print(f"read {read_bytes / 1e9:.2f} GB in {read_s:.2f} s ({read_bytes / read_s / 1e6:.0f} MB/s), wrote "
          f"{args.write_bytes / 1e9:.2f} GB + fsync in {write_s:.2f} s "
          f"({args.write_bytes / write_s / 1e6:.0f} MB/s): floor {read_s + write_s:.2f} s")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
