"""Bounded, reproducible fuzzing of the checkpoint readers (`sd.checkpoint.open_checkpoint`) with hypothesis.

(a) safetensors: a real header (47 tensors of the released SD1 key list, tests/data/checkpoint-keys/sd1.json, F16
    and I64, consistent offsets, a data section of zeros), mutated at the JSON level (values replaced by strings,
    null, negatives, floats, huge ints, nested lists, booleans; fields dropped or added; unknown dtypes; offsets
    swapped; tensors added or renamed; the metadata replaced) and at the byte level (bit flips, byte overwrites,
    truncations, insertions, deletions, length prefix changes).
(b) .ckpt: mutated bytes of a small weights-only `torch.save` zip and of a legacy (non-zip) pickle, and a zip whose
    `data.pkl` is mutated and repacked with valid CRCs (so the unpickler and the mmapped storages see the damage).

For every input, `open_checkpoint(path).shapes()` must either give a valid result (every tensor of a known dtype,
int shapes; the tensors readable, and for safetensors the file also opens in `safetensors.safe_open` with the same
names and shapes) or raise a one-line `CheckpointError` naming the file; any other exception fails the test. Each
input is read within 1 s of its own CPU time (time.thread_time), and nothing is written (the temporary folder holds only the input
afterwards). Examples are bounded (max_examples) and derandomized, so a run is reproducible; each test prints its
counts (inputs, outcomes by kind, total and slowest time), and the last one a summary line (`pytest -s` shows them).
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import pickletools
import struct
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sd.checkpoint import SAFETENSORS_DTYPES, CheckpointError, open_checkpoint

REFERENCE = Path(__file__).resolve().parent / "data" / "checkpoint-keys" / "sd1.json"
EXAMPLES = 300
TIME_LIMIT_S = 1.0
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])
TORCH_DTYPE_NAMES = {str(dt).removeprefix("torch.") for dt in SAFETENSORS_DTYPES.values()}
# Message fragments -> outcome kind, for the printed counts (first match wins).
KINDS = ("not a safetensors file", "MB limit", "objects/lists", "cannot read", "truncated", "__metadata__",
         "unknown dtype", "negative dimension", "dimensions (at most", "elements", "dimension that is", "shape that is",
         "data_offsets", "wrong byte size", "overlaps", "after a gap", "after the last tensor", "not an object",
         "has no", "tensors (a checkpoint", "not a PyTorch checkpoint", "refused", "cycle",
         "nested more", "holds no tensors", "holds a", "only dense")
SUMMARY: dict[str, "Fuzz"] = {}


class Fuzz:
    """Runs one input through open_checkpoint, checks the contract, and counts outcomes."""

    def __init__(self, label: str):
        self.label, self.outcomes, self.total, self.slowest = label, Counter(), 0.0, 0.0
        SUMMARY[label] = self

    @property
    def inputs(self) -> int:
        return sum(self.outcomes.values())

    def check(self, data: bytes, suffix: str) -> int | None:
        """Read `data` saved as a file with `suffix`; the number of tensors if valid, None if refused."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"fuzz{suffix}"
            path.write_bytes(data)
            t0 = time.thread_time()
            try:
                ckpt = open_checkpoint(path)
                shapes = ckpt.shapes()
            except CheckpointError as e:
                elapsed = time.thread_time() - t0
                msg = str(e)
                assert len(msg.splitlines()) == 1 and msg.startswith(path.name + ": "), msg
                outcome = "error: " + next((k for k in KINDS if k in msg), "other message")
                ckpt = None
            except Exception as e:  # counted for the summary, then the test fails (hypothesis shrinks the input)
                self.outcomes[f"OTHER {type(e).__name__}"] += 1
                raise
            else:
                elapsed = time.thread_time() - t0
                outcome = "valid"
            assert elapsed < TIME_LIMIT_S, (elapsed, outcome)
            self.total += elapsed
            self.slowest = max(self.slowest, elapsed)
            self.outcomes[outcome] += 1
            if ckpt is not None:
                self._check_valid(path, ckpt, shapes, suffix)
            assert os.listdir(tmp) == [path.name], os.listdir(tmp)  # nothing written beside the input
        return None if ckpt is None else len(ckpt.infos)

    @staticmethod
    def _check_valid(path: Path, ckpt, shapes: dict, suffix: str) -> None:
        known = set(SAFETENSORS_DTYPES) if suffix == ".safetensors" else TORCH_DTYPE_NAMES
        for name, info in ckpt.infos.items():
            assert isinstance(name, str) and info.dtype in known, (name, info)
            assert type(info.shape) is tuple and all(type(d) is int and d >= 0 for d in info.shape), info
            assert shapes[name] == info.shape
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in ckpt.metadata.items())
        if suffix == ".safetensors":  # what the header check accepts, safetensors itself opens
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                assert set(f.keys()) == set(ckpt.infos)
                for name, info in ckpt.infos.items():
                    assert tuple(f.get_slice(name).get_shape()) == info.shape
        for name, info in ckpt.infos.items():
            t = ckpt.get(name)
            assert type(t) is torch.Tensor and tuple(t.shape) == info.shape
            t.clone()  # the data is really readable (mmapped storages included)

    def report(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.outcomes.items(), key=lambda kv: -kv[1]))
        line = (f"fuzz {self.label}: {self.inputs} inputs in {self.total:.2f} s read time (slowest "
                f"{self.slowest * 1000:.1f} ms): {kinds}")
        print(line)
        return line


