"""The aggregator's configuration: typed, loaded once from TOML and flags, then passed down.

Every setting can live in the TOML file; command-line flags override it.
Example (``deploy/aggregator.example.toml`` has the full commented version)::

    listen = "0.0.0.0:50051"
    state_dir = "/var/lib/gdfed"
    init_state = "/models/init-trainable.safetensors"
    rounds = 20
    admin_token_file = "/etc/gdfed/admin.token"

    [round]
    min_sites_to_open = 0    # a round opens once this many sites are alive (0 = at once)
    min_sites = 0            # 0 = every participating site
    min_sample_fraction = 0.0
    deadline_s = 600

    [sites]                  # site id = token (or site_tokens_file = "...")
    hospital-a = "..."

Validated once, where it is built: each section checks itself in ``__post_init__``, so a config
built in code (as tests do) is held to the same rules as one loaded from TOML, and the daemon
never starts on a setting it would refuse later. A bad setting raises ``ConfigError`` naming the
field and its allowed values or limit. Enumerated settings are StrEnums: TOML strings and flags
parse into them, and they still compare equal to their strings. Reading the file and the flags
is ``server.config_file``'s job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from common.codec.layout import DecodeLimits
from common.delta import GIB, MIB, Codec
from common.spec import LocalOptimizer, LrSchedule, Method, TrainingSpec
from server.config_error import ConfigError
from server.cybgd import CyBgdMode
from server.optimizers import OptimizerName, make_optimizer, optimizer_params
from server.tree_config import TreeConfig, check_tree
from server.upstream.settings import UpstreamConfig, check_upstream

__all__ = [
    "MAX_STREAM_WINDOW",
    "MIN_STREAM_WINDOW",
    "Accumulator",
    "AggregationConfig",
    "AggregationRule",
    "ConfigError",
    "CyBgdConfig",
    "CyBgdMode",
    "CyBgdOptimizerState",
    "InfluenceConfig",
    "OptimizerConfig",
    "OptimizerName",
    "PrivacyConfig",
    "PublishPolicy",
    "RoundPolicy",
    "ServerConfig",
    "TlsConfig",
]

# Bounds of stream_window_bytes, the HTTP/2 window of each received stream (server.app.server_options).
MIN_STREAM_WINDOW = 64 * 1024
MAX_STREAM_WINDOW = 1 << 30


class CyBgdOptimizerState(StrEnum):
    """Where a FedCyBGD block's AdamW state lives between turns."""

    RESET = "reset"  # nowhere: each turn starts afresh
    TRAVEL = "travel"  # in the global state, beside the block (3x the block's bytes each way)


