"""``gdfed export``: a published round as a Hugging Face model directory, and for a LoRA run a peft adapter too.

The run's settings (mode, LoRA rank, alpha and targets) come from the
aggregator's state directory, where the aggregator recorded its TrainingSpec
when it created the run (``common.state_dir``). A flag that contradicts them
is refused with one line naming the flag and the run's value, never obeyed: a
wrong alpha would merge a scaled change without a word. A state directory made
before runs recorded their spec, or a bare ``--state`` file, tells what its
tensors show (LoRA or not, rank, targets); the LoRA alpha, which no tensor
shows, must then be given.

``--out`` gets the merged model: the base with the published state put in
(LoRA merged into the weights), which ``AutoModelForCausalLM.from_pretrained``
loads. For a LoRA run ``--adapter-out`` (default ``<out>-adapter``) gets the
adapter, which ``peft.PeftModel.from_pretrained(base, adapter_dir)`` loads
from any working directory: it names its base by an absolute path.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.spec import TrainingSpec, TrainMode
    from common.statefile import StateReader

EXIT_USAGE = 2  # a flag, path or round that cannot give a right export
EXIT_FAILED = 1  # the inputs disagree with each other (state and model, state and spec)
MODES = ("full", "subset", "lora")
Shapes = Mapping[str, tuple[int, ...]]


class ExportError(Exception):
    """Why the export cannot be done: one line for the operator, and the exit code it ends with."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, required=True, help="the base model directory the run started from"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--aggregator-state", type=Path, help="the aggregator's --state-dir")
    source.add_argument("--state", type=Path, help="a trainable-state safetensors file")
    parser.add_argument("--round", type=int, help="the published round to export (default: the latest)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the merged model to")
    parser.add_argument(
        "--adapter-out",
        type=Path,
        help="LoRA runs: directory to write the peft adapter to (default: <out>-adapter)",
    )
    agree = "read from the run; if given, must agree with it"
    parser.add_argument("--mode", choices=MODES, help=f"the run's mode ({agree})")
    parser.add_argument("--lora-rank", type=int, help=f"LoRA rank ({agree})")
    parser.add_argument(
        "--lora-alpha", type=float, help=f"LoRA alpha ({agree}; needed where the run did not record it)"
    )
    parser.add_argument("--lora-targets", nargs="+", help=f"modules LoRA adapts ({agree})")


# ---------------------------------------------------------------- the run's settings


@dataclass(frozen=True, slots=True, kw_only=True)
class Flags:
    """What the operator said about the run; None where a flag was left out."""

    mode: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None

    def lora_flag(self) -> str:
        """The first LoRA flag given ("" if none was)."""
        given = (
            ("--lora-rank", self.lora_rank),
            ("--lora-alpha", self.lora_alpha),
            ("--lora-targets", self.lora_targets),
        )
        return next((flag for flag, value in given if value is not None), "")


def flags_of(args: argparse.Namespace) -> Flags:
    targets = getattr(args, "lora_targets", None)
    return Flags(
        mode=getattr(args, "mode", None),
        lora_rank=getattr(args, "lora_rank", None),
        lora_alpha=getattr(args, "lora_alpha", None),
        lora_targets=tuple(targets) if targets is not None else None,
    )


@dataclass(frozen=True, slots=True)
class Resolved:
    spec: TrainingSpec
    note: str  # how the settings were found, where the run did not record them ("" where it did)


def resolve_spec(recorded: TrainingSpec | None, where: str, shapes: Shapes, flags: Flags) -> Resolved:
    """The settings to export with: the run's recorded spec, checked against ``flags`` and the state's tensors.

    ``where`` names the record (or, with ``recorded`` None, why there is none) in messages.

    Raises:
        ExportError: a flag contradicts the run (exit 2), or the state's tensors do not fit its spec (exit 1).
    """
    adapters = lora_of_tensors(shapes)
    if recorded is None:
        return _from_tensors(adapters, where, flags)
    from common.spec import TrainMode

    run = f"(recorded in {where})"
    mode = _name(recorded.mode)
    if flags.mode is not None and flags.mode != mode:
        raise ExportError(f"--mode {flags.mode} contradicts the run's mode {mode} {run}; leave --mode out")
    if recorded.mode is not TrainMode.LORA:
        if flags.lora_flag():
            raise ExportError(f"{flags.lora_flag()} is for LoRA runs; the run's mode is {mode} {run}")
        if adapters is not None:
            raise ExportError(
                f"the state holds LoRA adapters, but the run's mode is {mode} {run}", EXIT_FAILED
            )
        return Resolved(recorded, "")
    lora = recorded.lora
    if flags.lora_rank is not None and flags.lora_rank != lora.rank:
        raise ExportError(f"--lora-rank {flags.lora_rank} contradicts the run's LoRA rank {lora.rank} {run}")
    if flags.lora_alpha is not None and flags.lora_alpha != lora.alpha:
        raise ExportError(
            f"--lora-alpha {flags.lora_alpha:g} contradicts the run's LoRA alpha {lora.alpha:g} {run}"
        )
    if flags.lora_targets is not None and set(flags.lora_targets) != set(lora.target_modules):
        raise ExportError(
            f"--lora-targets {' '.join(flags.lora_targets)} contradicts the run's LoRA targets "
            f"{' '.join(lora.target_modules)} {run}"
        )
    if adapters is None or adapters[0] != lora.rank:
        found = "no LoRA adapters" if adapters is None else f"LoRA adapters of rank {adapters[0]}"
        raise ExportError(f"the state holds {found}, but the run trains rank {lora.rank} {run}", EXIT_FAILED)
    return Resolved(recorded, "")


