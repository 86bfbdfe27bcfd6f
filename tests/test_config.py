"""The aggregator's configuration: enums parsed once, ranges checked where a section is built, the
optimizer's keyword arguments read from its constructor, and flags applied before any check."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.delta import Cast
from common.errors import FailedPrecondition
from common.spec import (
    BaseDtype,
    LocalOptimizer,
    LoraSpec,
    LrSchedule,
    Method,
    Quantization,
    TrainingSpec,
    TrainMode,
)
from server import cybgd
from server.accumulation import ACCUMULATORS
from server.config import (
    Accumulator,
    ConfigError,
    CyBgdConfig,
    CyBgdMode,
    CyBgdOptimizerState,
    OptimizerConfig,
    OptimizerName,
    RoundPolicy,
    ServerConfig,
    TlsConfig,
)
from server.config_file import load_config
from server.optimizers import OPTIMIZERS, make_optimizer, optimizer_params


@contextmanager
def refused(field: str, match: str) -> Iterator[None]:
    """The block raises a ConfigError for ``field`` whose message matches ``match``.

    It must also be a ValueError (what the loader always raised) and a FailedPrecondition (what the
    Coordinator raised for the settings it used to check itself).
    """
    with pytest.raises(ConfigError, match=match) as info:
        yield
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, FailedPrecondition)
    assert err.code is grpc.StatusCode.FAILED_PRECONDITION
    assert err.field == field, f"field is {err.field!r}, expected {field!r}: {err}"


def load(tmp_path: Path, text: str, **flags: Any) -> ServerConfig:
    path = tmp_path / "aggregator.toml"
    path.write_text(text)
    return load_config(path, flags)


# -------------------------------------------------------------- optimizer parameters


@pytest.mark.parametrize("name", list(OptimizerName))
def test_every_optimizer_builds_from_its_config_section(name: OptimizerName) -> None:
    config = OptimizerConfig(name=name)
    optimizer = make_optimizer(config.name, **config.params())
    assert type(optimizer) is OPTIMIZERS[name] and optimizer.name == name


def test_every_optimizer_has_a_name_and_every_hyperparameter_a_setting() -> None:
    assert set(OptimizerName) == set(OPTIMIZERS)
    settings = {f.name for f in fields(OptimizerConfig)}
    for name in OptimizerName:
        missing = set(optimizer_params(name)) - settings
        assert not missing, f"{name} takes {sorted(missing)}, which [optimizer] cannot set"


def test_params_with_defaults_build_what_the_hand_written_table_built() -> None:
    """The table the Coordinator had: lr always; fedavgm momentum; fedadam and fedyogi beta1, beta2
    and tau; fedadagrad tau only (so its beta1 stays 0), each with OptimizerConfig's old defaults."""
    old = {
        "fedavg": {"lr": 1.0},
        "fedavgm": {"lr": 1.0, "momentum": 0.9},
        "fedadam": {"lr": 1.0, "tau": 1e-3, "beta1": 0.9, "beta2": 0.99},
        "fedyogi": {"lr": 1.0, "tau": 1e-3, "beta1": 0.9, "beta2": 0.99},
        "fedadagrad": {"lr": 1.0, "tau": 1e-3},
    }
    for name, params in old.items():
        config = OptimizerConfig(name=OptimizerName(name))
        assert repr(make_optimizer(name, **config.params())) == repr(make_optimizer(name, **params))


def test_params_pass_what_is_set_and_leave_the_rest_to_the_optimizer() -> None:
    config = OptimizerConfig(name=OptimizerName.FEDADAGRAD, lr=0.1, beta1=0.5)
    assert config.params() == {"lr": 0.1, "beta1": 0.5}
    assert OptimizerConfig(name=OptimizerName.FEDYOGI, tau=0.01).params() == {"lr": 1.0, "tau": 0.01}


def test_a_hyperparameter_the_optimizer_does_not_take_is_refused() -> None:
    with refused(
        "optimizer.momentum", r"optimizer.momentum is set, but fedadam does not take it; it takes lr, beta1"
    ):
        OptimizerConfig(name=OptimizerName.FEDADAM, momentum=0.5)
    with refused("optimizer.beta2", "fedadagrad does not take it"):
        OptimizerConfig(name=OptimizerName.FEDADAGRAD, beta2=0.9)