@pytest.fixture(scope="module", autouse=True)
def final_summary():
    yield
    inputs = sum(f.inputs for f in SUMMARY.values())
    valid = sum(f.outcomes["valid"] for f in SUMMARY.values())
    other = sum(n for f in SUMMARY.values() for k, n in f.outcomes.items() if k.startswith("OTHER"))
    total = sum(f.total for f in SUMMARY.values())
    slowest = max((f.slowest for f in SUMMARY.values()), default=0.0)
    print(f"\nfuzz summary: {len(SUMMARY)} tests, {inputs} inputs, {valid} valid, {inputs - valid - other} "
          f"CheckpointError, {other} other exceptions, {total:.2f} s read time, slowest input {slowest * 1000:.1f} ms")


# ----------------------------------------------------------------------------------------------------
# (a) safetensors


def _base_tensors() -> dict[str, tuple[str, list[int]]]:
    """47 real SD1 tensors: 40 one-dimensional ones spread over the key list, and the 7 multi-dimensional ones of at
    most 12,000 elements."""
    ref = json.loads(REFERENCE.read_text())["tensors"]
    one_d = [(k, s) for k, s in ref.items() if len(s) == 1 and math.prod(s) <= 12000][::12][:40]
    multi = [(k, s) for k, s in ref.items() if len(s) >= 2 and math.prod(s) <= 12000]
    return {k: ("I64" if k.endswith("position_ids") else "F16", s) for k, s in one_d + multi}


BASE = _base_tensors()


def build_header() -> tuple[dict, int]:
    """A valid header of BASE (insertion order, offsets back to back) and its data size."""
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, (dtype, shape) in BASE.items():
        size = math.prod(shape) * {"F16": 2, "I64": 8}[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + size]}
        pos += size
    return header, pos


def safetensors_bytes(header: dict, data_size: int) -> bytes:
    raw = json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(data_size)


def test_base_header_is_valid() -> None:
    """Control: the unmutated input opens, with its 47 tensors, so mutations start from a real, valid file."""
    header, size = build_header()
    f = Fuzz("control")
    assert f.check(safetensors_bytes(header, size), ".safetensors") == len(BASE) == 47
    assert f.outcomes == {"valid": 1}
    assert sum(len(s) >= 2 for _, s in BASE.values()) == 7


