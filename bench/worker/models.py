"""The models bench.worker measures, built from configs, and the per-parameter accounting of a LoRA site.

Nothing is downloaded: a Llama-shaped model is a ``LlamaConfig`` with random
weights. Bytes are counted, not sampled: transformers' ``get_memory_footprint``
for a loaded base, and parameter counts times bytes per value for adapters,
their gradients and AdamW's two moments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_RANK = 16
# An fp32 master, its gradient, AdamW's exp_avg and exp_avg_sq: 4 values of 4 bytes per adapter parameter.
ADAPTER_BYTES_PER_PARAM = 16


@dataclass(frozen=True, slots=True)
class Shape:
    """A Llama-shaped decoder (untied head)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer."""
        h, kv, ff = self.hidden, self.kv_dim, self.intermediate
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, ff),
            "up_proj": (h, ff),
            "down_proj": (ff, h),
        }

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        """Input embeddings and the untied head."""
        return 2 * self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params

    def adapter_params(self, targets: tuple[str, ...], rank: int = LORA_RANK) -> int:
        """LoRA's A (rank x in) and B (out x rank) on each targeted projection of every layer."""
        shapes = self.linear_shapes()
        return self.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)

    def config(self) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            intermediate_size=self.intermediate,
            vocab_size=self.vocab,
            tie_word_embeddings=False,
            max_position_embeddings=2048,
        )


BENCH = Shape("bench-0.35B", hidden=1024, layers=24, heads=16, kv_heads=16, intermediate=2816, vocab=32000)
LLAMA3_8B = Shape(
    "Llama-3-8B", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256
)
GPU_1B = Shape("gpu-1.1B", hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000)


def save_base(shape: Shape, directory: Any) -> None:
    """Random weights for ``shape``, saved in bf16 (what a released checkpoint holds) under ``directory``."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(shape.config())
    model = model.to(torch.bfloat16)
    model.save_pretrained(directory)


def load_base(directory: Any, mode: str, device: str = "cpu") -> Any:
    """The base in ``mode``: fp32, bf16, or nf4 (double quantization, bf16 compute; embeddings and head stay bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    placed = {"device_map": {"": device}} if device != "cpu" else {}
    if mode == "nf4":
        quant = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        return AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=quant, dtype=torch.bfloat16, **placed
        )
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **placed)


def with_lora(model: Any, targets: tuple[str, ...] = ALL_LINEAR, *, checkpointing: bool = False) -> Any:
    """LoRA r=16 adapters (fp32) on ``targets``; a 4-bit base is prepared as QLoRA does."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=checkpointing
        )
    elif checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    config = LoraConfig(
        r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(targets), task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.float32)
    return model


def adapter_gb(shape: Shape, targets: tuple[str, ...]) -> float:
    """Adapters with their fp32 masters, gradients and AdamW state, in GB."""
    return shape.adapter_params(targets) * ADAPTER_BYTES_PER_PARAM / 1e9
