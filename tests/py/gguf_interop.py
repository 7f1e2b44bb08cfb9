#!/usr/bin/env python3
"""GGUF interoperability with gguf-py (PyPI `gguf`), the reference Python implementation.

  gguf_interop.py write OUT.gguf   write a file with every value type and several tensor
                                   types; print a JSON manifest of what was written
  gguf_interop.py read IN.gguf     print a JSON description of a file as gguf-py sees it

Tensor data is deterministic: element i of a tensor with seed s is 0.1 + 2*cos(i + s)
(ggml's test-quantize-fns pattern). The manifest carries each tensor's bytes and the
float32 source it was quantized from (as hex), so the Rust side can quantize the same
floats and compare bytes.
"""
import json
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q, GGUFValueType as V


def pattern(n, seed):
    return (0.1 + 2.0 * np.cos(np.arange(n, dtype=np.float32) + np.float32(seed))).astype(np.float32)


# key -> (gguf value type, value); arrays as (ARRAY, element type, list)
VALUES = {
    "py.u8": (V.UINT8, 200), "py.i8": (V.INT8, -100), "py.u16": (V.UINT16, 60000),
    "py.i16": (V.INT16, -20000), "py.u32": (V.UINT32, 3000000000), "py.i32": (V.INT32, -1000000000),
    "py.f32": (V.FLOAT32, 0.25), "py.bool": (V.BOOL, True), "py.string": (V.STRING, "Grüße ✓"),
    "py.u64": (V.UINT64, 2**63 + 5), "py.i64": (V.INT64, -(2**62)), "py.f64": (V.FLOAT64, 1.5e-300),
}
ARRAYS = {
    "py.arr.i32": (V.INT32, [1, -2, 3]),
    "py.arr.f32": (V.FLOAT32, [0.5, -1.25]),
    "py.arr.string": (V.STRING, ["<beginning_of_sentence>", "Ġthe", ""]),
    "py.arr.bool": (V.BOOL, [True, False]),
    "py.arr.u8": (V.UINT8, [0, 255]),
    "py.arr.nested": (V.ARRAY, [[1, 2], [3]]),
}
# name, type, ggml shape (innermost first), seed
TENSORS = [
    ("py.f32", Q.F32, [32, 3], 0.5),
    ("py.f16", Q.F16, [64, 2], 1.5),
    ("py.bf16", Q.BF16, [96], 2.5),
    ("py.q8_0", Q.Q8_0, [64, 3], 3.5),
    ("py.q4_0", Q.Q4_0, [96, 2], 4.5),
    ("py.q4_k_raw", Q.Q4_K, [256, 2], 5.5),
    ("py.q6_k_raw", Q.Q6_K, [512], 6.5),
]


def write(path):
    w = gguf.GGUFWriter(path, "mxr-interop")
    for k, (t, v) in VALUES.items():
        w.add_key_value(k, v, t)
    for k, (sub, v) in ARRAYS.items():
        w.add_key_value(k, v, V.ARRAY, sub_type=sub)
    manifest = {"tensors": []}
    for name, qt, shape, seed in TENSORS:
        n = int(np.prod(shape))
        x = pattern(n, seed).reshape(list(reversed(shape)))
        if name.endswith("_raw"):
            # k-quants: gguf-py cannot quantize them; store deterministic raw blocks.
            block, size = gguf.GGML_QUANT_SIZES[qt]
            nbytes = n // block * size
            data = ((np.arange(nbytes, dtype=np.uint32) * 2654435761) >> 13).astype(np.uint8)
            data = data.reshape(list(reversed(shape))[:-1] + [shape[0] // block * size])
        elif qt == Q.F32:
            data = x
        elif qt == Q.F16:
            data = x.astype(np.float16)
        else:
            data = gguf.quants.quantize(x, qt)
        w.add_tensor(name, data, raw_dtype=qt if qt not in (Q.F32, Q.F16) else None)
        entry = {"name": name, "type": int(qt), "shape": shape, "hex": data.tobytes().hex()}
        if not name.endswith("_raw"):
            entry["source_hex"] = x.astype("<f4").tobytes().hex()  # the floats that were quantized
        manifest["tensors"].append(entry)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    manifest["alignment"] = 32
    print(json.dumps(manifest))


def jsonable(v):
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8")
    if isinstance(v, list):
        return [jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v)
    if isinstance(v, (np.integer, int, bool, np.bool_)):
        return v.item() if hasattr(v, "item") else v
    return v


def read(path):
    r = gguf.GGUFReader(path)
    fields = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue  # reader pseudo-fields (version, counts)
        types = [V(t).name for t in f.types]
        fields[name] = {"types": types, "value": jsonable(f.contents())}
    tensors = []
    for t in r.tensors:
        tensors.append({"name": t.name, "type": int(t.tensor_type), "shape": [int(d) for d in t.shape],
                        "n_bytes": int(t.n_bytes), "data_offset": int(t.data_offset),
                        "hex": bytes(t.data.tobytes()).hex()})
    print(json.dumps({"fields": fields, "tensors": tensors}))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "read"):
        sys.exit(__doc__)
    (write if sys.argv[1] == "write" else read)(sys.argv[2])
