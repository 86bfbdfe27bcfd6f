"""Element types: the wire enum, safetensors' names, torch and numpy, in one table."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch


class DType(enum.IntEnum):
    """Element type of a tensor; values equal the wire enum gradualdiff.v1.DType."""

    F64 = 1
    F32 = 2
    F16 = 3
    BF16 = 4
    I64 = 5
    I32 = 6
    I16 = 7
    I8 = 8
    U8 = 9
    BOOL = 10
    U32 = 11


@dataclass(frozen=True, slots=True)
class _Info:
    torch_dtype: torch.dtype
    itemsize: int
    # numpy has no bfloat16: its bytes are handled as uint16.
    numpy_dtype: type[np.generic]
    is_float: bool


_INFO: dict[DType, _Info] = {
    DType.F64: _Info(torch.float64, 8, np.float64, True),
    DType.F32: _Info(torch.float32, 4, np.float32, True),
    DType.F16: _Info(torch.float16, 2, np.float16, True),
    DType.BF16: _Info(torch.bfloat16, 2, np.uint16, True),
    DType.I64: _Info(torch.int64, 8, np.int64, False),
    DType.I32: _Info(torch.int32, 4, np.int32, False),
    DType.I16: _Info(torch.int16, 2, np.int16, False),
    DType.I8: _Info(torch.int8, 1, np.int8, False),
    DType.U8: _Info(torch.uint8, 1, np.uint8, False),
    DType.BOOL: _Info(torch.bool, 1, np.bool_, False),
    DType.U32: _Info(torch.uint32, 4, np.uint32, False),
}
_FROM_TORCH = {info.torch_dtype: dt for dt, info in _INFO.items()}


def itemsize(dtype: DType) -> int:
    """Bytes per element."""
    return _INFO[dtype].itemsize


def is_float(dtype: DType) -> bool:
    """True for floating-point types, the ones a cast or a finiteness check applies to."""
    return _INFO[dtype].is_float


def to_torch(dtype: DType) -> torch.dtype:
    """The torch dtype of a DType."""
    return _INFO[dtype].torch_dtype


def numpy_storage(dtype: DType) -> type[np.generic]:
    """The numpy dtype that holds the same bytes (uint16 for bf16)."""
    return _INFO[dtype].numpy_dtype


def from_torch(dtype: torch.dtype) -> DType:
    """The DType of a torch dtype; ValueError for types the wire does not carry."""
    try:
        return _FROM_TORCH[dtype]
    except KeyError:
        supported = ", ".join(str(t) for t in _FROM_TORCH)
        raise ValueError(f"dtype {dtype} cannot travel; supported: {supported}") from None
