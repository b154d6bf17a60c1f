"""Small ONNX graph helpers: reading the model's face size and turning an fp16 graph into fp32."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def _retype(value_infos):
    for vi in value_infos:
        t = vi.type.tensor_type
        if t.elem_type == F16:
            t.elem_type = F32


def _tensor_to_f32(tensor: onnx.TensorProto) -> onnx.TensorProto:
    arr = numpy_helper.to_array(tensor).astype(np.float32)
    return numpy_helper.from_array(arr, tensor.name)


def fp16_to_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in fp32: weights widened, fp16 casts and types made fp32.

    The CPU provider runs fp32 faster and everywhere; fp16 weights widen exactly, so the result
    equals the fp16 model's up to fp16 rounding of intermediate values.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for i, init in enumerate(g.initializer):
            if init.data_type == F16:
                g.initializer[i].CopyFrom(_tensor_to_f32(init))
        _retype(g.input)
        _retype(g.output)
        _retype(g.value_info)
        for node in g.node:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == F16:
                    attr.i = F32
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == F16:
                    attr.t.CopyFrom(_tensor_to_f32(attr.t))
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return model


def io_layout(model_or_session) -> tuple[str, str, int]:
    """(mel input name, face input name, face size S) of a Wav2Lip-like graph.

    Inputs are told apart by shape, not name, so community exports with other names work.
    """
    inputs = model_or_session.get_inputs()
    mel = face = None
    size = None
    for inp in inputs:
        shape = list(inp.shape)
        if len(shape) == 4 and shape[2:] == [80, 16]:
            mel = inp.name
        elif len(shape) == 4 and shape[1] == 6:
            face = inp.name
            size = shape[2] if isinstance(shape[2], int) else None
    if mel is None or face is None or len(inputs) != 2:
        found = ", ".join(f"{i.name}{list(i.shape)}" for i in inputs)
        raise ValueError(f"not a Wav2Lip graph: expected inputs (B,1,80,16) and (B,6,S,S), found {found}")
    if size is None:
        raise ValueError("the face input has no fixed size; export it with a static S")
    return mel, face, size
