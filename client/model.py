"""Loading the model a site fine-tunes, and reading or writing its trainable tensors.

A model is a local Hugging Face directory (any causal LM; a real model is a
path, never a hub name: nothing here downloads). What trains is chosen by the
round's TrainingSpec: every parameter, the parameters matching patterns, or
LoRA adapters through peft. The trainable tensors, by their parameter names,
are what travel; everything else stays on the site.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from client import precision
from common.spec import OPTIMIZER_MARK, BaseDtype, TrainingSpec, TrainMode

logger = logging.getLogger(__name__)

_WEIGHT_FILES = ("*.safetensors", "*.bin", "config.json")


@dataclass
class LoadedModel:
    """A model ready to train, with the names of its trainable tensors."""

    model: Any  # a transformers PreTrainedModel, or a peft PeftModel around one
    tokenizer: Any
    trainable: list[str]
    device: torch.device
    # The forward pass's autocast dtype (client.precision.autocast_dtype); None: bf16 on CUDA, none
    # on the CPU, as for a model held in fp32.
    compute_dtype: torch.dtype | None = None


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def fingerprint(model_dir: Path) -> str:
    """SHA-256 over the model's config and weight files (names, sizes, bytes): which base a site loaded."""
    h = hashlib.sha256()
    for pattern in _WEIGHT_FILES:
        for path in sorted(model_dir.glob(pattern)):
            h.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
            with path.open("rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
    return h.hexdigest()


def load_model(
    model_dir: Path, spec: TrainingSpec, device: torch.device, *, lora_rank: int = 0
) -> LoadedModel:
    """Load tokenizer and model from ``model_dir`` and mark what trains according to ``spec``.

    Trainable tensors are fp32 (the master copy that deltas are taken from and applied to);
    the frozen rest is held in the spec's ``base_dtype`` (``client.precision``), or quantized
    through bitsandbytes (LoRA only). In FULL mode every tensor trains, so the whole model is fp32
    whatever ``base_dtype`` says; the forward pass still runs in half precision under autocast on
    an accelerator.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    frozen_dtype = precision.base_dtype(spec.base_dtype, device)
    compute = precision.autocast_dtype(frozen_dtype, device)
    quantized = precision.quantization_config(spec, compute or torch.float32)
    model: Any
    if quantized is not None:
        # A quantized model is placed as it loads (bitsandbytes quantizes on the way to the device)
        # and cannot be moved afterwards; its unquantized modules (embeddings, norms, head) take
        # ``frozen_dtype``: bf16 on an accelerator, not upcast to fp32 (see _with_lora).
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=frozen_dtype, quantization_config=quantized, device_map={"": _placement(device)}
        )
    else:
        # Trainable tensors are read at full precision: a bf16 round trip would change the base's
        # values, and a site's own copy of the base must equal the aggregator's round-0 state.
        load_dtype = frozen_dtype if spec.mode is TrainMode.LORA else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=load_dtype)
    if spec.gradient_checkpointing:
        _checkpointing(model)
    if spec.mode is TrainMode.LORA:
        model = _with_lora(model, spec, lora_rank or spec.lora.rank)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    else:
        patterns = [re.compile(p) for p in spec.trainable_patterns] if spec.mode is TrainMode.SUBSET else []
        trainable = []
        for name, param in model.named_parameters():
            train = spec.mode is TrainMode.FULL or any(p.search(name) for p in patterns)
            param.requires_grad_(train)
            if train:
                trainable.append(name)
        if not trainable:
            raise ValueError(f"no parameter matches the trainable patterns {list(spec.trainable_patterns)}")
        if spec.mode is TrainMode.SUBSET and frozen_dtype != torch.float32:
            precision.hold_frozen_in(model, set(trainable), frozen_dtype)
        elif spec.mode is TrainMode.FULL and spec.base_dtype not in (BaseDtype.AUTO, BaseDtype.FP32):
            logger.info(
                "[model] full fine-tuning trains every tensor: all held in fp32, not %s", frozen_dtype
            )
    precision.hold_trainable_fp32(model, set(trainable))
    if quantized is None:
        model.to(device)
    elif device.type == "cpu":
        precision.keep_4bit_layout(model)
    count = sum(p.numel() for n, p in model.named_parameters() if n in set(trainable))
    logger.info(
        "[model] %s on %s: %d trainable tensors, %s parameters; base %s%s",
        model_dir,
        device,
        len(trainable),
        f"{count:,}",
        spec.quantization.name.lower() if quantized is not None else str(frozen_dtype).removeprefix("torch."),
        ", gradient checkpointing" if spec.gradient_checkpointing else "",
    )
    return LoadedModel(model, tokenizer, trainable, device, compute)


def _placement(device: torch.device) -> str | int:
    """``device`` as a device_map entry: "cpu", or the CUDA index (the current device for plain "cuda")."""
    if device.type != "cuda":
        return str(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def _checkpointing(model: Any) -> None:
    # Non-reentrant checkpointing (torch's recommended form) propagates gradients to the adapters
    # even when no checkpointed input requires grad, so peft's enable_input_require_grads hook,
    # which the reentrant form needs under a frozen embedding, is not wanted here.
    # transformers 5 calls it activation checkpointing (gradient_checkpointing_enable is its deprecated alias).
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # a KV cache is useless in training and warned about with checkpointing


def _with_lora(model: Any, spec: TrainingSpec, rank: int) -> Any:
    from peft import LoraConfig, get_peft_model

    # peft's prepare_model_for_kbit_training is not called for a quantized base: it freezes the base
    # (get_peft_model does that too), enables checkpointing (_checkpointing does), and upcasts every
    # bf16/fp16 parameter to fp32, the embeddings and head included, which on a GPU would cost
    # more than the 4-bit base saves (an 8B Llama-3's embeddings and head: 4.2 GB in fp32). The
    # adapters are kept fp32 by get_peft_model (autocast_adapter_dtype) and hold_trainable_fp32.
    # The same seed everywhere gives every site the same initial adapters; the
    # round-0 state is fetched from the aggregator anyway, so this only keeps
    # init_state and sites consistent when both are built from the same base.
    torch.manual_seed(spec.seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=int(spec.lora.alpha),
        lora_dropout=spec.lora.dropout,
        target_modules=list(spec.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    # peft asks transformers a deprecated question (is_gradient_checkpointing); not ours to fix.
    # A process-wide filter: catch_warnings() is not thread-safe, and workers may load in threads.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    return get_peft_model(model, config)


def trainable_state(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Detached fp32 CPU copies of the trainable tensors, by parameter name."""
    params = dict(loaded.model.named_parameters())
    return {name: params[name].detach().to("cpu", torch.float32).clone() for name in loaded.trainable}


def load_trainable(loaded: LoadedModel, state: Mapping[str, torch.Tensor]) -> None:
    """Overwrite the trainable tensors with ``state`` (names and shapes must match exactly).

    Optimizer state carried in the state (names with ``#``) is not a parameter and is skipped.
    """
    params = dict(loaded.model.named_parameters())
    missing = [n for n in loaded.trainable if n not in state]
    extra = [n for n in state if n not in params and OPTIMIZER_MARK not in n]
    if missing or extra:
        raise ValueError(
            f"state does not match the model's trainable tensors: missing {missing[:3]}, unknown {extra[:3]}"
        )
    with torch.no_grad():
        for name in loaded.trainable:
            params[name].copy_(state[name].to(params[name].device, params[name].dtype))


@contextmanager
def training_only(loaded: LoadedModel, names: Sequence[str]) -> Iterator[LoadedModel]:
    """Within the block, only ``names`` (a subset of the trainable tensors) take gradients.

    FedCyBGD trains one decoder block: freezing the rest saves their gradients
    and optimizer state (backpropagation still runs through the layers above).
    """
    chosen = set(names)
    unknown = chosen - set(loaded.trainable)
    if unknown:
        raise ValueError(f"the round names tensors this model does not train: {sorted(unknown)[:3]}")
    params = dict(loaded.model.named_parameters())
    frozen = [n for n in loaded.trainable if n not in chosen]
    for name in frozen:
        params[name].requires_grad_(False)
    try:
        yield replace(loaded, trainable=[n for n in loaded.trainable if n in chosen])
    finally:
        for name in frozen:
            params[name].requires_grad_(True)
