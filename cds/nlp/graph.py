"""Build the ONNX graph of the text model (training-only: needs the ``onnx`` package).

    ids  int64 [batch, L]   hashed n-gram buckets (padding: any id with tf 0)
    tf   float [batch, L]   1 + ln(count)
    w       = tf * idf[ids];  w /= sqrt(sum(w^2) + 1e-12)      (TF-IDF, L2-normalised, in-graph)
    E       = W[ids]                                           [batch, L, heads]
    logits  = w @ E + b                                        [batch, heads]
    probs   = sigmoid(logits)                                  output "probs"
    contrib = w[..., None] * E                                 output "contrib" (per-n-gram evidence)

A linear model over hashed n-grams written as Gather + MatMul: the same graph runs on CPU and CUDA.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

OPSET = 17
IR_VERSION = 8


def build_graph(idf: npt.NDArray[np.float32], weights: npt.NDArray[np.float32], bias: npt.NDArray[np.float32],
                doc: str = "") -> Any:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = weights.shape[1]
    inits = [
        numpy_helper.from_array(idf.astype(np.float32), "idf"),
        numpy_helper.from_array(weights.astype(np.float32), "W"),
        numpy_helper.from_array(bias.astype(np.float32), "b"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis_last"),
        numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("Gather", ["idf", "ids"], ["idf_g"], axis=0),
        helper.make_node("Mul", ["tf", "idf_g"], ["w_raw"]),
        helper.make_node("Mul", ["w_raw", "w_raw"], ["w_sq"]),
        helper.make_node("ReduceSum", ["w_sq", "axis1"], ["w_ss"], keepdims=1),
        helper.make_node("Add", ["w_ss", "eps"], ["w_ss_eps"]),
        helper.make_node("Sqrt", ["w_ss_eps"], ["w_norm"]),
        helper.make_node("Div", ["w_raw", "w_norm"], ["w"]),
        helper.make_node("Gather", ["W", "ids"], ["E"], axis=0),
        helper.make_node("Unsqueeze", ["w", "axis1"], ["w_row"]),
        helper.make_node("MatMul", ["w_row", "E"], ["z3"]),
        helper.make_node("Squeeze", ["z3", "axis1"], ["z"]),
        helper.make_node("Add", ["z", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probs"]),
        helper.make_node("Unsqueeze", ["w", "axis_last"], ["w_col"]),
        helper.make_node("Mul", ["w_col", "E"], ["contrib"]),
    ]
    graph = helper.make_graph(
        nodes, "text_risk",
        inputs=[helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "L"]),
                helper.make_tensor_value_info("tf", TensorProto.FLOAT, ["batch", "L"])],
        outputs=[helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", k]),
                 helper.make_tensor_value_info("contrib", TensorProto.FLOAT, ["batch", "L", k])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="psych-cds", producer_version="1", doc_string=doc)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model
