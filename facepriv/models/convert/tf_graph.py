"""A small, dependency-free reader for frozen TensorFlow graphs (``GraphDef`` ``.pb`` files).

TensorFlow is not needed (nor wanted) to use weights that were published as a frozen graph:
the file is a protocol-buffer message, and the wire format is simple enough to decode in a
few dozen lines. This module decodes exactly the messages a frozen inference graph uses:

* ``GraphDef``      - ``node`` (1), ``library`` (2, skipped), ``version`` (3), ``versions`` (4)
* ``NodeDef``       - ``name`` (1), ``op`` (2), ``input`` (3), ``device`` (4), ``attr`` (5)
* ``AttrValue``     - ``list`` (1), ``s`` (2), ``i`` (3), ``f`` (4), ``b`` (5), ``type`` (6),
  ``shape`` (7), ``tensor`` (8), ``placeholder`` (9), ``func`` (10)
* ``TensorProto``   - dtype, shape, ``tensor_content`` or the typed ``*_val`` fields
* ``TensorShapeProto`` - ``dim`` (2: ``size`` 1, ``name`` 2), ``unknown_rank`` (3)

    >>> graph = read_graph("graph_final.pb")
    >>> consts = graph.constants()          # {node name: numpy array}
    >>> graph.node("InceptionResnetV1/Bottleneck/BatchNorm/cond/FusedBatchNorm_1").attr["epsilon"]

Anything that is not a well-formed GraphDef (another format, a truncated or corrupt file)
raises :class:`ValueError` with the reason.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# TensorFlow DataType enum -> numpy dtype (the ones a weights graph can hold).
DTYPES: dict[int, np.dtype] = {
    enum: np.dtype(code) for enum, code in (
        (1, "<f4"), (2, "<f8"), (3, "<i4"), (4, "u1"), (5, "<i2"), (6, "i1"),  # FLOAT DOUBLE INT32 UINT8 INT16 INT8
        (9, "<i8"), (10, "?"), (17, "<u2"), (19, "<f2"), (22, "<u4"), (23, "<u8"),  # INT64 BOOL UINT16 HALF UINT32 UINT64
    )
}
DT_STRING = 7
DTYPE_NAMES = {**{enum: dtype.name for enum, dtype in DTYPES.items()}, DT_STRING: "string", 14: "bfloat16"}

# TensorProto typed-value field number -> element dtype of its packed encoding
_VAL_FIELDS: dict[int, np.dtype] = {
    5: np.dtype("<f4"),  # float_val
    6: np.dtype("<f8"),  # double_val
    7: np.dtype("<i4"),  # int_val (int32/int16/int8/uint8 as varints)
    10: np.dtype("<i8"),  # int64_val
    11: np.dtype("?"),  # bool_val
    13: np.dtype("<i4"),  # half_val (bit patterns as varints)
    16: np.dtype("<u4"),  # uint32_val
    17: np.dtype("<u8"),  # uint64_val
}
_VARINT_VALS = {7, 10, 11, 13, 16, 17}


# --------------------------------------------------------------------------- wire format
def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(field number, wire type, value)`` of one message.

    Values: wire type 0 -> int, 1 -> 8 raw bytes, 2 -> memoryview, 5 -> 4 raw bytes.
    """
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos, end)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise ValueError("field number 0")
        if wt == 0:
            val, pos = _varint(buf, pos, end)
        elif wt == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise ValueError(f"length-delimited field {num} runs past its message")
            val, pos = buf[pos : pos + n], pos + n
        elif wt in (1, 5):
            n = 8 if wt == 1 else 4
            if pos + n > end:
                raise ValueError("truncated fixed-width field")
            val, pos = bytes(buf[pos : pos + n]), pos + n
        else:
            raise ValueError(f"unsupported wire type {wt} (field {num})")
        yield num, wt, val


def _expect(num: int, wt: int, want: int, what: str) -> None:
    if wt != want:
        raise ValueError(f"{what}: field {num} has wire type {wt}, expected {want}")


def _text(val: Any, what: str) -> str:
    try:
        return bytes(val).decode("utf-8")
    except (UnicodeDecodeError, TypeError):
        raise ValueError(f"{what} is not UTF-8 text") from None


def _packed_varints(buf: memoryview) -> list[int]:
    out, pos, end = [], 0, len(buf)
    while pos < end:
        v, pos = _varint(buf, pos, end)
        out.append(v)
    return out


# --------------------------------------------------------------------------- messages
def parse_shape(buf: memoryview) -> tuple[int, ...] | None:
    """``TensorShapeProto`` -> tuple of sizes (-1 = unknown), ``None`` for unknown rank."""
    dims: list[int] = []
    unknown = False
    for num, wt, val in _fields(buf):
        if num == 2:
            _expect(num, wt, 2, "TensorShapeProto")
            size = 0
            for n2, w2, v2 in _fields(val):
                if n2 == 1:
                    _expect(n2, w2, 0, "TensorShapeProto.Dim")
                    size = _signed64(v2)
            dims.append(size)
        elif num == 3:
            unknown = bool(val)
    return None if unknown else tuple(dims)


