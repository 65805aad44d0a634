"""Reader and writer for the IDX format of MNIST-style files (plain or gzip)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from fmdefense.core.errors import DataError

_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES: dict[np.dtype, int] = {v.newbyteorder("="): k for k, v in _DTYPES.items()}


def _open(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as gz:
                return gz.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc} (re-download it)") from exc


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into an array, checking the magic number and the payload length."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{name} is not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _DTYPES:
        raise DataError(f"{name} has unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name} is truncated inside its IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{name} is truncated or padded: header says {dims} ({expected} bytes of data), "
            f"file has {len(raw) - header}; re-download it"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (`.gz` is decompressed) into a native-endian numpy array."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing IDX file {path}")
    return parse_idx(_open(path), str(path))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an array as IDX (gzip when the name ends in `.gz`); used by tests and exports."""
    path = Path(path)
    dtype = np.dtype(array.dtype).newbyteorder("=")
    if dtype not in _CODES:
        raise DataError(f"dtype {array.dtype} has no IDX type code")
    code = _CODES[dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload)
    path.write_bytes(payload)