NAMES = list(BASE)
FIELDS = ("dtype", "shape", "data_offsets")
BIG_INTS = (-1, -2**63, 2**31, 2**32, 2**40, 2**40 + 1, 2**63, 2**64, 2**64 + 1, 10**30, int("9" * 4000))
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from(BIG_INTS),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(-3, 2**41), max_size=12),
    st.recursive(st.integers(0, 5) | st.none() | st.text(max_size=2),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                 max_leaves=8),
)
DTYPES = (st.sampled_from(sorted(SAFETENSORS_DTYPES) + ["F17", "f16", "float16", "", "C64", "F4", "U128"])
          | st.text(max_size=6))
TENSOR = st.integers(0, len(NAMES) - 1)
JSON_OP = st.one_of(
    st.tuples(st.just("set_field"), TENSOR, st.sampled_from(FIELDS), HOSTILE),
    st.tuples(st.just("drop_field"), TENSOR, st.sampled_from(FIELDS)),
    st.tuples(st.just("set_dim"), TENSOR, st.integers(0, 9), HOSTILE),
    st.tuples(st.just("ndims"), TENSOR, st.integers(0, 12)),
    st.tuples(st.just("dtype"), TENSOR, DTYPES),
    st.tuples(st.just("set_offset"), TENSOR, st.integers(0, 1), HOSTILE | st.sampled_from(BIG_INTS)),
    st.tuples(st.just("shift_offset"), TENSOR, st.integers(0, 1), st.integers(-64, 64)),
    st.tuples(st.just("swap_offsets"), TENSOR, TENSOR),
    st.tuples(st.just("entry"), TENSOR, HOSTILE),
    st.tuples(st.just("extra_field"), TENSOR, st.text(max_size=4), HOSTILE),
    st.tuples(st.just("rename"), TENSOR, st.text(max_size=6) | st.sampled_from(NAMES)),
    st.tuples(st.just("add_tensor"), st.text(max_size=6), DTYPES, HOSTILE, HOSTILE),
    st.tuples(st.just("metadata"), HOSTILE | st.dictionaries(st.text(max_size=3), HOSTILE, max_size=3)),
    st.tuples(st.just("data_size"), st.integers(-64, 64)),
)


def apply_json_ops(ops: list[tuple]) -> tuple[dict, int]:
    header, size = build_header()
    for op in ops:
        kind, args = op[0], op[1:]
        if kind == "metadata":
            header["__metadata__"] = args[0]
            continue
        if kind == "data_size":
            size = max(0, size + args[0])
            continue
        if kind == "add_tensor":
            name, dtype, shape, offsets = args
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
            continue
        name = NAMES[args[0]]
        if name not in header:
            continue
        entry = header[name]
        if not isinstance(entry, dict) and kind != "entry":
            continue
        if kind == "set_field":
            entry[args[1]] = args[2]
        elif kind == "drop_field":
            entry.pop(args[1], None)
        elif kind == "set_dim" and isinstance(entry.get("shape"), list):
            shape = entry["shape"]
            if args[1] < len(shape):
                shape[args[1]] = args[2]
            else:
                shape.append(args[2])
        elif kind == "ndims":
            entry["shape"] = [1] * args[1]
        elif kind == "dtype":
            entry["dtype"] = args[1]
        elif kind in ("set_offset", "shift_offset") and isinstance(entry.get("data_offsets"), list) \
                and len(entry["data_offsets"]) == 2:
            off = entry["data_offsets"]
            if kind == "set_offset":
                off[args[1]] = args[2]
            elif type(off[args[1]]) is int:
                off[args[1]] += args[2]
        elif kind == "swap_offsets":
            other = header.get(NAMES[args[1]])
            if isinstance(other, dict) and "data_offsets" in entry and "data_offsets" in other:
                entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
        elif kind == "entry":
            header[name] = args[1]
        elif kind == "extra_field":
            entry[args[1]] = args[2]
        elif kind == "rename":
            header[args[1]] = header.pop(name)
    return header, size


