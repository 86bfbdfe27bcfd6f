"""How a site holds its model: the frozen base's dtype, a quantized base (QLoRA), the compute dtype.

The round's TrainingSpec says what every site does (``base_dtype``,
``quantization``); this module turns that into torch dtypes and a
transformers ``BitsAndBytesConfig`` for the device a worker has. Trainable
tensors are always fp32 (the master copy deltas are taken between); only
frozen ones take the base's dtype, and only a frozen base is ever quantized.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from common.spec import BaseDtype, Quantization, TrainingSpec

logger = logging.getLogger(__name__)

_HALF = (torch.bfloat16, torch.float16)


def accelerator_half(device: torch.device) -> torch.dtype:
    """bf16 where the accelerator has it, else fp16 (pre-Ampere CUDA)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def base_dtype(requested: BaseDtype, device: torch.device) -> torch.dtype:
    """The dtype the frozen base is held in on ``device``.

    AUTO: bf16 (fp16 where bf16 is missing) on an accelerator, fp32 on the CPU, where half
    precision saves memory but runs slower than fp32 and is not what CPU sites are for.
    """
    if requested is BaseDtype.FP32:
        return torch.float32
    if requested is BaseDtype.BF16:
        return torch.bfloat16
    if requested is BaseDtype.FP16:
        return torch.float16
    return torch.float32 if device.type == "cpu" else accelerator_half(device)


def autocast_dtype(base: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The dtype the forward pass runs under autocast in, or None for no autocast.

    On CUDA always a half dtype (bf16 autocast over fp32 weights is what the worker always did);
    on the CPU only when the base itself is half, since fp32 trainable tensors then meet half
    frozen ones in the same matmuls.
    """
    if base in _HALF:
        return base
    return accelerator_half(device) if device.type == "cuda" else None


def quantization_config(spec: TrainingSpec, compute: torch.dtype) -> Any | None:
    """transformers' ``BitsAndBytesConfig`` for the spec's quantized base, or None for none.

    NF4 with double quantization is QLoRA's recipe (Dettmers et al. 2023): 4-bit NormalFloat
    weights, their scales quantized again, dequantized to ``compute`` for each matmul.
    """
    if spec.quantization is Quantization.NONE:
        return None
    from transformers import BitsAndBytesConfig as Untyped

    BitsAndBytesConfig: Any = Untyped
    if spec.quantization is Quantization.NF4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    _quiet_int8_casts()
    return BitsAndBytesConfig(load_in_8bit=True)


def hold_trainable_fp32(model: torch.nn.Module, trainable: set[str]) -> int:
    """Cast the trainable parameters that are not fp32 to fp32; returns how many were cast.

    peft already makes adapters fp32 over a half base (``autocast_adapter_dtype``); this is
    the invariant the aggregator relies on, kept whatever a model class or peft version does.
    """
    cast = 0
    for name, param in model.named_parameters():
        if name in trainable and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
            cast += 1
    return cast


def hold_frozen_in(model: torch.nn.Module, trainable: set[str], dtype: torch.dtype) -> int:
    """Cast the frozen floating-point parameters to ``dtype``; returns how many were cast."""
    cast = 0
    for name, param in model.named_parameters():
        if name not in trainable and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def keep_4bit_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference; returns the layers told so.

    On a CPU with AVX512-BF16, a ``Linear4bit`` evaluated without gradients rewrites its weight in
    place into a layout for a faster inference kernel: it fails on a layer whose output width is
    not a multiple of 32, and the repacked weight then takes a path without autograd, so training
    after the round's eval loss would not reach the adapters below it. A worker evaluates and
    trains the same model in turn, so it keeps the trainable layout.
    """
    told = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (an untyped attribute)
            told += 1
    return told


class _Once(logging.Filter):
    """Lets a message starting with ``prefix`` through once per process."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


_int8_filter = _Once("MatMul8bitLt")


def _quiet_int8_casts() -> None:
    # bitsandbytes logs a warning on every 8-bit matmul whose input is not fp16 (every forward of
    # every layer on the CPU or under bf16): once says what it means.
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if _int8_filter not in log.filters:
        log.addFilter(_int8_filter)