def _from_tensors(adapters: tuple[int, tuple[str, ...]] | None, why: str, flags: Flags) -> Resolved:
    """Settings for a state whose run recorded none: what its tensors show, the LoRA alpha from its flag."""
    from common.spec import LoraSpec, TrainingSpec, TrainMode

    if adapters is None:
        if flags.mode == "lora":
            raise ExportError(
                f"--mode lora contradicts the state's tensors, which hold no LoRA adapters ({why})"
            )
        if flags.lora_flag():
            raise ExportError(
                f"{flags.lora_flag()} is for LoRA states; this one holds no LoRA adapters ({why})"
            )
        return Resolved(
            TrainingSpec(mode=TrainMode.FULL), f"{why}: its tensors are put into the base model by name"
        )
    rank, targets = adapters
    if flags.mode not in (None, "lora"):
        raise ExportError(
            f"--mode {flags.mode} contradicts the state's tensors, LoRA adapters of rank {rank} ({why})"
        )
    if flags.lora_rank is not None and flags.lora_rank != rank:
        raise ExportError(
            f"--lora-rank {flags.lora_rank} contradicts the state's LoRA adapters, of rank {rank} ({why})"
        )
    if flags.lora_targets is not None and {t.rsplit(".", 1)[-1] for t in flags.lora_targets} != set(targets):
        raise ExportError(
            f"--lora-targets {' '.join(flags.lora_targets)} contradicts the state's LoRA adapters, on "
            f"{' '.join(targets)} ({why})"
        )
    if flags.lora_alpha is None:
        raise ExportError(
            f"--lora-alpha is needed: {why}, and no tensor shows the alpha; give the [training.lora] alpha "
            "the run used"
        )
    spec = TrainingSpec(
        mode=TrainMode.LORA,
        lora=LoraSpec(rank=rank, alpha=flags.lora_alpha, target_modules=flags.lora_targets or targets),
    )
    note = (
        f"{why}: LoRA rank {rank} and targets {', '.join(targets)} read from its tensors, "
        f"alpha {flags.lora_alpha:g} from --lora-alpha"
    )
    return Resolved(spec, note)


def lora_of_tensors(shapes: Shapes) -> tuple[int, tuple[str, ...]] | None:
    """(rank, adapted module names) of the LoRA adapters among ``shapes``; None if it holds none."""
    from common.lora import lora_pairs
    from common.spec import OPTIMIZER_MARK

    # FedCyBGD's travelling optimizer state ("<param>#exp_avg") is named after the parameters it follows.
    pairs = lora_pairs([name for name in shapes if OPTIMIZER_MARK not in name])
    if not pairs:
        return None
    ranks = sorted({shapes[a][0] for a, _ in pairs.values()})
    if len(ranks) != 1:
        raise ExportError(
            f"the state's LoRA adapters have ranks {ranks}; a run's adapters share one", EXIT_FAILED
        )
    return ranks[0], tuple(sorted({module.rsplit(".", 1)[-1] for module in pairs}))


def _name(mode: TrainMode) -> str:
    return mode.name.lower()


def describe(spec: TrainingSpec) -> str:
    from common.spec import TrainMode

    if spec.mode is not TrainMode.LORA:
        return f"mode {_name(spec.mode)}"
    lora = spec.lora
    return f"mode lora, rank {lora.rank}, alpha {lora.alpha:g}, targets {', '.join(lora.target_modules)}"


# ---------------------------------------------------------------- writing


def state_file_of_round(state_dir: Path, round_number: int | None) -> tuple[Path, int]:
    """The state file of a published round kept in an aggregator's state directory, and its round."""
    from common.state_dir import published_state

    found = published_state(state_dir, round_number)
    return found.path, found.round


def default_adapter_dir(out: Path) -> Path:
    return out.with_name(out.name + "-adapter")


@dataclass(frozen=True, slots=True)
class Exported:
    model_dir: Path  # the merged model
    adapter_dir: Path | None  # the peft adapter (LoRA runs)


