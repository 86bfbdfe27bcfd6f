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
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from common.codec.layout import DecodeLimits, validate_codec
from common.delta import GIB, MIB, Cast, Codec, Lossy
from common.errors import InvalidArgument
from common.spec import LoraSpec, Method, TrainingSpec, TrainMode


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundPolicy:
    """When a round closes."""

    min_sites: int = 0  # accepted uploads needed; 0 = every participating site still alive
    min_sample_fraction: float = 0.0  # ... holding at least this fraction of the participants' samples
    deadline_s: int = 0  # seconds from opening; 0 = none
    # Like Flower's min_available_clients: without it the first site to join opens round 1 alone and,
    # with min_sites = 0, closes it alone before slower sites have loaded their model.
    min_sites_to_open: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimizerConfig:
    """The server optimizer (server.aggregate.make_optimizer)."""

    name: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


@dataclass(frozen=True, slots=True, kw_only=True)
class CyBgdConfig:
    """FedCyBGD settings (used when training.method = "fedcybgd"); see server.methods."""

    mode: str = "ascending"  # ascending | descending | random | agg
    # Download compression: at its turn a site fetches its own block and a random ceil(p·n) of the
    # n other blocks updated so far; every other block stays at the base model's values there.
    # 1.0 = a normal sync of the whole state.
    download_fraction: float = 1.0
    # AdamW state of a block between turns: "reset" (each turn starts afresh) or "travel" (the
    # moments and step count ride with the block in the global state, so the next site to train
    # the block continues the same optimizer; 3x the block's bytes each way).
    optimizer_state: str = "reset"


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None  # set: mutual TLS, clients must present a certificate it signed


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
    training: TrainingSpec = field(default_factory=TrainingSpec)
    broadcast_codec: Codec = field(default_factory=Codec)
    site_tokens: Mapping[str, str] = field(default_factory=dict)
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
    accumulator: str = "fp32"
    metrics_listen: str = ""  # host:port of the Prometheus endpoint; "" = off
    tls: TlsConfig = field(default_factory=TlsConfig)
    tick_s: float = 0.2

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(max_total_bytes=self.max_upload_bytes)


def _codec(raw: Mapping[str, Any], *, section: str = "training.upload_codec") -> Codec:
    cast = {"none": Cast.NONE, "exact": Cast.NONE, "bf16": Cast.BF16, "f16": Cast.F16, "fp16": Cast.F16}
    lossy = {"none": Lossy.NONE, "topk": Lossy.TOPK, "int8": Lossy.INT8}
    kind = str(raw.get("lossy", "none")).lower()
    if kind not in lossy:
        raise ValueError(f"[{section}] lossy = {kind!r}; known: {sorted(lossy)}")
    if lossy[kind] is not Lossy.NONE and section != "training.upload_codec":
        # Lossy forms need a residual kept by the sender (error feedback): uploads only.
        raise ValueError(f"[{section}] lossy = {kind!r}: lossy codecs apply to uploads only")
    codec = Codec(
        cast=cast[str(raw.get("cast", "none")).lower()],
        byte_shuffle=bool(raw.get("byte_shuffle", True)),
        block_bytes=int(raw.get("block_bytes", Codec().block_bytes)),
        zstd_level=int(raw.get("zstd_level", 1)),
        lossy=lossy[kind],
        topk_fraction=float(raw.get("topk_fraction", 0.01)) if lossy[kind] is Lossy.TOPK else 0.0,
    )
    try:
        validate_codec(codec)
    except InvalidArgument as exc:
        raise ValueError(f"[{section}] {exc.message}") from None
    return codec


def _training(raw: Mapping[str, Any]) -> TrainingSpec:
    lora = raw.get("lora", {})
    return TrainingSpec(
        method=Method[str(raw.get("method", "gradualdiff")).upper()],
        mode=TrainMode[str(raw.get("mode", "full")).upper()],
        trainable_patterns=tuple(raw.get("trainable_patterns", ())),
        lora=LoraSpec(
            rank=int(lora.get("rank", 8)),
            alpha=float(lora.get("alpha", 16.0)),
            dropout=float(lora.get("dropout", 0.05)),
            target_modules=tuple(lora.get("target_modules", ("q_proj", "v_proj"))),
        ),
        local_steps=int(raw.get("local_steps", 10)),
        batch_size=int(raw.get("batch_size", 8)),
        learning_rate=float(raw.get("learning_rate", 1e-4)),
        max_seq_len=int(raw.get("max_seq_len", 256)),
        upload_codec=_codec(raw.get("upload_codec", {})),
        seed=int(raw.get("seed", 0)),
        prox_mu=float(raw.get("prox_mu", 0.0)),
    )


