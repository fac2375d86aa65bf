"""A small builder for ONNX graphs, and the writer that stores their weights in one shared file.

The exporter (``onnx_export.py``) builds the prefill and decode graphs op by op with this builder:
every op is known, nothing is traced. Both graphs reference the same weight names; the weights are
written once, to one external data file that both ``.onnx`` files point into, so the export on disk
is the size of the weights once (not twice) and no graph ever meets protobuf's 2 GB limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Tensors smaller than this stay inside each graph; larger ones go to the shared data file.
INLINE_MAX_BYTES = 1024
DATA_ALIGN = 64

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.bool_): TensorProto.BOOL,
}


class GraphBuilder:
    """Collects nodes of one graph; ``op`` returns the output name(s) of the node it adds.

    ``weights`` (shared between graphs) maps initializer names to arrays; ``const`` adds small
    inline constants, deduplicated.
    """

    def __init__(self, name: str, weights: Optional[dict] = None):
        self.name = name
        self.nodes: list = []
        self.consts: dict = {}
        self._const_keys: dict = {}
        self.weights = weights if weights is not None else {}
        self.used_weights: list = []
        self._n = 0

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, hint: Optional[str] = None, out_names=None,
           **attrs):
        base = hint or op_type
        names = list(out_names) if out_names else [self.fresh(f"{base}") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh(f"n/{base}"), **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, value, dtype) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._const_keys:
            name = self.fresh("const")
            self.consts[name] = arr
            self._const_keys[key] = name
        return self._const_keys[key]

    def i64(self, *values) -> str:
        return self.const(list(values), np.int64)

    def f32(self, value) -> str:
        return self.const(value, np.float32)

    def weight(self, name: str) -> str:
        if name not in self.weights:
            raise KeyError(name)
        if name not in self.used_weights:
            self.used_weights.append(name)
        return name


def value_info(name: str, elem_type: int, shape: Sequence) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def write_shared_data(weights: dict, directory: Path, data_file: str) -> dict:
    """Write every weight of at least ``INLINE_MAX_BYTES`` to ``directory/data_file`` once.

    Returns name -> (offset, length) for the tensors written.
    """
    layout = {}
    offset = 0
    with open(Path(directory) / data_file, "wb") as f:
        for name, arr in weights.items():
            if arr.nbytes < INLINE_MAX_BYTES:
                continue
            pad = (-offset) % DATA_ALIGN
            if pad:
                f.write(b"\0" * pad)
                offset += pad
            buf = np.ascontiguousarray(arr)
            f.write(buf.tobytes(order="C"))
            layout[name] = (offset, buf.nbytes)
            offset += buf.nbytes
    return layout


def _initializer(name: str, arr: np.ndarray, layout: dict, data_file: str) -> TensorProto:
    if name not in layout:
        return numpy_helper.from_array(np.ascontiguousarray(arr), name)
    t = TensorProto()
    t.name = name
    t.data_type = NP_TO_ONNX[arr.dtype]
    t.dims.extend(arr.shape)
    t.data_location = TensorProto.EXTERNAL
    offset, length = layout[name]
    for k, v in (("location", data_file), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    return t


def make_model(g: GraphBuilder, inputs: list, outputs: list, layout: dict, data_file: str, opset: int,
               doc: str = "") -> onnx.ModelProto:
    inits = [_initializer(n, g.weights[n], layout, data_file) for n in g.used_weights]
    inits += [numpy_helper.from_array(a, n) for n, a in g.consts.items()]
    graph = helper.make_graph(g.nodes, g.name, inputs, outputs, initializer=inits, doc_string=doc)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="mmf")
    model.ir_version = min(model.ir_version, IR_VERSION_FOR_OPSET.get(opset, model.ir_version))
    return model


# The IR version each opset was released with, so that older runtimes accept the file.
IR_VERSION_FOR_OPSET = {18: 8, 19: 9, 20: 9, 21: 10}