def test_out_of_range_hyperparameters_are_refused_when_the_section_is_built() -> None:
    with refused("optimizer", r"\[optimizer\] fedadam: beta1 must be in \[0, 1\), got 1.0"):
        OptimizerConfig(name=OptimizerName.FEDADAM, beta1=1.0)
    with refused("optimizer", "tau must be finite and > 0"):
        OptimizerConfig(name=OptimizerName.FEDYOGI, tau=0.0)
    with refused("optimizer", "lr must be finite"):
        OptimizerConfig(lr=float("nan"))


# -------------------------------------------------------------- enumerations


def test_enum_settings_parse_from_toml_and_still_equal_their_strings(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        'accumulator = "fp64"\n[optimizer]\nname = "FedAdam"\nlr = 0.01\n'
        '[cybgd]\nmode = "agg"\noptimizer_state = "travel"\n',
    )
    name: str = config.optimizer.name  # a str, so that == below compares with the strings callers use
    mode: str = config.cybgd.mode
    assert config.optimizer.name is OptimizerName.FEDADAM and name == "fedadam"
    assert config.cybgd.mode is CyBgdMode.AGG and mode == "agg"
    assert config.cybgd.optimizer_state is CyBgdOptimizerState.TRAVEL
    assert config.accumulator is Accumulator.FP64 and ACCUMULATORS[config.accumulator] is not None


def test_enum_settings_built_in_code_from_strings_are_parsed_too() -> None:
    config = CyBgdConfig(mode="random", optimizer_state="travel")  # type: ignore[arg-type]
    assert config.mode is CyBgdMode.RANDOM and config.optimizer_state is CyBgdOptimizerState.TRAVEL


@pytest.mark.parametrize(
    ("text", "field", "known"),
    [
        ('[optimizer]\nname = "fedsgd"\n', "optimizer.name", "fedavg, fedavgm, fedadam, fedyogi, fedadagrad"),
        ('[cybgd]\nmode = "sideways"\n', "cybgd.mode", "ascending, descending, random, agg"),
        ('[cybgd]\noptimizer_state = "carry"\n', "cybgd.optimizer_state", "reset, travel"),
        ('accumulator = "fp16"\n', "accumulator", "fp32, fp64"),
        ('[training]\nmethod = "fedsgd"\n', "training.method", "gradualdiff, flexlora, fedcybgd"),
        ('[training]\nmode = "half"\n', "training.mode", "full, subset, lora"),
        ('[training.upload_codec]\ncast = "fp8"\n', "training.upload_codec.cast", "none, exact, bf16"),
        ('[broadcast_codec]\nlossy = "top5"\n', "broadcast_codec.lossy", "none, topk, int8"),
    ],
)
def test_an_unknown_choice_names_the_field_and_the_known_values(
    tmp_path: Path, text: str, field: str, known: str
) -> None:
    with refused(field, rf"^{re.escape(field)} = '\w+' is not one of the known values: {known}"):
        load(tmp_path, text)


def test_the_enums_match_the_tables_they_name() -> None:
    assert tuple(CyBgdMode) == cybgd.MODES
    assert set(Accumulator) == set(ACCUMULATORS)


# -------------------------------------------------------------- the checks the Coordinator made


@pytest.mark.parametrize("method", [Method.FLEXLORA, Method.FEDCYBGD])
def test_methods_that_take_the_state_as_it_comes_need_plain_fedavg(method: Method) -> None:
    spec = TrainingSpec(method=method, mode=TrainMode.LORA, lora=LoraSpec(rank=4))
    with refused(
        "optimizer", rf"training.method {method.name.lower()} .* must be fedavg with lr 1, not fedadam"
    ):
        ServerConfig(training=spec, optimizer=OptimizerConfig(name=OptimizerName.FEDADAM, lr=0.01))
    with refused("optimizer", "not fedavg with lr 2.0"):
        ServerConfig(training=spec, optimizer=OptimizerConfig(lr=2.0))
    ServerConfig(training=spec)  # fedavg at lr 1
    ServerConfig(optimizer=OptimizerConfig(name=OptimizerName.FEDADAM))  # gradualdiff takes any


