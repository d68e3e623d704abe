"""The one WebDataset sample format: every shard writer, `verify` and the trainer read it from here.

A sample is the tar members `{key}.{ext}` of one clip: the arrays below (.npy, no pickle), its
provenance `json`, and optionally the clip's `flac` and `mp4`. Light imports only (numpy, no torch),
so the trainer can share it.
"""

from __future__ import annotations

import io
import json
import re
import struct

import numpy as np

from pipeline.timeline import STEPS

KEY = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
ARRAY_MEMBERS = {
    "tokens.npy": ("int16", 2),
    "hiera.npy": ("float16", 2),
    "music_beats.npy": ("int8", 1),
    "video_beats.npy": ("int8", 1),
    "beat_weights.npy": ("float32", 1),
}
REQUIRED = set(ARRAY_MEMBERS) | {"json"}
OPTIONAL = {"flac", "mp4"}
MEMBER_EXTENSIONS = frozenset(REQUIRED | OPTIONAL)
STEP_MEMBERS = tuple(m for m, (_, ndim) in ARRAY_MEMBERS.items() if ndim == 1)  # one value per step


class ShardError(ValueError):
    pass


def check_key(key: str) -> str:
    if not KEY.match(key):
        raise ShardError(f"unsafe sample key {key!r}: keys must match {KEY.pattern}")
    return key


def split_member(name: str) -> tuple[str, str]:
    """`key.ext` → (key, ext), refusing anything that could escape or confuse a reader."""
    if "/" in name or "\\" in name or name.startswith(".") or ".." in name:
        raise ShardError(f"unsafe tar member name {name!r}")
    key, _, ext = name.partition(".")
    check_key(key)
    if ext not in MEMBER_EXTENSIONS:
        raise ShardError(f"unexpected tar member {name!r}")
    return key, ext


_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}
_PARSED_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype]] = {}


def npy_bytes(array: np.ndarray) -> bytes:
    """`np.save`'s bytes for `array`; the header is made by numpy once per (dtype, shape)."""
    array = np.ascontiguousarray(array)
    spec = (array.dtype.str, array.shape)
    if spec not in _NPY_HEADERS:
        buf = io.BytesIO()
        np.save(buf, np.zeros(array.shape, array.dtype), allow_pickle=False)
        _NPY_HEADERS[spec] = buf.getvalue()[: buf.tell() - array.nbytes]
    return _NPY_HEADERS[spec] + array.tobytes()


def npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """(shape, fortran order, dtype, data offset) of .npy bytes, or None if they aren't .npy.
    Parsed by numpy once per distinct header: a run's token (or feature) files all share one."""
    fmt = np.lib.format
    version = tuple(data[fmt.MAGIC_LEN - 2: fmt.MAGIC_LEN])  # the magic string ends with the version
    read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
    if read_header is None or data[: fmt.MAGIC_LEN - 2] != fmt.MAGIC_PREFIX:
        return None
    length_bytes = 2 if version == (1, 0) else 4
    end = fmt.MAGIC_LEN + length_bytes + int.from_bytes(data[fmt.MAGIC_LEN: fmt.MAGIC_LEN + length_bytes], "little")
    raw = data[:end]
    if len(raw) < end:
        return None
    if raw not in _PARSED_HEADERS:
        if len(_PARSED_HEADERS) > 256:  # many distinct shapes: don't grow without bound
            _PARSED_HEADERS.clear()
        try:
            _PARSED_HEADERS[raw] = read_header(io.BytesIO(raw[fmt.MAGIC_LEN:]))
        except ValueError:
            return None
    shape, fortran, dtype = _PARSED_HEADERS[raw]
    return shape, fortran, dtype, end


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _step_packer(member: str) -> tuple[struct.Struct, np.dtype]:
    """Beat lists arrive as Python lists (rows cross Ray as JSON). struct packs 500 of them in ~6 µs,
    numpy's list conversion takes ~14; struct also refuses out-of-range ints and non-integer flags."""
    dtype = np.dtype(ARRAY_MEMBERS[member][0]).newbyteorder("<")  # numpy's type char is struct's code
    return struct.Struct(f"<{STEPS}{dtype.char}"), dtype


BEAT_ARRAYS = {  # name → (struct format of STEPS values, the .npy dtype they are read back as)
    member.removesuffix(".npy"): _step_packer(member) for member in STEP_MEMBERS
}


def check_sample(members: dict[str, bytes], frames: int) -> list[str]:
    problems = [f"missing {m}" for m in sorted(REQUIRED - set(members))]
    for name, (dtype, ndim) in ARRAY_MEMBERS.items():
        if name not in members:
            continue
        try:
            array = load_npy(members[name])
        except ValueError as e:
            problems.append(f"{name} unreadable ({e})")
            continue
        if str(array.dtype) != dtype or array.ndim != ndim:
            problems.append(f"{name} is {array.dtype}{list(array.shape)}, expected {dtype} with {ndim} dims")
        elif name == "tokens.npy" and array.shape[1] != frames:
            problems.append(f"tokens.npy has {array.shape[1]} steps, expected {frames}")
        elif name in STEP_MEMBERS and array.shape[0] != frames:
            problems.append(f"{name} has {array.shape[0]} steps, expected {frames}")
    if "json" in members:
        try:
            json.loads(members["json"])
        except ValueError:
            problems.append("json unreadable")
    return problems
