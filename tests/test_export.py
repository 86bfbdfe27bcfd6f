"""``gdfed export``: the run's settings read from the aggregator's state directory, flags that contradict
them refused, and a merged model and a LoRA adapter that load anywhere (a real LoRA federation, real CLI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from client.export import ExportError, Flags, lora_of_tensors, resolve_spec, state_file_of_round
from common.errors import InvalidArgument, NotFound
from common.spec import LoraSpec, Method, TrainingSpec, TrainMode
from common.state_dir import TRAINING_SPEC, published_state, read_training_spec, write_training_spec
from tests.federation import demo_config, demo_worker, run_workers, tiny_demo
from tests.scripted import ROOT, Aggregator

LORA = TrainingSpec(
    mode=TrainMode.LORA,
    # Neither LoraSpec's default rank (8) nor its alpha (16): an export that fell back to defaults fails.
    lora=LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")),
    local_steps=3,
    batch_size=8,
    learning_rate=1e-2,
    max_seq_len=32,
)
PREFIX = "base_model.model."


def lora_shapes(
    rank: int, modules: tuple[str, ...] = ("q_proj", "v_proj"), layers: int = 2
) -> dict[str, Any]:
    shapes: dict[str, Any] = {}
    for layer in range(layers):
        for module in modules:
            path = f"{PREFIX}model.layers.{layer}.self_attn.{module}"
            shapes[f"{path}.lora_A.default.weight"] = (rank, 128)
            shapes[f"{path}.lora_B.default.weight"] = (128, rank)
    return shapes


# ---------------------------------------------------------------- settings: recorded, given, inferred


def test_recorded_lora_settings_are_used_and_every_contradicting_flag_is_refused() -> None:
    where = "state/training_spec.binpb"
    shapes = lora_shapes(4)
    assert resolve_spec(LORA, where, shapes, Flags()).spec == LORA
    agreeing = Flags(mode="lora", lora_rank=4, lora_alpha=8.0, lora_targets=("v_proj", "q_proj"))
    assert resolve_spec(LORA, where, shapes, agreeing).spec == LORA
    for flags, flag, value in [
        (Flags(mode="full"), "--mode full", "mode lora"),
        (Flags(lora_rank=8), "--lora-rank 8", "rank 4"),
        (Flags(lora_alpha=16.0), "--lora-alpha 16", "alpha 8"),
        (Flags(lora_targets=("q_proj",)), "--lora-targets q_proj", "targets q_proj v_proj"),
    ]:
        with pytest.raises(ExportError) as refused:
            resolve_spec(LORA, where, shapes, flags)
        message = str(refused.value)
        assert refused.value.code == 2 and flag in message and value in message and where in message
        assert "\n" not in message


def test_recorded_full_run_refuses_lora_flags_and_a_state_that_does_not_fit() -> None:
    full = TrainingSpec()
    assert resolve_spec(full, "w", {"model.norm.weight": (128,)}, Flags(mode="full")).spec == full
    with pytest.raises(ExportError, match="--lora-alpha is for LoRA runs; the run's mode is full") as refused:
        resolve_spec(full, "w", {"model.norm.weight": (128,)}, Flags(lora_alpha=16.0))
    assert refused.value.code == 2
    with pytest.raises(ExportError, match="holds LoRA adapters") as mismatch:
        resolve_spec(full, "w", lora_shapes(4), Flags())
    assert mismatch.value.code == 1
    with pytest.raises(ExportError, match="adapters of rank 2, but the run trains rank 4") as mismatch:
        resolve_spec(LORA, "w", lora_shapes(2), Flags())
    assert mismatch.value.code == 1


def test_without_a_record_the_tensors_tell_rank_and_targets_and_the_alpha_must_be_given() -> None:
    why = "state records no training spec"
    shapes = lora_shapes(4)
    assert lora_of_tensors(shapes) == (4, ("q_proj", "v_proj"))
    with pytest.raises(
        ExportError, match="--lora-alpha is needed: state records no training spec"
    ) as refused:
        resolve_spec(None, why, shapes, Flags())
    assert refused.value.code == 2
    resolved = resolve_spec(None, why, shapes, Flags(lora_alpha=8.0))
    assert resolved.spec.mode is TrainMode.LORA
    assert resolved.spec.lora == LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    assert "rank 4" in resolved.note and "alpha 8 from --lora-alpha" in resolved.note
    for flags, flag in [
        (Flags(lora_alpha=8.0, lora_rank=8), "--lora-rank 8"),
        (Flags(lora_alpha=8.0, mode="full"), "--mode full"),
        (Flags(lora_alpha=8.0, lora_targets=("k_proj",)), "--lora-targets k_proj"),
    ]:
        with pytest.raises(ExportError, match=flag):
            resolve_spec(None, why, shapes, flags)
    plain = resolve_spec(None, why, {"model.norm.weight": (128,)}, Flags())
    assert plain.spec.mode is TrainMode.FULL and "by name" in plain.note
    with pytest.raises(ExportError, match="--mode lora contradicts"):
        resolve_spec(None, why, {"model.norm.weight": (128,)}, Flags(mode="lora"))
    with pytest.raises(ExportError, match="ranks \\[2, 4\\]") as mixed:
        lora_of_tensors(lora_shapes(4) | lora_shapes(2, ("k_proj",)))
    assert mixed.value.code == 1


# ---------------------------------------------------------------- the state directory, read-only


def test_training_spec_file_round_trips_and_a_bad_one_is_named(tmp_path: Path) -> None:
    assert read_training_spec(tmp_path) is None
    spec = TrainingSpec(
        method=Method.FLEXLORA,
        mode=TrainMode.LORA,
        lora=LoraSpec(rank=16, alpha=32.5, dropout=0.0, target_modules=("q_proj", "k_proj", "o_proj")),
        local_steps=7,
        learning_rate=3e-5,
        seed=9,
    )
    path = write_training_spec(tmp_path, spec)
    assert path == tmp_path / TRAINING_SPEC and read_training_spec(tmp_path) == spec
    path.write_bytes(b"\xff\xff\xff not protobuf")
    with pytest.raises(InvalidArgument, match=str(path)):
        read_training_spec(tmp_path)


def test_a_folder_that_is_no_state_directory_is_named_and_left_untouched(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="is not an aggregator state directory"):
        published_state(tmp_path)
    assert list(tmp_path.iterdir()) == []
    code, out, err = gdfed_export(
        tmp_path, "--model", str(tmp_path), "--aggregator-state", str(tmp_path), "--out", str(tmp_path / "x")
    )
    assert code == 2 and out == "" and err.count("\n") == 1 and "is not an aggregator state directory" in err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- a real LoRA run, exported


@dataclass
class LoraRun:
    demo: Path
    state_dir: Path
    state: dict[str, torch.Tensor]  # the published state of round 1


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoraRun]:
    demo = tiny_demo(tmp_path_factory.mktemp("demo"), examples_per_site=40, eval_examples=10)
    tmp = tmp_path_factory.mktemp("run")
    config = demo_config(tmp, demo, ["site-a"], LORA, rounds=1)
    with Aggregator(config) as agg:
        assert run_workers([demo_worker(agg.target, "site-a", demo, tmp)]) == [0]
    path, number = state_file_of_round(config.state_dir, None)
    assert number == 1
    yield LoraRun(demo, config.state_dir, load_file(str(path)))


def gdfed_export(cwd: Path, *args: str) -> tuple[int, str, str]:
    """``gdfed export ARGS`` as an operator runs it, from ``cwd``: exit code, stdout, stderr."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "common.cli", "export", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout, done.stderr