def test_cybgd_download_fraction_is_in_0_1() -> None:
    with refused("cybgd.download_fraction", r"cybgd.download_fraction = 0.0: must be in \(0, 1\]"):
        CyBgdConfig(download_fraction=0.0)
    with refused("cybgd.download_fraction", r"= 1.5: must be in \(0, 1\]"):
        CyBgdConfig(download_fraction=1.5)
    assert CyBgdConfig(download_fraction=1.0).download_fraction == 1.0


# -------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    ("build", "field", "limit"),
    [
        (lambda: RoundPolicy(min_sites=-1), "round.min_sites", ">= 0"),
        (lambda: RoundPolicy(min_sample_fraction=1.5), "round.min_sample_fraction", "between 0 and 1"),
        (lambda: RoundPolicy(deadline_s=-5), "round.deadline_s", ">= 0"),
        (lambda: RoundPolicy(min_sites_to_open=-1), "round.min_sites_to_open", ">= 0"),
        (lambda: ServerConfig(rounds=-1), "rounds", ">= 0"),
        (lambda: ServerConfig(heartbeat_interval_s=0.0), "heartbeat_interval_s", "> 0"),
        (lambda: ServerConfig(missed_beats=0), "missed_beats", ">= 1"),
        (lambda: ServerConfig(max_upload_bytes=0), "max_upload_bytes", ">= 1"),
        (lambda: ServerConfig(max_concurrent_uploads=0), "max_concurrent_uploads", ">= 1"),
        (
            lambda: ServerConfig(stream_window_bytes=1000),
            "stream_window_bytes",
            "between 65536 and 1073741824",
        ),
        (lambda: ServerConfig(keep_states=0), "keep_states", ">= 1"),
        (lambda: ServerConfig(tick_s=float("nan")), "tick_s", "> 0"),
    ],
)
def test_a_value_out_of_range_names_the_field_and_the_limit(build: Any, field: str, limit: str) -> None:
    with refused(field, rf"^{re.escape(field)} = .*: must be {re.escape(limit)}$"):
        build()


def test_tls_needs_certificate_and_key_together() -> None:
    with refused("tls.key", "TLS needs both tls.cert and tls.key"):
        TlsConfig(cert=Path("server.crt"))
    with refused("tls.cert", "TLS needs both"):
        TlsConfig(key=Path("server.key"))
    with refused("tls.client_ca", "mutual TLS"):
        TlsConfig(client_ca=Path("ca.crt"))


def test_replace_validates_like_construction() -> None:
    with refused("keep_states", "keep_states = 0"):
        replace(ServerConfig(), keep_states=0)


# -------------------------------------------------------------- loading


def test_unknown_settings_and_wrong_types_are_refused(tmp_path: Path) -> None:
    with refused("bogus", r"top level: unknown settings \['bogus'\]"):
        load(tmp_path, "bogus = 1\n")
    with refused("training.local_step", r"\[training\]: unknown settings \['local_step'\]"):
        load(tmp_path, "[training]\nlocal_step = 5\n")
    with refused("rounds", "rounds = '3': must be an integer"):
        load(tmp_path, 'rounds = "3"\n')
    with refused("round.min_sites", "round.min_sites = True: must be an integer"):
        load(tmp_path, "[round]\nmin_sites = true\n")
    with refused("training.lora.target_modules", "must be a list of strings"):
        load(tmp_path, "[training.lora]\ntarget_modules = [1]\n")
    with refused("round", "must be a table"):
        load(tmp_path, "round = 3\n")