def export(
    model_dir: Path, state_file: Path, out: Path, *, spec: TrainingSpec, adapter_out: Path | None = None
) -> Exported:
    """Write ``model_dir`` with the trainable tensors of ``state_file`` to ``out`` (merged), and a LoRA adapter.

    ``spec`` is the run's (``resolve_spec``): for LoRA its rank, alpha and targets build the adapters the
    state fills; otherwise the state's tensors replace the base's of the same names.
    """
    import torch

    from client.model import load_model
    from common.spec import BaseDtype, Quantization, TrainingSpec, TrainMode
    from common.statefile import StateReader

    # Absolute: the adapter names its base by this path, and must load from any working directory.
    model_dir = model_dir.resolve()
    lora = spec.mode is TrainMode.LORA
    # The merge goes into the fp32 base read from its files, never into a quantized one (QLoRA runs).
    unquantized = replace(spec, quantization=Quantization.NONE, base_dtype=BaseDtype.FP32)
    loaded = load_model(
        model_dir, unquantized if lora else TrainingSpec(mode=TrainMode.FULL), torch.device("cpu")
    )
    put_state(loaded.model, StateReader(state_file), required=loaded.trainable if lora else ())
    model = loaded.model
    adapter_dir = None
    if lora:
        adapter_dir = (adapter_out or default_adapter_dir(out)).resolve()
        for config in model.peft_config.values():
            config.base_model_name_or_path = str(model_dir)
        model.save_pretrained(adapter_dir, safe_serialization=True)
        loaded.tokenizer.save_pretrained(adapter_dir)
        model = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)
    return Exported(out.resolve(), adapter_dir)


def put_state(model: Any, reader: StateReader, *, required: Collection[str]) -> int:
    """Copy the state's tensors into ``model``'s parameters of the same names, one tensor at a time.

    Every name must be a parameter of the same shape, and every name of ``required`` must be in the
    state; optimizer state carried in it (names with ``#``) is skipped. Returns the tensors copied.
    """
    import torch

    from common.spec import OPTIMIZER_MARK

    params = dict(model.named_parameters())
    shapes = {t.name: t.shape for t in reader.manifest if OPTIMIZER_MARK not in t.name}
    unknown = sorted(set(shapes) - set(params))
    missing = sorted(set(required) - set(shapes))
    if not shapes:
        raise ExportError(f"{reader.path} holds no weights", EXIT_FAILED)
    if unknown:
        raise ExportError(
            f"{reader.path} does not fit the base model: {len(unknown)} of its tensors are not parameters "
            f"of it, e.g. {unknown[0]}",
            EXIT_FAILED,
        )
    if missing:
        raise ExportError(
            f"{reader.path} lacks {len(missing)} tensors the run trains, e.g. {missing[0]}", EXIT_FAILED
        )
    wrong = [(n, s, tuple(params[n].shape)) for n, s in shapes.items() if s != tuple(params[n].shape)]
    if wrong:
        name, got, want = wrong[0]
        raise ExportError(
            f"{reader.path}: tensor {name} has shape {list(got)}, the model's {list(want)} "
            f"({len(wrong)} tensors differ)",
            EXIT_FAILED,
        )
    with torch.no_grad():
        for name in shapes:
            params[name].copy_(reader.read(name))
    return len(shapes)


# ---------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ExportError as exc:
        print(f"gdfed export: {exc}", file=sys.stderr)
        return exc.code


def _run(args: argparse.Namespace) -> int:
    from common.errors import GdfedError
    from common.spec import TrainMode
    from common.state_dir import TRAINING_SPEC, read_training_spec

    if args.aggregator_state is not None:
        try:
            state_file, number = state_file_of_round(args.aggregator_state, args.round)
            recorded = read_training_spec(args.aggregator_state)
        except GdfedError as exc:
            raise ExportError(exc.message) from None
        where = str(args.aggregator_state / TRAINING_SPEC)
        if recorded is None:
            where = (
                f"{args.aggregator_state} records no training spec (a state directory from before runs did)"
            )
    else:
        if not args.state.is_file():
            raise ExportError(f"--state {args.state}: no such file")
        state_file, number, recorded = args.state, args.round, None
        where = f"{args.state} is a bare state file"
    shapes = {t.name: t.shape for t in _reader(state_file).manifest}
    resolved = resolve_spec(recorded, where, shapes, flags_of(args))
    if resolved.spec.mode is not TrainMode.LORA and args.adapter_out is not None:
        raise ExportError(f"--adapter-out is for LoRA runs; this one's {describe(resolved.spec)}")
    if not (args.model / "config.json").is_file():
        raise ExportError(f"--model {args.model} is not a model directory (it has no config.json)")
    if resolved.note:
        print(f"gdfed export: note: {resolved.note}", file=sys.stderr)
    done = export(args.model, state_file, args.out, spec=resolved.spec, adapter_out=args.adapter_out)
    label = f"round {number}" if number is not None else str(state_file)
    print(f"exported {label} ({describe(resolved.spec)})")
    print(f"  merged model: {done.model_dir}")
    if done.adapter_dir is not None:
        print(f"  LoRA adapter: {done.adapter_dir} (base: {args.model.resolve()})")
    return 0


def _reader(state_file: Path) -> StateReader:
    import struct

    from common.statefile import StateReader

    try:
        return StateReader(state_file)
    except (ValueError, KeyError, struct.error) as exc:
        raise ExportError(f"{state_file} is not a safetensors state file: {exc}") from None