def _simple(cls: type[Any], raw: Mapping[str, Any], section: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ValueError(f"[{section}]: unknown settings {sorted(unknown)}; known: {sorted(known)}")
    values = {}
    for key, value in raw.items():
        kind = str(known[key].type)
        values[key] = Path(value) if "Path" in kind else value
    return cls(**values)


def read_secret(path: Path) -> str:
    """A token from a file (first line, stripped), so tokens stay out of config files and process lists."""
    return path.read_text().strip().splitlines()[0].strip()


def parse_tokens(text: str) -> dict[str, str]:
    """``site = token`` lines (TOML or plain); blank lines and # comments ignored."""
    tokens = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("["):
            continue
        site, sep, token = line.partition("=")
        if not sep:
            raise ValueError(f"token line {line!r} is not `site = token`")
        tokens[site.strip().strip('"')] = token.strip().strip('"')
    return tokens


def load_config(path: Path | None, overrides: Mapping[str, Any]) -> ServerConfig:
    """The config from a TOML file (if any) with flag ``overrides`` applied on top (None = not given)."""
    raw: dict[str, Any] = {}
    if path is not None:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    base = Path(path).parent if path is not None else Path.cwd()

    def rel(value: str | Path) -> Path:
        p = Path(value)
        return p if p.is_absolute() else base / p

    tokens: dict[str, str] = dict(raw.pop("sites", {}))
    if "site_tokens_file" in raw:
        tokens |= parse_tokens(rel(raw.pop("site_tokens_file")).read_text())
    admin = str(raw.pop("admin_token", ""))
    if "admin_token_file" in raw:
        admin = read_secret(rel(raw.pop("admin_token_file")))
    config = ServerConfig(
        round=_simple(RoundPolicy, raw.pop("round", {}), "round"),
        optimizer=_simple(OptimizerConfig, raw.pop("optimizer", {}), "optimizer"),
        cybgd=_simple(CyBgdConfig, raw.pop("cybgd", {}), "cybgd"),
        training=_training(raw.pop("training", {})),
        broadcast_codec=_codec(raw.pop("broadcast_codec", {}), section="broadcast_codec"),
        tls=_simple(TlsConfig, {k: str(rel(v)) for k, v in raw.pop("tls", {}).items()}, "tls"),
        site_tokens=tokens,
        admin_token=admin,
    )
    for key in ("state_dir", "init_state"):
        if key in raw:
            raw[key] = rel(raw[key])
    config = replace(config, **_simple(_TopLevel, raw, "top level").as_dict())
    return apply_overrides(config, overrides)


@dataclass(slots=True, kw_only=True)
class _TopLevel:
    listen: str | None = None
    state_dir: Path | None = None
    init_state: Path | None = None
    run_id: str | None = None
    rounds: int | None = None
    heartbeat_interval_s: float | None = None
    missed_beats: int | None = None
    max_upload_bytes: int | None = None
    max_concurrent_uploads: int | None = None
    stream_window_bytes: int | None = None
    base_model_fingerprint: str | None = None
    keep_states: int | None = None
    accumulator: str | None = None
    metrics_listen: str | None = None
    tick_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def apply_overrides(config: ServerConfig, overrides: Mapping[str, Any]) -> ServerConfig:
    """Apply flag values (dotted names reach sections: ``round.min_sites``)."""
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        section, dot, name = key.partition(".")
        if dot:
            sections.setdefault(section, {})[name] = value
        else:
            top[key] = value
    for section, values in sections.items():
        top[section] = replace(getattr(config, section), **values)
    if "admin_token_file" in top:
        top["admin_token"] = read_secret(Path(top.pop("admin_token_file")))
    if "site_tokens_file" in top:
        top["site_tokens"] = dict(config.site_tokens) | parse_tokens(
            Path(top.pop("site_tokens_file")).read_text()
        )
    if not top.get("admin_token", config.admin_token):
        env = os.environ.get("GDFED_ADMIN_TOKEN", "")
        if env:
            top["admin_token"] = env
    return replace(config, **top)