def test_file_values_parse_into_their_types(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        'state_dir = "state"\nrounds = 3\nheartbeat_interval_s = 2\n'
        '[optimizer]\nname = "fedavgm"\nmomentum = 0\n'
        '[training]\nmode = "lora"\nlearning_rate = 1\n'
        '[training.lora]\nrank = 4\ntarget_modules = ["q_proj"]\n'
        '[training.upload_codec]\ncast = "bf16"\n',
        **{"rounds": 4, "round.min_sites": None},  # None: the flag was not given
    )
    assert config.state_dir == tmp_path / "state" and config.rounds == 4 and config.round == RoundPolicy()
    assert config.optimizer.params() == {"lr": 1.0, "momentum": 0.0}
    assert config.heartbeat_interval_s == 2.0 and isinstance(config.heartbeat_interval_s, float)
    assert config.training.method is Method.GRADUALDIFF and config.training.mode is TrainMode.LORA
    assert config.training.lora == LoraSpec(rank=4, target_modules=("q_proj",))
    assert config.training.learning_rate == 1.0 and config.training.upload_codec.cast is Cast.BF16
    assert config.training.local_steps == TrainingSpec().local_steps


def test_flags_replace_file_values_before_any_check(tmp_path: Path) -> None:
    text = '[training]\nmethod = "flexlora"\nmode = "lora"\n[optimizer]\nname = "fedadam"\nlr = 0.01\n'
    with refused("optimizer", "must be fedavg with lr 1"):
        load(tmp_path, text)
    # Alone, either flag would leave a section the method refuses; together they fix the file.
    config = load(tmp_path, text, **{"optimizer.name": "fedavg", "optimizer.lr": 1.0})
    assert config.optimizer == OptimizerConfig()
    assert load(tmp_path, "[round]\nmin_sites = 2\n", **{"round.deadline_s": 60}).round == RoundPolicy(
        min_sites=2, deadline_s=60
    )


def test_tokens_add_up_and_the_admin_token_falls_back_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sites.tokens").write_text("b = tb\n")
    (tmp_path / "more.tokens").write_text("c = tc\n")
    (tmp_path / "admin.token").write_text("from-file\n")
    text = '[sites]\na = "ta"\n'
    monkeypatch.setenv("GDFED_ADMIN_TOKEN", "from-env")
    config = load(
        tmp_path,
        'site_tokens_file = "sites.tokens"\n' + text,
        site_tokens_file=str(tmp_path / "more.tokens"),
    )
    assert dict(config.site_tokens) == {"a": "ta", "b": "tb", "c": "tc"}
    assert config.admin_token == "from-env"
    assert load(tmp_path, 'admin_token_file = "admin.token"\n').admin_token == "from-file"
    assert load(tmp_path, 'admin_token = "inline"\n').admin_token == "inline"


def test_an_empty_admin_token_file_is_refused_naming_it(tmp_path: Path) -> None:
    token = tmp_path / "admin.token"
    token.write_text("\n")
    with refused("admin_token_file", "is empty"):
        load(tmp_path, f'admin_token_file = "{token}"\n')


def test_memory_lean_training_settings_parse_as_words(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        'rounds = 12\n[training]\nmode = "lora"\nbase_dtype = "bf16"\nquantization = "nf4"\n'
        'optimizer = "paged_adamw_8bit"\nlr_schedule = "cosine"\ngradient_checkpointing = true\n'
        "batch_size = 8\nmicro_batch_size = 2\nmax_grad_norm = 0.3\n",
    )
    spec = config.training
    assert (spec.base_dtype, spec.quantization) == (BaseDtype.BF16, Quantization.NF4)
    assert (spec.optimizer, spec.lr_schedule) == (LocalOptimizer.PAGED_ADAMW_8BIT, LrSchedule.COSINE)
    assert spec.gradient_checkpointing and spec.accumulation_steps == 4 and spec.max_grad_norm == 0.3
    # A cosine over the run spans the run's rounds unless told otherwise: every site gets the number.
    assert spec.schedule_rounds == 12


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ('[training]\nlr_schedule = "cosine"\n', "training.schedule_rounds", "needs the rounds it spans"),
        ('[training]\nquantization = "nf4"\n', "training.quantization", "needs training.mode"),
        ('[training]\noptimizer = "sgd"\n', "training.optimizer", "adamw_8bit"),
        ("[training]\nbatch_size = 6\nmicro_batch_size = 4\n", "training.micro_batch_size", "must divide"),
    ],
)
def test_memory_lean_settings_out_of_bounds_name_the_field(
    tmp_path: Path, text: str, field: str, words: str
) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        load(tmp_path, text)
    assert info.value.field == field
