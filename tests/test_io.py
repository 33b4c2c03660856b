"""safetensors IO: round trips against the safetensors library, and hostile files.

The fuzz tests feed mutated headers and truncated files to the reader and accept only the
project's own errors (SafetensorsError / ModelError): no crash, hang or huge allocation.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mergekit_fast import _native
from mergekit_fast.io.model import ModelError, ModelSource
from mergekit_fast.io.safetensors import SafetensorsError, ShardReader, ShardWriter, read_header


def _sample() -> dict[str, torch.Tensor]:
    return {
        "w.bf16": torch.randn(7, 5).bfloat16(),
        "w.f32": torch.randn(3),
        "w.f16": torch.randn(2, 2, 2).half(),
        "ids": torch.arange(9, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
    }


def test_reader_matches_safetensors_library(tmp_path):
    sd = _sample()
    save_file(sd, tmp_path / "m.safetensors", metadata={"format": "pt"})
    tensors, meta = read_header(tmp_path / "m.safetensors")
    assert meta == {"format": "pt"}
    with ShardReader(tmp_path / "m.safetensors") as r:
        for k, v in sd.items():
            assert tensors[k].dtype == v.dtype and tensors[k].shape == tuple(v.shape)
            assert torch.equal(r.view(k), v) and torch.equal(r.read(k), v)
            r.release(k)
            assert torch.equal(r.view(k), v)  # released pages come back from the page cache
            if v.numel() and _native.C is not None:  # the native path's address is the view's
                assert r.address(k) == r.view(k).data_ptr()


def test_writer_out_of_order_roundtrip(tmp_path):
    sd = _sample()
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]
    w = ShardWriter(tmp_path / "o.safetensors", entries, metadata={"format": "pt"})
    for i, k in enumerate(reversed(list(sd))):
        # a tensor, or (the native path) a buffer of its bytes
        w.write(k, sd[k] if i % 2 else memoryview(sd[k].contiguous().view(-1).view(torch.uint8).numpy()))
    w.close()
    back = load_file(tmp_path / "o.safetensors")
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k])


def test_writer_refuses_wrong_tensor_and_early_close(tmp_path):
    w = ShardWriter(tmp_path / "o.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (3,))])
    with pytest.raises(ValueError, match="'a'"):
        w.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="'a': 12 bytes given, the plan says 8"):
        w.write("a", bytes(12))
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="missing"):
        w.close()
    w.abort()


def _file(tmp_path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return p


@pytest.mark.parametrize(
    "header, data, match",
    [
        (b"{not json", b"", "not valid JSON"),
        ([1, 2], b"", "JSON object"),
        ({"t": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "non-negative"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4, "outside the data area"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "outside the data area"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}, b"\0" * 4, "two integers"),
    ],
)
def test_malformed_headers(tmp_path, header, data, match):
    p = _file(tmp_path, json.dumps(header).encode() if not isinstance(header, bytes) else header, data)
    with pytest.raises(SafetensorsError, match=match) as exc:
        read_header(p)
    assert str(p) in str(exc.value)


def test_length_prefix_checks(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match="too short"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(SafetensorsError, match="exceeds"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(SafetensorsError, match="past the end"):
        read_header(p)


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("st") / "good.safetensors"
    save_file(_sample(), p)
    return p.read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_and_truncated(tmp_path, good_file, data):
    blob = bytearray(good_file)
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice", "prefix"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "splice":
        (n,) = struct.unpack("<Q", blob[:8])
        i = data.draw(st.integers(8, 8 + n - 1))
        blob[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        blob[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(bytes(blob))
    try:
        tensors, _ = read_header(p)
    except SafetensorsError:
        return
    # A header that validates must be safe to read from: every tensor lies inside the file.
    size = p.stat().st_size
    with ShardReader(p, tensors) as r:
        for name, info in tensors.items():
            assert info.end <= size
            assert r.view(name).numel() == info.numel


# ----------------------------------------------------------------------------- models


def test_model_refuses_pickles(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelError, match="pickled checkpoints"):
        ModelSource.open(tmp_path)


def test_model_errors_name_the_file(tmp_path):
    with pytest.raises(ModelError, match="no such directory"):
        ModelSource.open(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="config.json is missing"):
        ModelSource.open(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{broken")
    with pytest.raises(ModelError, match="cannot parse"):
        ModelSource.open(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        ModelSource.open(tmp_path / "m")


def test_sharded_model_index_checks(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(2)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                           "b": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    m = ModelSource.open(tmp_path)
    assert sorted(m.tensors) == ["a", "b"] and m.num_layers == 1
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="named in the index but missing"):
        ModelSource.open(tmp_path)
    index["weight_map"]["b"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="'b' is named in"):
        ModelSource.open(tmp_path)
