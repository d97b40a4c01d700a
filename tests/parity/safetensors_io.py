"""Minimal safetensors reader/writer (torch + numpy only, no third-party packages).

Format: 8-byte little-endian u64 header length N, then N bytes of JSON header
``{name: {"dtype": ..., "shape": [...], "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}`` padded with spaces to a multiple of 8, then the data
buffer. Tensors are written sorted by name, little-endian, contiguous, offsets relative
to the start of the data buffer.
"""

import json
import struct

import numpy as np
import torch

# safetensors dtype string -> (numpy little-endian dtype, torch dtype)
_DTYPES = {
    "F64": (np.dtype("<f8"), torch.float64),
    "F32": (np.dtype("<f4"), torch.float32),
    "F16": (np.dtype("<f2"), torch.float16),
    "BF16": (np.dtype("<i2"), torch.bfloat16),  # read as int16 bits, then reinterpreted
    "I64": (np.dtype("<i8"), torch.int64),
    "I32": (np.dtype("<i4"), torch.int32),
    "I16": (np.dtype("<i2"), torch.int16),
    "I8": (np.dtype("i1"), torch.int8),
    "U8": (np.dtype("u1"), torch.uint8),
    "BOOL": (np.dtype("?"), torch.bool),
}
_TORCH_TO_ST = {v[1]: k for k, v in _DTYPES.items()}


def _to_bytes(t):
    t = t.detach().cpu().contiguous()
    if t.dtype not in _TORCH_TO_ST:
        raise TypeError("safetensors_io: unsupported dtype %s" % t.dtype)
    code = _TORCH_TO_ST[t.dtype]
    if t.dtype == torch.bfloat16:
        arr = t.view(torch.int16).numpy()
    else:
        arr = t.numpy()
    return code, arr.astype(_DTYPES[code][0], copy=False).tobytes(order="C")


def save(path, tensors, metadata=None):
    """Write a dict {name: torch.Tensor} to ``path``; ``metadata`` is an optional {str: str}."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        if name == "__metadata__":
            raise ValueError("safetensors_io: '__metadata__' is reserved")
        code, raw = _to_bytes(tensors[name])
        header[name] = {
            "dtype": code,
            "shape": [int(s) for s in tensors[name].shape],
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((-len(hb)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for raw in chunks:
            f.write(raw)


def load_with_metadata(path):
    """Return (dict of torch tensors, metadata dict or {})."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError("%s: too short for a safetensors file" % path)
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise ValueError("%s: header length %d exceeds file size" % (path, n))
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = memoryview(blob)[8 + n:]
    metadata = header.pop("__metadata__", None) or {}
    out = {}
    for name, info in header.items():
        code = info["dtype"]
        if code not in _DTYPES:
            raise ValueError("%s: tensor %s has unsupported dtype %s" % (path, name, code))
        npdt, tdt = _DTYPES[code]
        shape = [int(s) for s in info["shape"]]
        begin, end = (int(v) for v in info["data_offsets"])
        count = 1
        for s in shape:
            if s < 0:
                raise ValueError("%s: tensor %s has a negative dimension" % (path, name))
            count *= s
        if not (0 <= begin <= end <= len(data)):
            raise ValueError("%s: tensor %s offsets [%d, %d] out of range" % (path, name, begin, end))
        if end - begin != count * npdt.itemsize:
            raise ValueError("%s: tensor %s byte size %d != %d" % (path, name, end - begin, count * npdt.itemsize))
        arr = np.frombuffer(data[begin:end], dtype=npdt, count=count).reshape(shape)
        arr = arr.astype(npdt.newbyteorder("="), copy=True)
        t = torch.from_numpy(arr)
        if tdt == torch.bfloat16:
            t = t.view(torch.bfloat16)
        out[name] = t
    return out, metadata


def load(path):
    """Return a dict {name: torch.Tensor} read from ``path``."""
    return load_with_metadata(path)[0]
