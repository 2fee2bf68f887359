"""Run small ONNX graphs as torch modules, and tidy ONNX files for onnxruntime.

Two jobs, both done in memory (a cached model file is never modified):

* **Clean-up for onnxruntime.** Some exporters list every initializer as a graph input, and
  quantisation tools leave the original float weights behind as inputs that no node reads
  any more. onnxruntime then treats the stale ones as *required* inputs and refuses to run.
  :func:`stale_inputs` finds them and :func:`strip_stale_inputs` removes them;
  :func:`fix_single_scale_blocks` rewrites block-quantised tensors made of a single block
  (valid ONNX that onnxruntime rejects); :func:`make_dynamic` turns fixed input sizes
  (``1x3x640x640``) into symbolic ones so the same graph accepts any batch or image size.
  :func:`onnxruntime_bytes` does all of it.

* **A white-box torch port.** :func:`convert_onnx` folds the constant part of a graph (weight
  ``DequantizeLinear`` + ``Reshape``, ``Constant``) into float tensors and writes the remaining
  nodes as a small JSON *program*; :class:`OnnxGraphModule` executes that program with torch
  ops, so gradients flow through it. The result of :func:`convert_onnx` is a flat
  ``{name: tensor}`` dict (the program rides along as a ``uint8`` tensor under
  :data:`PROGRAM_KEY`), which is exactly what :meth:`LoadContext.cached_state_dict` caches
  as safetensors: later loads need neither ``onnx`` nor the original file.

The interpreter implements the operators that the face-recognition graphs facepriv ships
need (``Conv``, ``BatchNormalization``, ``PRelu``, ``Gemm``, ``Flatten``, ``Dropout``,
element-wise arithmetic, ``Relu``/``Sigmoid``, ``Reshape``); anything else raises
:class:`NotImplementedError` at conversion time, never silently at run time.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PROGRAM_KEY = "__onnx_program__"
PROGRAM_FORMAT = "facepriv-onnx-program/1"

# --------------------------------------------------------------------------- onnx clean-up


def _load(model: Any):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    return onnx.load(str(model))


def stale_inputs(model: Any) -> list[str]:
    """Names of graph inputs that are initializers or that no node consumes."""
    m = _load(model)
    inits = {t.name for t in m.graph.initializer}
    used = {name for node in m.graph.node for name in node.input}
    used |= {o.name for o in m.graph.output}
    return [i.name for i in m.graph.input if i.name in inits or i.name not in used]


def strip_stale_inputs(model: Any):
    """A copy of the model without :func:`stale_inputs` (the argument is left untouched)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(_load(model))
    stale = set(stale_inputs(m))
    keep = [i for i in m.graph.input if i.name not in stale]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    return m


def make_dynamic(model: Any, dims: Mapping[str, list[int | str]] | None = None):
    """A copy whose inputs have the given (possibly symbolic) dims and whose outputs are free.

    ``dims`` maps input names to dims, ``str`` entries being symbolic (``["N", 3, "H", "W"]``);
    without it every input gets a symbolic batch and, for 4-d inputs, symbolic H and W.
    Intermediate shape annotations (``value_info``) are dropped: they were inferred for the
    old fixed size and would contradict the new one.
    """
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(_load(model))

    def set_dims(value: Any, new: list[int | str]) -> None:
        shape = value.type.tensor_type.shape
        del shape.dim[:]
        for d in new:
            dim = shape.dim.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = int(d)

    for value in m.graph.input:
        old = [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]
        if dims is not None and value.name in dims:
            set_dims(value, list(dims[value.name]))
        elif dims is None and old:
            new: list[int | str] = ["N", *old[1:]]
            if len(old) == 4:
                new[2:] = ["H", "W"]
            set_dims(value, new)
    for i, value in enumerate(m.graph.output):
        rank = len(value.type.tensor_type.shape.dim)
        set_dims(value, [f"out{i}_{k}" for k in range(rank)])
    del m.graph.value_info[:]
    return m


