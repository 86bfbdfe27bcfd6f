"""A restart with another [training] section: what may change between starts, and what may not."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from common.errors import FailedPrecondition
from common.spec import BaseDtype, LoraSpec, TrainingSpec, TrainMode
from common.state_dir import read_training_spec
from server.genesis import STRUCTURAL, spec_changes
from tests.scripted import Aggregator, ScriptedSite, make_config


def _started(tmp_path: Path, training: TrainingSpec) -> None:
    agg = Aggregator(make_config(tmp_path, ["site-a"], training=training))
    with agg, ScriptedSite(agg.target, "site-a") as site:
        # What a site is told to train with is the configured spec of this start.
        assert site.join().current.training.learning_rate == training.learning_rate


def test_a_learning_rate_change_is_taken_logged_and_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _started(tmp_path, TrainingSpec(learning_rate=1e-3))
    changed = TrainingSpec(learning_rate=5e-4, base_dtype=BaseDtype.BF16)
    with caplog.at_level(logging.WARNING, logger="server.genesis"):
        _started(tmp_path, changed)
    said = caplog.text
    assert "training.learning_rate changed since the last start: 0.001 -> 0.0005" in said
    assert "training.base_dtype" in said
    assert read_training_spec(tmp_path / "state") == changed


def test_a_structural_change_is_refused_naming_the_field(tmp_path: Path) -> None:
    _started(tmp_path, TrainingSpec())
    with pytest.raises(
        FailedPrecondition, match=r"training.mode <TrainMode.FULL: 1> -> <TrainMode.LORA: 3>"
    ) as info:
        Aggregator(make_config(tmp_path, ["site-a"], training=TrainingSpec(mode=TrainMode.LORA)))
    assert info.value.field == "training.mode"
    # Nothing was overwritten: the run still starts with its own spec.
    assert read_training_spec(tmp_path / "state") == TrainingSpec()
    _started(tmp_path, TrainingSpec())


def test_every_structural_name_is_one_spec_changes_reports() -> None:
    a = TrainingSpec()
    b = replace(
        a,
        method=type(a.method)(2),
        mode=TrainMode.LORA,
        trainable_patterns=("x",),
        lora=LoraSpec(rank=4, alpha=8.0, target_modules=("o_proj",)),
    )
    assert set(spec_changes(a, b)) == set(STRUCTURAL)