def parse_tensor(buf: memoryview) -> np.ndarray:
    """``TensorProto`` -> numpy array (``object`` array of bytes for string tensors)."""
    dtype_enum, shape, content = 0, (), None
    vals: dict[int, list] = {}
    for num, wt, val in _fields(buf):
        if num == 1:
            _expect(num, wt, 0, "TensorProto.dtype")
            dtype_enum = val
        elif num == 2:
            _expect(num, wt, 2, "TensorProto.tensor_shape")
            shape = parse_shape(val) or ()
        elif num == 4:
            _expect(num, wt, 2, "TensorProto.tensor_content")
            content = val
        elif num == 8:
            vals.setdefault(8, []).append(bytes(val))
        elif num in _VAL_FIELDS:
            dt = _VAL_FIELDS[num]
            items = vals.setdefault(num, [])
            if wt == 2 and num in _VARINT_VALS:  # packed varints
                items.extend(_signed64(v) for v in _packed_varints(val))
            elif wt == 2:  # packed fixed-width
                if len(val) % dt.itemsize:
                    raise ValueError(
                        f"TensorProto field {num}: packed size {len(val)} is not a multiple of {dt.itemsize}"
                    )
                items.extend(np.frombuffer(val, dtype=dt).tolist())
            elif wt == 0:
                items.append(_signed64(val))
            elif wt in (1, 5):
                items.extend(np.frombuffer(val, dtype=dt).tolist())
    if any(s < 0 for s in shape):
        raise ValueError(f"constant tensor with unknown dimension {shape}")
    count = int(np.prod(shape, dtype=np.int64))
    if dtype_enum == DT_STRING:
        items = vals.get(8, [])
        arr = np.empty(count, dtype=object)
        if items:
            arr[:] = (items + [items[-1]] * count)[:count]
        return arr.reshape(shape)
    if dtype_enum not in DTYPES:
        name = DTYPE_NAMES.get(dtype_enum, f"enum {dtype_enum}")
        raise ValueError(f"unsupported tensor dtype {name}")
    dtype = DTYPES[dtype_enum]
    if content is not None and len(content):
        if len(content) != count * dtype.itemsize:
            raise ValueError(
                f"tensor_content has {len(content)} bytes, shape {shape} of {dtype} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(content, dtype=dtype).reshape(shape).copy()
    items = next((v for v in vals.values() if v), [])
    if dtype_enum == 19:  # half_val holds the 16-bit patterns
        flat = np.asarray(items, dtype=np.int64).astype(np.uint16).view(np.float16)
    else:
        flat = np.asarray(items).astype(dtype)
    if flat.size == count:
        return flat.reshape(shape)
    if flat.size > count:
        raise ValueError(f"tensor holds {flat.size} values for shape {shape}")
    out = np.zeros(count, dtype=dtype)  # fewer values: the last one repeats (TF semantics)
    if flat.size:
        out[: flat.size] = flat
        out[flat.size :] = flat[-1]
    return out.reshape(shape)


@dataclass(frozen=True)
class AttrList:
    """An ``AttrValue.ListValue``: the typed lists it carried (empty ones omitted)."""

    s: tuple[bytes, ...] = ()
    i: tuple[int, ...] = ()
    f: tuple[float, ...] = ()
    b: tuple[bool, ...] = ()
    type: tuple[int, ...] = ()
    shape: tuple[tuple[int, ...] | None, ...] = ()
    tensor: tuple[np.ndarray, ...] = ()

    def values(self) -> tuple:
        """Whichever list is set (attributes hold one kind)."""
        return self.s or self.i or self.f or self.b or self.type or self.shape or self.tensor


# ``AttrValue`` and its ``ListValue`` number their typed fields alike
_ATTR_KINDS = {2: "s", 3: "i", 4: "f", 5: "b", 6: "type", 7: "shape", 8: "tensor"}


def _attr_values(num: int, wt: int, val: Any) -> list:
    """The values of one typed field (2-8) of an ``AttrValue`` or ``ListValue``: one, or
    several where a list packs its numbers."""
    if num == 4:
        data = bytes(val)
        return list(struct.unpack(f"<{len(data) // 4}f", data))
    if num in (3, 5, 6):
        conv = _signed64 if num == 3 else (bool if num == 5 else int)
        return [conv(v) for v in (_packed_varints(val) if wt == 2 else [val])]
    return [{2: bytes, 7: parse_shape, 8: parse_tensor}[num](val)]


def _parse_list(buf: memoryview) -> AttrList:
    out: dict[str, list] = {key: [] for key in _ATTR_KINDS.values()}
    for num, wt, val in _fields(buf):
        if num in _ATTR_KINDS:
            out[_ATTR_KINDS[num]].extend(_attr_values(num, wt, val))
    return AttrList(**{k: tuple(v) for k, v in out.items()})


def parse_attr(buf: memoryview) -> Any:
    """``AttrValue`` -> bytes | int | float | bool | dtype enum | shape | ndarray | AttrList."""
    result: Any = None
    for num, wt, val in _fields(buf):
        if num == 1:
            result = _parse_list(val)
        elif num in _ATTR_KINDS:
            if num in (3, 4, 5, 6):  # one number, not a packed list
                _expect(num, wt, 5 if num == 4 else 0, f"AttrValue.{_ATTR_KINDS[num]}")
            result = _attr_values(num, wt, val)[0]
        elif num == 9:
            result = _text(val, "AttrValue.placeholder")
        elif num == 10:
            result = ("func", bytes(val))
    return result


@dataclass
class NodeDef:
    """One graph node: ``name``, ``op``, ``inputs`` (``"^x"`` = control input) and ``attr``.

    Attribute values are decoded lazily (a frozen graph's ``Const`` nodes hold the weights).
    """

    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    device: str = ""
    _raw_attr: dict[str, memoryview] = field(default_factory=dict, repr=False)
    _attr: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def attr(self) -> dict[str, Any]:
        if self._attr is None:
            self._attr = {k: parse_attr(v) for k, v in self._raw_attr.items()}
        return self._attr

    @property
    def data_inputs(self) -> list[str]:
        """Inputs without control dependencies and without the ``:0`` output suffix."""
        return [
            i.split(":")[0] if i.endswith(":0") else i for i in self.inputs if not i.startswith("^")
        ]

    def value(self) -> np.ndarray:
        """The tensor of a ``Const`` node."""
        if self.op != "Const":
            raise ValueError(f"node {self.name!r} is a {self.op}, not a Const")
        val = self.attr.get("value")
        if not isinstance(val, np.ndarray):
            raise ValueError(f"Const node {self.name!r} has no tensor value")  # noqa: TRY004 - bad file
        return val


def parse_node(buf: memoryview) -> NodeDef:
    name = op = device = ""
    inputs: list[str] = []
    raw: dict[str, memoryview] = {}
    for num, wt, val in _fields(buf):
        if num in (1, 2, 3, 4, 5):
            _expect(num, wt, 2, "NodeDef")
        if num == 1:
            name = _text(val, "NodeDef.name")
        elif num == 2:
            op = _text(val, "NodeDef.op")
        elif num == 3:
            inputs.append(_text(val, "NodeDef.input"))
        elif num == 4:
            device = _text(val, "NodeDef.device")
        elif num == 5:
            key, value = "", memoryview(b"")
            for n2, w2, v2 in _fields(val):
                _expect(n2, w2, 2, "NodeDef.attr entry")
                if n2 == 1:
                    key = _text(v2, "attr key")
                elif n2 == 2:
                    value = v2
            raw[key] = value
    if not name or not op:
        raise ValueError("NodeDef without a name or an op")
    return NodeDef(name=name, op=op, inputs=inputs, device=device, _raw_attr=raw)


@dataclass
class Graph:
    """A decoded ``GraphDef``: the nodes in file order plus a by-name index."""

    nodes: list[NodeDef]
    producer: int | None = None
    _by_name: dict[str, NodeDef] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {n.name: n for n in self.nodes}

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def node(self, name: str) -> NodeDef:
        try:
            return self._by_name[name.split(":")[0] if name.endswith(":0") else name]
        except KeyError:
            raise KeyError(f"graph has no node {name!r}") from None

    def ops(self, op: str) -> list[NodeDef]:
        return [n for n in self.nodes if n.op == op]

    def constants(self) -> dict[str, np.ndarray]:
        """Every ``Const`` node's tensor, by node name."""
        return {n.name: n.value() for n in self.nodes if n.op == "Const"}

    def consumers(self) -> dict[str, list[NodeDef]]:
        """Node name -> the nodes that take it as a data input."""
        out: dict[str, list[NodeDef]] = {}
        for n in self.nodes:
            for i in n.data_inputs:
                out.setdefault(i, []).append(n)
        return out


def parse_graph_def(data: bytes | bytearray | memoryview) -> Graph:
    """Decode a serialized ``GraphDef``; :class:`ValueError` if it is not one."""
    buf = memoryview(data)
    nodes: list[NodeDef] = []
    producer = None
    try:
        for num, wt, val in _fields(buf):
            if num == 1:
                _expect(num, wt, 2, "GraphDef.node")
                nodes.append(parse_node(val))
            elif num == 2:
                _expect(num, wt, 2, "GraphDef.library")
            elif num == 3:
                _expect(num, wt, 0, "GraphDef.version")
            elif num == 4:
                _expect(num, wt, 2, "GraphDef.versions")
                for n2, w2, v2 in _fields(val):
                    if n2 == 1 and w2 == 0:
                        producer = v2
            else:
                raise ValueError(f"unexpected top-level field {num}")
    except ValueError as exc:
        raise ValueError(f"not a TensorFlow GraphDef (or a corrupt one): {exc}") from None
    if not nodes:
        raise ValueError("not a TensorFlow GraphDef: no nodes")
    return Graph(nodes=nodes, producer=producer)


def read_graph(path: str | Path) -> Graph:
    """Read a frozen ``GraphDef`` (``.pb``) file."""
    data = Path(path).read_bytes()
    try:
        return parse_graph_def(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