def model_params(path: Path | str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(path)
    return {n: p.detach() for n, p in model.named_parameters()}


def logits(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer("12 + 9 = 21. The capital of", return_tensors="pt").input_ids
    with torch.no_grad():
        return torch.as_tensor(model(ids).logits)


@pytest.mark.slow
def test_plain_export_of_a_lora_run_writes_the_merged_model_and_an_adapter_that_loads_anywhere(
    lora_run: LoraRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert read_training_spec(lora_run.state_dir) == LORA  # recorded when the aggregator created the run
    # Run from a folder of its own, the base named by a relative path, as an operator would type it.
    here = tmp_path / "operator"
    here.mkdir()
    model_arg = os.path.relpath(lora_run.demo / "model", here)
    code, out, err = gdfed_export(
        here, "--model", model_arg, "--aggregator-state", str(lora_run.state_dir), "--out", "finetuned"
    )
    assert code == 0, err
    assert "mode lora, rank 4, alpha 8, targets q_proj, v_proj" in out and "note" not in err
    merged_dir, adapter_dir = here / "finetuned", here / "finetuned-adapter"

    # The merged model is the base with each adapted weight W + (alpha/r)·B·A of the published state.
    base = model_params(lora_run.demo / "model")
    merged = model_params(merged_dir)
    assert merged.keys() == base.keys()
    adapted = 0
    for name, weight in merged.items():
        module = name.removesuffix(".weight")
        a = lora_run.state.get(f"{PREFIX}{module}.lora_A.default.weight")
        if a is None:
            assert torch.equal(weight, base[name]), name
            continue
        b = lora_run.state[f"{PREFIX}{module}.lora_B.default.weight"]
        assert b.abs().max() > 0, "one round of training moved the adapters"
        torch.testing.assert_close(weight, base[name] + (8.0 / 4) * (b @ a), rtol=0, atol=1e-6)
        adapted += 1
    assert adapted == 2 * 4  # q_proj and v_proj of the demo model's 4 layers

    # The adapter names its base by an absolute path and loads, from another folder, to the same logits.
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((lora_run.demo / "model").resolve())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tokenizer: Any = AutoTokenizer.from_pretrained(adapter_dir)
    expected = logits(AutoModelForCausalLM.from_pretrained(merged_dir), tokenizer)
    base_model: Any = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    with_adapter = PeftModel.from_pretrained(base_model, str(adapter_dir))
    torch.testing.assert_close(logits(with_adapter, tokenizer), expected, rtol=0, atol=1e-4)
    auto: Any = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir))  # finds its base by itself
    torch.testing.assert_close(logits(auto, tokenizer), expected, rtol=0, atol=1e-4)
    assert not torch.allclose(
        logits(AutoModelForCausalLM.from_pretrained(lora_run.demo / "model"), tokenizer), expected
    )


@pytest.mark.slow
def test_flags_that_contradict_the_run_are_refused_with_one_line(lora_run: LoraRun, tmp_path: Path) -> None:
    source = ["--model", str(lora_run.demo / "model"), "--aggregator-state", str(lora_run.state_dir)]
    for flags, named in [
        (["--lora-alpha", "16"], "--lora-alpha 16 contradicts the run's LoRA alpha 8"),
        (["--mode", "full"], "--mode full contradicts the run's mode lora"),
        (["--lora-rank", "8"], "--lora-rank 8 contradicts the run's LoRA rank 4"),
        (["--round", "7"], "round 7 is not a published round of"),
    ]:
        code, _, err = gdfed_export(tmp_path, *source, "--out", str(tmp_path / "out"), *flags)
        assert code == 2, (flags, err)
        assert named in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_state_directory_from_before_runs_recorded_their_spec_needs_the_alpha(
    lora_run: LoraRun, tmp_path: Path
) -> None:
    old = tmp_path / "old-state"
    shutil.copytree(lora_run.state_dir, old, ignore=shutil.ignore_patterns(TRAINING_SPEC))
    source = [
        "--model",
        str(lora_run.demo / "model"),
        "--aggregator-state",
        str(old),
        "--out",
        str(tmp_path / "m"),
    ]
    code, _, err = gdfed_export(tmp_path, *source)
    assert code == 2 and "--lora-alpha is needed" in err and "records no training spec" in err, err
    code, _, err = gdfed_export(tmp_path, *source, "--lora-alpha", "8")
    assert code == 0, err
    assert "note:" in err and "LoRA rank 4 and targets q_proj, v_proj read from its tensors" in err
    assert (tmp_path / "m-adapter" / "adapter_config.json").exists()
    merged = model_params(tmp_path / "m")
    a = lora_run.state[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    b = lora_run.state[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    base = model_params(lora_run.demo / "model")["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(
        merged["model.layers.0.self_attn.q_proj.weight"], base + 2.0 * (b @ a), rtol=0, atol=1e-6
    )