def single_scale_blocks(model: Any) -> list[str]:
    """``DequantizeLinear`` nodes that declare a ``block_size`` but have a one-element scale.

    Valid ONNX (one block spans the whole axis), but onnxruntime reads a one-element scale as
    per-tensor quantisation and then rejects any ``block_size``.
    """
    m = _load(model)
    sizes = {t.name: int(np.prod(t.dims)) for t in m.graph.initializer}
    out = []
    for node in m.graph.node:
        if node.op_type != "DequantizeLinear" or sizes.get(node.input[1]) != 1:
            continue
        if any(a.name == "block_size" and a.i for a in node.attribute):
            out.append(node.name or node.output[0])
    return out


def fix_single_scale_blocks(model: Any):
    """A copy where :func:`single_scale_blocks` nodes are plain per-tensor dequantisation
    (the same arithmetic: one scale and zero point for the whole tensor)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(_load(model))
    bad = set(single_scale_blocks(m))
    inits = {t.name: t for t in m.graph.initializer}
    scalars: dict[str, str] = {}
    for node in m.graph.node:
        if (node.name or node.output[0]) not in bad:
            continue
        keep = [a for a in node.attribute if a.name not in ("block_size", "axis")]
        del node.attribute[:]
        node.attribute.extend(keep)
        for k in range(1, min(len(node.input), 3)):  # scale, zero point -> 0-d tensors
            name = node.input[k]
            if name and name not in scalars:
                scalars[name] = f"{name}__scalar"
                arr = numpy_helper.to_array(inits[name]).reshape(())
                m.graph.initializer.append(numpy_helper.from_array(arr, scalars[name]))
            if name:
                node.input[k] = scalars[name]
    return m


def onnxruntime_bytes(model: Any, dims: Mapping[str, list[int | str]] | None = None,
                      dynamic: bool = True) -> bytes:
    """Serialized model ready for ``onnxruntime.InferenceSession``: stale inputs removed,
    one-block quantisation rewritten as per-tensor (:func:`fix_single_scale_blocks`) and,
    if ``dynamic``, input sizes made symbolic (see :func:`make_dynamic`)."""
    m = fix_single_scale_blocks(strip_stale_inputs(model))
    if dynamic:
        m = make_dynamic(m, dims)
    return m.SerializeToString()


def onnx_providers(device: torch.device | str = "cpu") -> list[str]:
    """onnxruntime execution providers for a torch device (CUDA when asked for and present)."""
    import onnxruntime as ort

    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(model: bytes | str | Path, device: torch.device | str = "cpu", threads: int = 0):
    """A quiet onnxruntime session (``threads=0``: onnxruntime's default thread count)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, opts, providers=onnx_providers(device))


# --------------------------------------------------------------------------- constant folding


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper, numpy_helper

    out: dict[str, Any] = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif hasattr(v, "dims") and hasattr(v, "data_type"):  # TensorProto
            v = numpy_helper.to_array(v)
        elif isinstance(v, list):
            v = [x.decode() if isinstance(x, bytes) else x for x in v]
        out[a.name] = v
    return out


def _dequantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
                axis: int = 1, block_size: int = 0) -> np.ndarray:
    """ONNX ``DequantizeLinear``: per-tensor, per-axis or blocked, computed like onnxruntime
    (integer difference, then one float32 multiply)."""
    xi = x.astype(np.int32)
    zi = np.zeros_like(scale, dtype=np.int32) if zero is None else zero.astype(np.int32)
    scale = scale.astype(np.float32)
    if scale.size == 1 and block_size == 0:  # per tensor
        return ((xi - zi.reshape(())).astype(np.float32) * scale.reshape(())).astype(np.float32)
    axis = axis % x.ndim
    if block_size == 0:  # per axis: 1-d scale along `axis`
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zi = scale.reshape(shape), zi.reshape(shape)
    else:  # blocked: scale has x's rank, dim `axis` is ceil(n / block_size)
        n = x.shape[axis]
        scale = np.repeat(scale, block_size, axis=axis).take(np.arange(n), axis=axis)
        zi = np.repeat(zi, block_size, axis=axis).take(np.arange(n), axis=axis)
    return ((xi - zi).astype(np.float32) * scale).astype(np.float32)


