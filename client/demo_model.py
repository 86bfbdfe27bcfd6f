"""The demo's base model: a byte-level BPE tokenizer trained on the demo corpus, and a small random
``LlamaForCausalLM`` for it, pretrained on another world's sentences so the federation fine-tunes.

torch, tokenizers and transformers are imported inside the functions: ``gdfed demo`` starts fast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.demo_data import Record, record_text

if TYPE_CHECKING:
    from tokenizers import Tokenizer

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}
VOCAB_SIZE = 1024  # an upper bound: the BPE trainer stops earlier if no pair repeats
MAX_TOKENS = 48  # every example (with <bos> and <eos>) fits in this many tokens; checked
MAX_POSITIONS = 128


def train_tokenizer(texts: Sequence[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE tokenizer (no text is ever unknown) with the four special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> int:
    """Wrap as ``PreTrainedTokenizerFast`` and save; returns the vocab size.

    The tokenizer adds no special tokens by itself (``add_bos_token`` and ``add_eos_token`` are off):
    the worker puts ``<bos>``/``<eos>`` where it wants them. A ``<bos>`` post-processor was tried and
    dropped: transformers 5 does not record it in ``add_bos_token``, and setting ``add_eos_token``
    later would silently rebuild the post-processor without it.
    """
    from transformers import PreTrainedTokenizerFast

    wrapper: Any = PreTrainedTokenizerFast  # untyped constructor (transformers 5)
    fast = wrapper(
        tokenizer_object=tokenizer,
        pad_token=SPECIAL_TOKENS["pad"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(path))
    return len(fast)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No transformers progress bars on stderr for the one-shard save."""
    from transformers.utils import logging

    hf_logging: Any = logging  # its progress-bar switches are untyped
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_model(tokenizer: Tokenizer, seed: int, path: Path) -> int:
    """A small random Llama for ``tokenizer``, saved as float32 safetensors; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def token_id(token: str) -> int:
        found = tokenizer.token_to_id(token)
        if found is None:
            raise RuntimeError(f"{token} is not in the tokenizer")
        return found

    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        pad_token_id=token_id(SPECIAL_TOKENS["pad"]),
        bos_token_id=token_id(SPECIAL_TOKENS["bos"]),
        eos_token_id=token_id(SPECIAL_TOKENS["eos"]),
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.nn.Module.float(model)  # float32 whatever the default dtype (its own .float() is untyped)
    with _quiet_progress():
        model.save_pretrained(str(path), safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def pretrain(model_dir: Path, records: Sequence[Record], *, steps: int, seed: int) -> tuple[float, float]:
    """Teach the random model the domains' language on a separate corpus, so the demo is fine-tuning.

    The corpus comes from another seed: the same kinds of sentences, but another
    made-up world (other countries, capitals, animals), so what the sites then
    teach is new. One thread keeps the result bit-reproducible. Returns the
    first and last training loss.
    """
    import torch

    from client.data import batches, tokenize
    from client.model import load_model
    from client.train import train_steps
    from common.spec import TrainingSpec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        with _quiet_progress():
            loaded = load_model(model_dir, TrainingSpec(), torch.device("cpu"))
        examples = tokenize([{"text": record_text(r)} for r in records], loaded.tokenizer, MAX_TOKENS)
        losses: list[float] = []
        train_steps(
            loaded,
            batches(examples, 32, loaded.tokenizer.pad_token_id, seed),
            steps=steps,
            lr=3e-3,
            on_step=lambda step, loss, tokens: losses.append(loss),
        )
        with _quiet_progress():
            loaded.model.save_pretrained(str(model_dir), safe_serialization=True)
    finally:
        torch.set_num_threads(threads)
    return losses[0], losses[-1]
