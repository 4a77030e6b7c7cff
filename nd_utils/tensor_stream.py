"""Write a safetensors file part by part, and keep running column-wise top-k, in bounded memory.

Stage 01 publishes a layer's activations `[N, K]` from its chunk files: at the paper's scale
(113,000 images, ResNet-50's 4,904 pooled neurons) that is 2.2 GB, which `torch.cat` of the chunks
would hold twice. `SafetensorsStream` writes the file's header from the declared shapes, then
the row blocks as they come, so memory is one chunk; `RunningTopK` merges each chunk into the
top-k of every column. The file is the standard format: `safetensors.torch.load_file` and
`safe_open` read it (the header is padded with spaces to a multiple of 8, as the library does).

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import load_file
    >>> path = tempfile.mkdtemp() + "/x.safetensors"
    >>> with SafetensorsStream(path, {"a": (torch.float32, (3, 2))}) as out:
    ...     out.write("a", torch.ones(1, 2)); out.write("a", torch.zeros(2, 2))
    >>> load_file(path)["a"].sum().item()
    2.0
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from .store import temp_path

_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16",
           torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
           torch.bool: "BOOL"}


class SafetensorsStream:
    """A safetensors file whose tensors are written in declaration order, each in row blocks.

    `specs`: name -> (dtype, shape). Every tensor must receive exactly its bytes; `close`
    (the `with` block's end) checks that and renames the temporary file into place, so an
    interrupted write leaves nothing under `path`.
    """

    def __init__(self, path: "str | Path", specs: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header, offset, self._sizes = {}, 0, {}
        for name, (dtype, shape) in specs.items():
            if dtype not in _DTYPES:
                raise ValueError(f"{name}: dtype {dtype} is not supported by SafetensorsStream")
            size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            self._sizes[name] = size
            offset += size
        self._order, self._dtypes = list(specs), {n: d for n, (d, _) in specs.items()}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._tmp = temp_path(self.path)
        self._file = open(self._tmp, "wb")
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._done = dict.fromkeys(specs, 0)
        self._current = 0

    def write(self, name: str, block: torch.Tensor) -> None:
        """Append `block` (leading rows of `name`, or the whole tensor) to the file."""
        while self._order[self._current] != name:
            if self._done[self._order[self._current]] != self._sizes[self._order[self._current]]:
                raise ValueError(f"{name}: tensors must be written in order; "
                                 f"{self._order[self._current]!r} is incomplete")
            self._current += 1
        block = block.detach().to("cpu", self._dtypes[name]).contiguous()
        data = block.view(torch.uint8).numpy().tobytes() if block.numel() else b""
        if self._done[name] + len(data) > self._sizes[name]:
            raise ValueError(f"{name}: more bytes than its declared shape holds")
        self._file.write(data)
        self._done[name] += len(data)

    def close(self) -> Path:
        self._file.close()
        short = [n for n in self._order if self._done[n] != self._sizes[n]]
        if short:
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"tensor(s) {short} got fewer bytes than their declared shapes")
        os.replace(self._tmp, self.path)
        return self.path

    def __enter__(self) -> "SafetensorsStream":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
            self._tmp.unlink(missing_ok=True)


class RunningTopK:
    """The k largest values of each column over row blocks, and their row indices.

    Order: descending value, equal values by ascending row (a stable sort over the running
    candidates, which come before the new block), so the result does not depend on the
    blocking. `values()` / `indices()` are `[K, k']` with k' = min(k, rows seen).
    >>> t = RunningTopK(2)
    >>> t.update(torch.tensor([[1.0], [3.0]])); t.update(torch.tensor([[3.0], [2.0]]))
    >>> t.indices().tolist(), t.values().tolist()
    ([[1, 2]], [[3.0, 3.0]])
    """

    def __init__(self, k: int):
        self.k, self._vals, self._ids, self._rows = int(k), None, None, 0

    def update(self, block: torch.Tensor) -> None:
        """Merge the next rows `[B, K]` (rows numbered on from the blocks before)."""
        block = block.float()
        ids = torch.arange(self._rows, self._rows + len(block)).unsqueeze(1).expand_as(block)
        self._rows += len(block)
        if self._vals is not None:
            block, ids = torch.cat([self._vals, block]), torch.cat([self._ids, ids])
        # NaN would sort first descending; rank it last, as a missing activation
        key = block.nan_to_num(nan=-math.inf)
        order = torch.sort(key, dim=0, descending=True, stable=True).indices[:self.k]
        self._vals, self._ids = block.gather(0, order), ids.gather(0, order)

    def values(self) -> torch.Tensor:
        return self._vals.T.contiguous()

    def indices(self) -> torch.Tensor:
        return self._ids.T.contiguous().to(torch.int64)
