"""``gdfed export``: a published round's state as a Hugging Face model directory.

Takes the base model a run fine-tunes and a trainable state (from the
aggregator's state directory by round number, or any state file), puts the
state into the model and writes it with ``save_pretrained``, so stock
``AutoModelForCausalLM.from_pretrained`` loads it. LoRA states are merged
into the base weights with ``--merge-lora``, or written as a peft adapter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from client.lora_flags import add_lora_arguments, lora_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, required=True, help="the base model directory the run started from"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--aggregator-state", type=Path, help="the aggregator's --state-dir (with --round)")
    source.add_argument("--state", type=Path, help="a trainable-state safetensors file")
    parser.add_argument("--round", type=int, help="the published round to export (default: the latest)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument("--mode", choices=("full", "subset", "lora"), default="full")
    parser.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the base weights")
    add_lora_arguments(parser)


def state_file_of_round(state_dir: Path, round_number: int | None) -> tuple[Path, int]:
    """The state file of a published round kept in an aggregator's state directory."""
    from server.blobs import BlobStore
    from server.records import RoundRecord, RoundState
    from server.store import Store

    store = Store(state_dir / "state.db")
    try:
        rows = store.select(RoundRecord, "state = ?", (int(RoundState.PUBLISHED),), order="round DESC")
    finally:
        store.close()
    if round_number is not None:
        rows = [r for r in rows if r.round == round_number]
    if not rows:
        raise SystemExit(f"round {round_number} is not a published round of {state_dir}")
    record = rows[0]
    if not record.state_blob:
        raise SystemExit(f"the state of round {record.round} is no longer kept (see keep_states)")
    return BlobStore(state_dir).path(record.state_blob), record.round


def export(model_dir: Path, state_file: Path, out: Path, *, spec: object, merge_lora: bool) -> None:
    """Write ``model_dir`` with the trainable tensors of ``state_file`` to ``out``."""
    import torch
    from safetensors.torch import load_file

    from client.model import load_model, load_trainable
    from common.spec import TrainingSpec, TrainMode

    assert isinstance(spec, TrainingSpec)
    loaded = load_model(model_dir, spec, torch.device("cpu"))
    load_trainable(loaded, load_file(str(state_file)))
    model = loaded.model
    if spec.mode is TrainMode.LORA and merge_lora:
        model = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)


def run(args: argparse.Namespace) -> int:
    from common.spec import TrainingSpec, TrainMode

    if args.aggregator_state is not None:
        state_file, round_number = state_file_of_round(args.aggregator_state, args.round)
    else:
        state_file, round_number = args.state, args.round or 0
    spec = TrainingSpec(
        mode=TrainMode[args.mode.upper()],
        lora=lora_spec(args),
    )
    export(args.model, state_file, args.out, spec=spec, merge_lora=args.merge_lora)
    print(f"exported round {round_number} to {args.out}")
    return 0