def _reshape_shape(shape: list[int], target: np.ndarray | list[int], allowzero: int = 0) -> list[int]:
    out = [int(v) for v in np.asarray(target).reshape(-1)]
    if not allowzero:
        out = [shape[i] if v == 0 else v for i, v in enumerate(out)]
    return out


def _fold(op: str, ins: list[np.ndarray | None], attrs: dict[str, Any]) -> list[np.ndarray] | None:
    """Evaluate a node whose inputs are all constants, or return None to keep it at run time."""
    if op == "Constant":
        if "value" not in attrs:
            raise NotImplementedError(f"Constant with {sorted(attrs)} is not supported")
        return [np.asarray(attrs["value"])]
    if op == "Identity":
        return [ins[0]]
    if op == "DequantizeLinear":
        return [_dequantize(ins[0], ins[1], ins[2] if len(ins) > 2 else None,
                            int(attrs.get("axis", 1)), int(attrs.get("block_size", 0)))]
    if op == "Reshape":
        return [ins[0].reshape(_reshape_shape(list(ins[0].shape), ins[1], attrs.get("allowzero", 0)))]
    if op == "Cast":
        from onnx import helper

        return [ins[0].astype(helper.tensor_dtype_to_np_dtype(int(attrs["to"])))]
    return None


# --------------------------------------------------------------------------- conversion


def _key(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "t"
    key, i = base, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


def convert_onnx(path: str | Path | bytes) -> dict[str, torch.Tensor]:
    """Fold an ONNX graph into float tensors plus a program for :class:`OnnxGraphModule`.

    Weights stored quantised (``DequantizeLinear`` on int8 initializers) come out dequantised
    to float32 exactly as onnxruntime computes them.
    """
    from onnx import numpy_helper

    m = _load(path)
    g = m.graph
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    inputs = [i.name for i in g.input if i.name not in consts]
    nodes = []
    for node in g.node:
        attrs = _attrs(node)
        if all(not n or n in consts for n in node.input):
            folded = _fold(node.op_type, [consts[n] if n else None for n in node.input], attrs)
            if folded is not None:
                consts.update(zip(node.output, folded))
                continue
        if node.op_type not in _OPS:
            raise NotImplementedError(f"ONNX operator {node.op_type} ({node.name or node.output[0]}) "
                                      "is not supported by facepriv's torch interpreter")
        nodes.append({"op": node.op_type, "inputs": list(node.input), "outputs": list(node.output),
                      "attrs": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in attrs.items()}})
    used = {n for node in nodes for n in node["inputs"] if n}
    used_inputs = [n for n in inputs if n in used]
    taken: set[str] = {PROGRAM_KEY}
    table: dict[str, str] = {}
    state: dict[str, torch.Tensor] = {}
    for name in sorted(used & set(consts)):
        key = _key(name, taken)
        table[name] = key
        arr = np.ascontiguousarray(consts[name])
        state[key] = torch.from_numpy(arr.copy())
    program = {"format": PROGRAM_FORMAT, "inputs": used_inputs, "outputs": [o.name for o in g.output],
               "constants": table, "nodes": nodes}
    state[PROGRAM_KEY] = torch.frombuffer(bytearray(json.dumps(program).encode()), dtype=torch.uint8)
    return state


# --------------------------------------------------------------------------- interpreter

Tensor = torch.Tensor


def _conv(x: Tensor, w: Tensor, b: Tensor | None = None, *, attrs: dict) -> Tensor:
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"Conv auto_pad={attrs['auto_pad']}")
    nd = w.ndim - 2
    pads = list(attrs.get("pads", [0] * (2 * nd)))
    begin, end = pads[:nd], pads[nd:]
    padding: Any = begin
    if begin != end:  # asymmetric: pad explicitly (F.pad takes last dim first)
        x = F.pad(x, [p for i in reversed(range(nd)) for p in (begin[i], end[i])])
        padding = 0
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return conv(x, w, b, stride=attrs.get("strides", 1), padding=padding,
                dilation=attrs.get("dilations", 1), groups=attrs.get("group", 1))


def _batchnorm(x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor, *, attrs: dict) -> Tensor:
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))