class Accumulator(StrEnum):
    """Precision of the round's running sum (server.accumulation.ACCUMULATORS)."""

    FP32 = "fp32"
    FP64 = "fp64"


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundPolicy:
    """When a round closes."""

    min_sites: int = 0  # accepted uploads needed; 0 = every participating site still alive
    min_sample_fraction: float = 0.0  # ... holding at least this fraction of the participants' samples
    deadline_s: int = 0  # seconds from opening; 0 = none
    # Like Flower's min_available_clients: without it the first site to join opens round 1 alone and,
    # with min_sites = 0, closes it alone before slower sites have loaded their model.
    min_sites_to_open: int = 0

    def __post_init__(self) -> None:
        _bounded("round.min_sites", self.min_sites, low=0)
        _bounded("round.min_sample_fraction", self.min_sample_fraction, low=0, high=1)
        _bounded("round.deadline_s", self.deadline_s, low=0)
        _bounded("round.min_sites_to_open", self.min_sites_to_open, low=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimizerConfig:
    """The server optimizer (server.optimizers.make_optimizer).

    ``lr`` is always passed; its default 1 makes FedAvg the plain mean. The other hyperparameters,
    left unset (None), take the chosen optimizer's own defaults: FedAdagrad's beta1 is 0, FedAdam's
    0.9. Setting one the chosen optimizer does not take is an error, not silently ignored.
    """

    name: OptimizerName = OptimizerName.FEDAVG
    lr: float = 1.0
    momentum: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    tau: float | None = None

    def __post_init__(self) -> None:
        _parse_enum(self, "name", OptimizerName, "optimizer.name")
        accepted = optimizer_params(self.name)
        for f in fields(self):
            if f.default is None and getattr(self, f.name) is not None and f.name not in accepted:
                raise ConfigError(
                    f"optimizer.{f.name} is set, but {self.name} does not take it; "
                    f"it takes {', '.join(accepted)}",
                    field=f"optimizer.{f.name}",
                )
        try:
            make_optimizer(self.name, **self.params())  # its constructor checks the ranges
        except ValueError as exc:
            raise ConfigError(f"[optimizer] {self.name}: {exc}", field="optimizer") from None

    def params(self) -> dict[str, float]:
        """The keyword arguments of ``make_optimizer(self.name, ...)``.

        Read from the optimizer's constructor signature (server.optimizers.optimizer_params), so a
        new optimizer needs no table here; unset hyperparameters are left to its defaults.

        Example:
            >>> OptimizerConfig(name="fedadagrad", lr=0.1).params()
            {'lr': 0.1}
        """
        values = {p: getattr(self, p, None) for p in optimizer_params(self.name)}
        return {p: v for p, v in values.items() if v is not None}


@dataclass(frozen=True, slots=True, kw_only=True)
class CyBgdConfig:
    """FedCyBGD settings (used when training.method = "fedcybgd"); see server.methods."""

    mode: CyBgdMode = CyBgdMode.ASCENDING
    # Download compression: at its turn a site fetches its own block and a random ceil(p·n) of the
    # n other blocks updated so far; every other block stays at the base model's values there.
    # 1.0 = a normal sync of the whole state.
    download_fraction: float = 1.0
    # AdamW state of a block between turns: "reset" (each turn starts afresh) or "travel" (the
    # moments and step count ride with the block in the global state, so the next site to train
    # the block continues the same optimizer; 3x the block's bytes each way).
    optimizer_state: CyBgdOptimizerState = CyBgdOptimizerState.RESET

    def __post_init__(self) -> None:
        _parse_enum(self, "mode", CyBgdMode, "cybgd.mode")
        _parse_enum(self, "optimizer_state", CyBgdOptimizerState, "cybgd.optimizer_state")
        _bounded("cybgd.download_fraction", self.download_fraction, low=0, high=1, above=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class InfluenceConfig:
    """How far one upload may move the model (server.influence; docs/operator.md "Bounded influence")."""

    clip_norm: float = 0.0  # an upload's global L2 norm is scaled down to this; 0 = no fixed bound
    adaptive: float = 0.0  # > 0: clip at adaptive x the median of recent accepted norms; 0 = off
    history: int = 50  # recent accepted norms (earlier rounds) the median is taken over
    outlier_factor: float = 3.0  # flag an upload over this x the median; 0 = never
    # Refused above this, clipping or not: no upload can overflow the sum or the server optimizer.
    max_norm: float = 1e9

    def __post_init__(self) -> None:
        _bounded("influence.clip_norm", self.clip_norm, low=0, high=1e30)
        _bounded("influence.adaptive", self.adaptive, low=0, high=1e6)
        _bounded("influence.history", self.history, low=1, high=100_000)
        _bounded("influence.outlier_factor", self.outlier_factor, low=0, high=1e6)
        _bounded("influence.max_norm", self.max_norm, low=0, high=1e30, above=True)


class AggregationRule(StrEnum):
    """How a round's uploads combine into its mean delta (server.robust)."""

    MEAN = "mean"  # the streaming weighted mean (server.aggregate)
    TRIMMED_MEAN = "trimmed_mean"  # coordinate-wise, unweighted, at the close from the spools
    MEDIAN = "median"  # coordinate-wise, unweighted, at the close from the spools


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregationConfig:
    """The aggregation rule (docs/operator.md "Robust rules and differential privacy")."""

    rule: AggregationRule = AggregationRule.MEAN
    # trimmed_mean: per coordinate, drop this many of the K values at each end (exactly one of the two):
    trim_fraction: float = 0.0  # floor(trim_fraction x K) per side
    trim_count: int = 0  # a fixed count per side
    # Memory for the uploads' values read back at the close; a tensor larger than budget / K still
    # takes K x its size.
    buffer_bytes: int = 256 * MIB

    def __post_init__(self) -> None:
        _parse_enum(self, "rule", AggregationRule, "aggregation.rule")
        _bounded("aggregation.trim_fraction", self.trim_fraction, low=0, high=0.49)
        _bounded("aggregation.trim_count", self.trim_count, low=0, high=10_000)
        _bounded("aggregation.buffer_bytes", self.buffer_bytes, low=MIB, high=1 << 40)
        trimming = self.trim_fraction > 0 or self.trim_count > 0
        if self.rule is AggregationRule.TRIMMED_MEAN and not trimming:
            raise ConfigError(
                'aggregation.rule = "trimmed_mean" needs aggregation.trim_fraction (in (0, 0.49]) '
                "or aggregation.trim_count (>= 1): how many values to drop at each end",
                field="aggregation.trim_fraction",
            )
        if self.trim_fraction > 0 and self.trim_count > 0:
            raise ConfigError(
                "aggregation.trim_fraction and aggregation.trim_count are both set; set one",
                field="aggregation.trim_count",
            )
        if trimming and self.rule is not AggregationRule.TRIMMED_MEAN:
            raise ConfigError(
                f"aggregation.trim_fraction/trim_count are set, but aggregation.rule is {self.rule.value!r}; "
                'they apply to rule = "trimmed_mean" only',
                field="aggregation.rule",
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyConfig:
    """Client-level differential privacy, DP-FedAvg style (server.privacy)."""

    # Gaussian noise of std noise_multiplier x influence.clip_norm on the round's sum; 0 = off.
    noise_multiplier: float = 0.0
    delta: float = 1e-5  # the delta at which the epsilon spent is reported
    # Sites the participants are drawn from (sample rate = sites in the round / population);
    # 0 = the sites the run has registered (joined) so far.
    population: int = 0

    def __post_init__(self) -> None:
        _bounded("privacy.noise_multiplier", self.noise_multiplier, low=0, high=1e6)
        _bounded("privacy.delta", self.delta, low=0, high=0.5, above=True)
        _bounded("privacy.population", self.population, low=0, high=1_000_000_000)

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishPolicy:
    """What a failed publication does: retried with backoff, failed only after ``max_attempts``."""

    max_attempts: int = 0  # attempts before the round is FAILED (its uploads kept); 0 = retry until it works
    backoff_s: float = 1.0  # first wait; doubled after each failure up to max_backoff_s
    max_backoff_s: float = 60.0

    def __post_init__(self) -> None:
        _bounded("publish.max_attempts", self.max_attempts, low=0)
        _bounded("publish.backoff_s", self.backoff_s, low=0, above=True)
        _bounded("publish.max_backoff_s", self.max_backoff_s, low=self.backoff_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None  # set: mutual TLS, clients must present a certificate it signed
    # A site's token is taken only with a client certificate whose CN or a subjectAltName is the
    # site id (server.auth): a stolen token alone is not enough. Needs client_ca.
    bind_site_to_cert: bool = False

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            missing = "tls.key" if self.key is None else "tls.cert"
            raise ConfigError(f"TLS needs both tls.cert and tls.key; {missing} is not set", field=missing)
        if self.client_ca is not None and self.cert is None:
            # Without a certificate the daemon would serve plaintext and never check the clients.
            raise ConfigError("tls.client_ca (mutual TLS) needs tls.cert and tls.key", field="tls.client_ca")
        if self.bind_site_to_cert and self.client_ca is None:
            raise ConfigError(
                "tls.bind_site_to_cert needs mutual TLS: set tls.client_ca (and tls.cert, tls.key) so that "
                "sites present certificates",
                field="tls.bind_site_to_cert",
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Everything the daemon needs; see the module docstring for the TOML form."""

    listen: str = "127.0.0.1:50051"
    state_dir: Path = Path("gdfed-state")
    init_state: Path | None = None
    run_id: str = ""
    rounds: int = 0  # rounds to run; 0 = until stopped
    round: RoundPolicy = field(default_factory=RoundPolicy)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    cybgd: CyBgdConfig = field(default_factory=CyBgdConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)  # the root of a tree: its intermediates
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)  # an intermediate: its parent
    publish: PublishPolicy = field(default_factory=PublishPolicy)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    broadcast_codec: Codec = field(default_factory=Codec)
    site_tokens: Mapping[str, str] = field(default_factory=dict)
    # Re-read on SIGHUP and `gdfed admin reload-tokens` (server.tokens); [sites] tokens stay until restart.
    site_tokens_files: tuple[Path, ...] = ()
    admin_token: str = ""
    heartbeat_interval_s: float = 5.0
    missed_beats: int = 3
    max_upload_bytes: int = 64 * GIB
    # Uploads streamed at once; more wait their turn (bounded memory; the fold worker is one thread anyway).
    max_concurrent_uploads: int = 4
    # HTTP/2 flow-control window of each stream the daemon receives, fixed (BDP probing off). With
    # probing on, gRPC grew the windows of uploads waiting for a slot until the daemon buffered
    # hundreds of MB, up to GBs, for them. A stream's throughput is at most window / round-trip time:
    # 4 MiB is 84 MB/s at 50 ms; raise it for long, fast links.
    stream_window_bytes: int = 4 * MIB
    base_model_fingerprint: str = ""
    keep_states: int = 2  # published states (and their snapshots) kept on disk
    # Running-sum precision. fp32: the sum costs 1x the trainable state; another arrival order
    # changes a result by at most K·2^-24·Σ n_i|Δ_i| / Σ n_i. fp64: 2x the memory, bound K·2^-53·(...)
    # plus 1 ulp of fp32. The same uploads in the same order are bit-identical either way.
    accumulator: Accumulator = Accumulator.FP32
    metrics_listen: str = ""  # host:port of the Prometheus endpoint; "" = off
    tls: TlsConfig = field(default_factory=TlsConfig)
    tick_s: float = 0.2
    # Fair share (docs/operator.md): concurrent calls a site may hold, per kind, and long-lived calls
    # (uploads, fetches, long polls) of all sites together; the RPC pool has room for unary calls beyond.
    max_streams_per_site: int = 2
    max_polls_per_site: int = 2
    max_long_calls: int = 128

    def __post_init__(self) -> None:
        _parse_enum(self, "accumulator", Accumulator, "accumulator")
        method = self.training.method
        if method is not Method.GRADUALDIFF and (
            self.optimizer.name != OptimizerName.FEDAVG or self.optimizer.lr != 1.0
        ):
            # FlexLoRA replaces the adapters with the SVD's; FedCyBGD's latest writer sets its block.
            raise ConfigError(
                f"training.method {method.name.lower()} takes the new state as it comes: "
                f"the server optimizer must be fedavg with lr 1, not {self.optimizer.name} with lr "
                f"{self.optimizer.lr}",
                field="optimizer",
            )
        _bounded("rounds", self.rounds, low=0)
        self._check_rule_and_privacy()
        check_tree(self.tree, method=method, rule=self.aggregation.rule, privacy=self.privacy.enabled)
        check_upstream(
            self.upstream,
            method=method,
            server_optimizer=(self.optimizer.name.value, self.optimizer.lr),
            rule=self.aggregation.rule.value,
            privacy=self.privacy.enabled,
            rounds=self.rounds,
            init_state=self.init_state,
        )
        self._check_training_schedule()
        _bounded("heartbeat_interval_s", self.heartbeat_interval_s, low=0, above=True)
        _bounded("missed_beats", self.missed_beats, low=1)
        _bounded("max_upload_bytes", self.max_upload_bytes, low=1)
        _bounded("max_concurrent_uploads", self.max_concurrent_uploads, low=1)
        _bounded(
            "stream_window_bytes", self.stream_window_bytes, low=MIN_STREAM_WINDOW, high=MAX_STREAM_WINDOW
        )
        _bounded("keep_states", self.keep_states, low=1)
        _bounded("tick_s", self.tick_s, low=0, above=True)
        _bounded("max_streams_per_site", self.max_streams_per_site, low=1)
        _bounded("max_polls_per_site", self.max_polls_per_site, low=1)
        _bounded("max_long_calls", self.max_long_calls, low=1, high=4096)

    def _check_training_schedule(self) -> None:
        training = self.training
        if training.lr_schedule is LrSchedule.COSINE and not training.schedule_rounds:
            if not self.rounds:
                raise ConfigError(
                    'training.lr_schedule = "cosine" needs the rounds it spans: set rounds, '
                    "or training.schedule_rounds for a run that goes on until stopped",
                    field="training.schedule_rounds",
                )
            # The spec travels to every site, so the run's length goes with it.
            object.__setattr__(self, "training", replace(training, schedule_rounds=self.rounds))
        if (
            self.training.method is Method.FEDCYBGD
            and self.cybgd.optimizer_state is CyBgdOptimizerState.TRAVEL
            and self.training.optimizer is not LocalOptimizer.ADAMW
        ):
            # Travelling moments are fp32 AdamW tensors; 8-bit moments have another layout.
            raise ConfigError(
                'cybgd.optimizer_state = "travel" needs training.optimizer = "adamw", not '
                f"{self.training.optimizer.name.lower()!r}",
                field="training.optimizer",
            )

    def _check_rule_and_privacy(self) -> None:
        """Refuse robust rules and DP where they cannot apply (docs/operator.md)."""
        method, rule = self.training.method, self.aggregation.rule
        if rule is not AggregationRule.MEAN:
            if method is Method.FLEXLORA:
                raise ConfigError(
                    f'aggregation.rule = "{rule.value}" cannot apply to training.method flexlora, whose '
                    'close is an SVD of the full-size adapters, not a mean; use rule = "mean"',
                    field="aggregation.rule",
                )
            if method is Method.FEDCYBGD and self.cybgd.mode is not CyBgdMode.AGG:
                raise ConfigError(
                    f'aggregation.rule = "{rule.value}": fedcybgd mode {self.cybgd.mode.value} has one '
                    'site per round, nothing to compare; use cybgd.mode = "agg" or rule = "mean"',
                    field="aggregation.rule",
                )
            if self.round.min_sites and self.round.min_sites <= 2 * self.aggregation.trim_count:
                raise ConfigError(
                    f"aggregation.trim_count {self.aggregation.trim_count} drops 2 x that many values per "
                    f"coordinate; round.min_sites {self.round.min_sites} must be more",
                    field="aggregation.trim_count",
                    limit=(self.round.min_sites - 1) // 2,
                )
        if not self.privacy.enabled:
            return
        if method is Method.FLEXLORA:
            raise ConfigError(
                "privacy.noise_multiplier > 0 cannot apply to training.method flexlora (its uploads are "
                "not clipped, its close is an SVD)",
                field="privacy.noise_multiplier",
            )
        if rule is not AggregationRule.MEAN:
            raise ConfigError(
                f'privacy.noise_multiplier > 0 needs aggregation.rule = "mean", not "{rule.value}": the '
                "noise is calibrated to the sensitivity of a sum of clipped deltas",
                field="aggregation.rule",
            )
        if self.influence.clip_norm <= 0:
            raise ConfigError(
                "privacy.noise_multiplier > 0 needs a fixed clip bound: set influence.clip_norm",
                field="influence.clip_norm",
            )
        if self.influence.adaptive > 0:
            raise ConfigError(
                "privacy.noise_multiplier > 0 needs a fixed clip bound; influence.adaptive derives it "
                "from the sites' norms, which is not private: set influence.adaptive = 0",
                field="influence.adaptive",
            )

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(max_total_bytes=self.max_upload_bytes)


E = TypeVar("E", bound=StrEnum)
T = TypeVar("T")


def _pick(table: Mapping[str, T], value: object, name: str) -> T:
    """``table[value]``, case-insensitively; a ConfigError naming ``name`` and the known values otherwise."""
    key = value.lower() if isinstance(value, str) else value
    if not isinstance(key, str) or key not in table:
        raise ConfigError(
            f"{name} = {value!r} is not one of the known values: {', '.join(table)}", field=name
        )
    return table[key]


def _parse_enum(section: object, attr: str, kind: type[E], name: str) -> None:
    """Replace the string in ``section.attr`` (a frozen dataclass's field) with its ``kind`` member."""
    member = _pick({m.value: m for m in kind}, getattr(section, attr), name)
    object.__setattr__(section, attr, member)


def _bounded(name: str, value: float, *, low: float, high: float | None = None, above: bool = False) -> None:
    """ConfigError unless ``low <= value`` (``low < value`` if ``above``) and ``value <= high``; NaN fails."""
    ok = value > low if above else value >= low
    need = f"> {low}" if above else f">= {low}"
    if high is not None:
        ok = ok and value <= high
        need = f"in ({low}, {high}]" if above else f"between {low} and {high}"
    if not ok:
        limit = high if high is not None and value > high else low
        raise ConfigError(f"{name} = {value!r}: must be {need}", field=name, limit=limit)