def test_fuzz_safetensors_json_mutations() -> None:
    fuzz = Fuzz("safetensors JSON-level")

    @SETTINGS
    @given(st.lists(JSON_OP, min_size=1, max_size=4))
    def run(ops):
        header, size = apply_json_ops(ops)
        fuzz.check(safetensors_bytes(header, size), ".safetensors")

    run()
    fuzz.report()
    assert fuzz.inputs >= EXAMPLES  # hypothesis ran the bounded number of inputs
    assert fuzz.outcomes["valid"] > 0 and fuzz.inputs - fuzz.outcomes["valid"] > EXAMPLES // 2


def _byte_ops(header: bytes):
    """Byte edits of a safetensors file whose first len(header) bytes are the length prefix and the header."""
    pos = st.integers(0, len(header) + 16)
    digits = [i for i, c in enumerate(header) if i >= 8 and chr(c).isdigit()]  # inside shapes and offsets
    tokens = [i for i, c in enumerate(header) if i >= 8 and c in b'{}[]":,']
    return st.lists(st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("set"), pos, st.integers(0, 255)),
        st.tuples(st.just("set"), st.sampled_from(digits), st.sampled_from(b"0123456789-.eE")),
        st.tuples(st.just("set"), st.sampled_from(tokens), st.sampled_from(b'{}[]":, 0n')),
        st.tuples(st.just("truncate"), st.integers(0, len(BASE_FILE))),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=8)
                  | st.sampled_from([b'"', b"{", b"[", b"]", b"-", b"9" * 30, b"\xff\xfe", b"\x00", b"1e999"])),
        st.tuples(st.just("insert"), st.sampled_from(digits), st.sampled_from([b"0", b"9" * 12, b"-", b".5", b"e3"])),
        st.tuples(st.just("delete"), pos, st.integers(1, 16)),
        st.tuples(st.just("prefix+"), st.integers(-16, 16)),
        st.tuples(st.just("prefix="), st.sampled_from([0, 1, 2, 2**32, 16 * 2**20 + 1, 100_000_001, 2**64 - 1])),
    ), min_size=1, max_size=2)  # more edits would nearly always just break the JSON syntax


def apply_byte_ops(data: bytes, ops: list[tuple], prefix_is_length: bool = False) -> bytes:
    b = bytearray(data)
    for op in ops:
        kind = op[0]
        if kind in ("prefix+", "prefix=") and prefix_is_length:  # the header length (first 8 bytes)
            n = struct.unpack("<Q", bytes(b[:8]).ljust(8, b"\0"))[0]
            b[:8] = struct.pack("<Q", (op[1] if kind == "prefix=" else max(0, n + op[1])) % 2**64)
        elif kind in ("flip", "set") and op[1] < len(b):
            b[op[1]] = b[op[1]] ^ (1 << op[2]) if kind == "flip" else op[2]
        elif kind == "truncate":
            del b[op[1]:]
        elif kind == "insert":
            b[op[1]:op[1]] = op[2]
        elif kind == "delete":
            del b[op[1]:op[1] + op[2]]
    return bytes(b)


BASE_FILE = safetensors_bytes(*build_header())
BASE_HEADER = BASE_FILE[:8 + struct.unpack("<Q", BASE_FILE[:8])[0]]


def test_fuzz_safetensors_byte_mutations() -> None:
    fuzz = Fuzz("safetensors byte-level")

    @SETTINGS
    @given(_byte_ops(BASE_HEADER))
    def run(ops):
        fuzz.check(apply_byte_ops(BASE_FILE, ops, prefix_is_length=True), ".safetensors")

    run()
    fuzz.report()
    assert fuzz.inputs >= EXAMPLES
    assert fuzz.outcomes["valid"] > 0 and fuzz.inputs - fuzz.outcomes["valid"] > EXAMPLES // 2


# ----------------------------------------------------------------------------------------------------
# (b) .ckpt