def _gemm(a: Tensor, b: Tensor, c: Tensor | None = None, *, attrs: dict) -> Tensor:
    if attrs.get("transA", 0):
        a = a.transpose(-1, -2)
    if attrs.get("transB", 0):
        b = b.transpose(-1, -2)
    y = a @ b
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _prelu(x: Tensor, slope: Tensor, *, attrs: dict) -> Tensor:
    # per-channel slope (C, 1, ..., 1) on (N, C, ...): torch's fused kernel
    if x.ndim >= 2 and (slope.numel() == 1 or (slope.ndim == x.ndim - 1 and slope.shape[0] == x.shape[1]
                                              and all(d == 1 for d in slope.shape[1:]))):
        return F.prelu(x, slope.reshape(-1))
    return torch.where(x >= 0, x, x * slope)  # general ONNX broadcasting


def _flatten(x: Tensor, *, attrs: dict) -> Tensor:
    axis = attrs.get("axis", 1) % max(x.ndim, 1)
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _reshape(x: Tensor, shape: Tensor, *, attrs: dict) -> Tensor:
    return x.reshape(_reshape_shape(list(x.shape), shape.tolist(), attrs.get("allowzero", 0)))


_OPS: dict[str, Callable[..., Tensor]] = {
    "Conv": _conv,
    "BatchNormalization": _batchnorm,
    "PRelu": _prelu,
    "Gemm": _gemm,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Dropout": lambda x, *rest, attrs: x,  # inference: identity (a mask output is never used)
    "Identity": lambda x, *, attrs: x,
    "Add": lambda a, b, *, attrs: a + b,
    "Sub": lambda a, b, *, attrs: a - b,
    "Mul": lambda a, b, *, attrs: a * b,
    "Div": lambda a, b, *, attrs: a / b,
    "Relu": lambda x, *, attrs: F.relu(x),
    "Sigmoid": lambda x, *, attrs: torch.sigmoid(x),
}


class OnnxGraphModule(nn.Module):
    """Executes a program made by :func:`convert_onnx` with torch ops (differentiable).

    Float constants are ``nn.Parameter`` s (so ``.to(device)``, ``.parameters()`` and
    ``requires_grad_`` behave as for any torch model); integer constants are buffers.
    ``forward`` takes the graph's inputs positionally and returns its single output (or a
    tuple when the graph has several).
    """

    def __init__(self, program: Mapping[str, Any], tensors: Mapping[str, Tensor]):
        super().__init__()
        if program.get("format") != PROGRAM_FORMAT:
            raise ValueError(f"not a {PROGRAM_FORMAT} program: {program.get('format')!r}")
        self.program = dict(program)
        self.params = nn.ParameterDict()
        for key in program["constants"].values():
            t = tensors[key]
            if t.is_floating_point():  # prefixed: ONNX names may clash with Module attributes
                self.params[f"p_{key}"] = nn.Parameter(t.clone(), requires_grad=False)
            else:
                self.register_buffer(f"int_{key}", t.clone())
        self._names: dict[str, str] = dict(program["constants"])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> OnnxGraphModule:
        """Build from :func:`convert_onnx` output (or its safetensors cache)."""
        raw = state[PROGRAM_KEY].to(torch.uint8).cpu().numpy().tobytes()
        return cls(json.loads(raw.decode()), state)

    def _const(self, name: str) -> Tensor:
        key = self._names[name]
        return self.params[f"p_{key}"] if f"p_{key}" in self.params else getattr(self, f"int_{key}")

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        names = self.program["inputs"]
        if len(inputs) != len(names):
            raise TypeError(f"expected {len(names)} input(s) ({', '.join(names)}), got {len(inputs)}")
        env: dict[str, Tensor] = dict(zip(names, inputs))
        for node in self.program["nodes"]:
            args = [None if not n else env[n] if n in env else self._const(n) for n in node["inputs"]]
            while args and args[-1] is None:
                args.pop()
            env[node["outputs"][0]] = _OPS[node["op"]](*args, attrs=node["attrs"])
        outs = tuple(env[n] for n in self.program["outputs"])
        return outs[0] if len(outs) == 1 else outs