def _ckpt_object() -> dict:
    g = torch.Generator().manual_seed(0)
    sd = {"model.a.weight": torch.randn(4, 4, generator=g).half(), "model.b.bias": torch.zeros(3),
          "cond.position_ids": torch.arange(5)[None], "model.flag": torch.tensor(True)}
    return {"state_dict": sd, "global_step": 7, "epoch": 1}


def _legacy_object() -> dict:
    """One float16 storage with three tensor views into it (offsets, strides), as in a legacy checkpoint."""
    base = torch.randn(32, generator=torch.Generator().manual_seed(0)).half()
    sd = {"model.a.weight": base[:16].view(4, 4), "model.b.bias": base[16:19], "model.c": base[20:30].view(2, 5).t()}
    return {"state_dict": sd, "global_step": 7}


def _saved(obj: dict, **kw) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def _legacy_reproducible(data: bytes) -> bytes:
    """The legacy format names a storage by its memory address (str(storage._cdata)); rename the (one) storage "0",
    so the bytes, and hence the derandomized examples, are the same in every run."""
    f = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, sys info
        pickle.load(f)
    for _op in pickletools.genops(f):  # skip the object pickle (loading it needs a persistent_load)
        pass
    (key,) = pickle.load(f)  # the storage names, in the order of the data records
    return data.replace(b"X" + struct.pack("<I", len(key)) + key.encode(), b"X\x01\x00\x00\x000")


ZIP_FILE = _saved(_ckpt_object())
LEGACY_FILE = _legacy_reproducible(_saved(_legacy_object(), _use_new_zipfile_serialization=False))


def _pickle_name(data: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return next(n for n in z.namelist() if n.endswith("/data.pkl"))


def repack_with_pickle(data: bytes, pickle_bytes: bytes) -> bytes:
    """The torch zip with data.pkl replaced (CRCs recomputed), other records kept byte for byte."""
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    name = _pickle_name(data)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, pickle_bytes if info.filename == name else src.read(info.filename))
    return out.getvalue()


ZIP_PICKLE = zipfile.ZipFile(io.BytesIO(ZIP_FILE)).read(_pickle_name(ZIP_FILE))


def test_ckpt_controls_are_valid() -> None:
    """Control: the unmutated .ckpt inputs (zip, legacy, repacked zip) load, with 4, 3 and 4 tensors."""
    f = Fuzz("ckpt control")
    for data, count in ((ZIP_FILE, 4), (LEGACY_FILE, 3), (repack_with_pickle(ZIP_FILE, ZIP_PICKLE), 4)):
        assert f.check(data, ".ckpt") == count
    assert f.outcomes == {"valid": 3}
    assert zipfile.is_zipfile(io.BytesIO(ZIP_FILE)) and not zipfile.is_zipfile(io.BytesIO(LEGACY_FILE))


def _ckpt_byte_ops(size: int):
    pos = st.integers(0, size)
    return st.lists(st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("set"), pos, st.integers(0, 255)),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), pos, st.integers(1, 32)),
    ), min_size=1, max_size=4)


@pytest.mark.parametrize("kind", ["zip", "legacy", "zip-repacked-pickle"])
def test_fuzz_ckpt_byte_mutations(kind: str) -> None:
    fuzz = Fuzz(f"ckpt {kind}")
    base = {"zip": ZIP_FILE, "legacy": LEGACY_FILE, "zip-repacked-pickle": ZIP_PICKLE}[kind]

    @SETTINGS
    @given(_ckpt_byte_ops(len(base)))
    def run(ops):
        data = apply_byte_ops(base, ops)
        if kind == "zip-repacked-pickle":
            data = repack_with_pickle(ZIP_FILE, data)
        fuzz.check(data, ".ckpt")

    run()
    fuzz.report()
    assert fuzz.inputs >= EXAMPLES
    assert fuzz.inputs - fuzz.outcomes["valid"] > EXAMPLES // 4
