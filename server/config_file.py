"""Reading the aggregator's configuration: a TOML file, with command-line flags merged in.

``load_config`` turns the file and the flags into a ``server.config.ServerConfig``;
every value is checked for its type here and for its range by the config's own
sections when they are built. Token files are read here too (``read_secret``,
``parse_tokens``), each error naming the setting and the file.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from common.codec.layout import validate_codec
from common.delta import Cast, Codec, Lossy
from common.errors import InvalidArgument
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
from server.config import (
    AggregationConfig,
    ConfigError,
    CyBgdConfig,
    InfluenceConfig,
    OptimizerConfig,
    PrivacyConfig,
    PublishPolicy,
    RoundPolicy,
    ServerConfig,
    TlsConfig,
    _pick,
)
from server.tokens import TokenEntry, check_entries, inline_entries, parse_token_lines, read_token_file
from server.tree_config import TreeConfig
from server.upstream.settings import UpstreamConfig

__all__ = ["load_config", "parse_tokens", "read_secret"]


def _table(raw: object, section: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{section}] must be a table, got {raw!r}", field=section)
    return raw


def _values(cls: type[Any], raw: object, section: str, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``raw`` (a TOML table, flags merged in) as keyword arguments of the dataclass ``cls``.

    Refuses unknown keys and values of the wrong type; enumerations are left to ``cls``'s own
    ``__post_init__``, which parses them. ``section`` "" is the top level.
    """
    table = _table(raw, section)
    known = {f.name: str(f.type) for f in fields(cls) if f.name not in skip}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(
            f"{f'[{section}]' if section else 'top level'}: unknown settings {unknown}; known: {sorted(known)}",
            field=f"{section}.{unknown[0]}" if section else unknown[0],
        )
    return {
        key: _typed(f"{section}.{key}" if section else key, known[key], value) for key, value in table.items()
    }


# The annotations _typed checks, and how an error describes them.
_KINDS = {
    "Path": "a path",
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "tuple[str, ...]": "a list of strings",
}


def _typed(name: str, kind: str, value: object) -> object:
    """``value`` as its field's annotation ``kind`` (a string: the modules use ``from __future__``)."""
    kind = kind.removesuffix(" | None")  # TOML has no null: a value given is a value
    number = not isinstance(value, bool)  # bool is an int to Python, never a number in a config
    if kind == "Path" and isinstance(value, str | Path):
        return Path(value)
    if (kind == "str" and isinstance(value, str)) or (kind == "bool" and isinstance(value, bool)):
        return value
    if kind == "int" and isinstance(value, int) and number:
        return value
    if kind == "float" and isinstance(value, int | float) and number:
        return float(value)
    if (
        kind == "tuple[str, ...]"
        and isinstance(value, list | tuple)
        and all(isinstance(v, str) for v in value)
    ):
        return tuple(value)
    if kind in _KINDS:
        raise ConfigError(f"{name} = {value!r}: must be {_KINDS[kind]}", field=name)
    return value  # an enumeration: the section's __post_init__ parses it


_CASTS = {"none": Cast.NONE, "exact": Cast.NONE, "bf16": Cast.BF16, "f16": Cast.F16, "fp16": Cast.F16}
_LOSSY = {"none": Lossy.NONE, "topk": Lossy.TOPK, "int8": Lossy.INT8}
_METHODS = {m.name.lower(): m for m in Method}
_TRAIN_MODES = {m.name.lower(): m for m in TrainMode}
# [training] enumerations written as lower-case words: base_dtype = "bf16", optimizer = "adamw_8bit".
_TRAINING_ENUMS: dict[str, dict[str, Any]] = {
    "base_dtype": {m.name.lower(): m for m in BaseDtype},
    "quantization": {m.name.lower(): m for m in Quantization},
    "optimizer": {m.name.lower(): m for m in LocalOptimizer},
    "lr_schedule": {m.name.lower(): m for m in LrSchedule},
}


def _codec(raw: object, *, section: str = "training.upload_codec") -> Codec:
    values = dict(_table(raw, section))
    cast = _pick(_CASTS, values.pop("cast", "none"), f"{section}.cast")
    lossy = _pick(_LOSSY, values.pop("lossy", "none"), f"{section}.lossy")
    if lossy is not Lossy.NONE and section != "training.upload_codec":
        # Lossy forms need a residual kept by the sender (error feedback): uploads only.
        raise ConfigError(
            f"{section}.lossy = {lossy.name.lower()!r}: lossy codecs apply to uploads only",
            field=f"{section}.lossy",
        )
    if lossy is Lossy.TOPK:
        values.setdefault("topk_fraction", 0.01)
    else:
        values.pop("topk_fraction", None)  # meaningless without top-k; Codec wants 0 there
    codec = Codec(cast=cast, lossy=lossy, **_values(Codec, values, section))
    try:
        validate_codec(codec)
    except InvalidArgument as exc:
        raise ConfigError(
            f"[{section}] {exc.message}", field=f"{section}.{exc.field}" if exc.field else section
        ) from None
    return codec


def _training(raw: object) -> TrainingSpec:
    values = dict(_table(raw, "training"))
    parsed: dict[str, Any] = {
        "upload_codec": _codec(values.pop("upload_codec", {})),
        "lora": LoraSpec(**_values(LoraSpec, values.pop("lora", {}), "training.lora")),
    }
    if "method" in values:
        parsed["method"] = _pick(_METHODS, values.pop("method"), "training.method")
    if "mode" in values:
        parsed["mode"] = _pick(_TRAIN_MODES, values.pop("mode"), "training.mode")
    for name, choices in _TRAINING_ENUMS.items():
        if name in values:
            parsed[name] = _pick(choices, values.pop(name), f"training.{name}")
    try:
        return TrainingSpec(**parsed, **_values(TrainingSpec, values, "training"))
    except InvalidArgument as exc:
        raise ConfigError(exc.message, field=exc.field) from None  # it names training.<field>


def _read_file(path: Path, field: str, what: str, label: str = "") -> str:
    """The text of the file that setting ``field`` names (``label``: how the operator spelled it, "--tokens")."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem = "no such file" if isinstance(exc, FileNotFoundError) else f"cannot read it ({exc})"
        raise ConfigError(f"{label or field} {path}: {problem}; it should hold {what}", field=field) from None


def read_secret(path: Path, field: str = "admin_token_file", label: str = "") -> str:
    """A token from a file (first line, stripped), so tokens stay out of config files and process lists."""
    lines = _read_file(path, field, "the token on its first line", label).strip().splitlines()
    if not lines or not lines[0].strip():
        raise ConfigError(f"{label or field} {path} is empty; write the token on its first line", field=field)
    return lines[0].strip()


def parse_tokens(text: str, source: str = "site tokens") -> dict[str, str]:
    """``site-id = token`` lines (server.tokens has the format), as written: site -> token or hash.

    Raises:
        ConfigError: naming ``source`` and the line: malformed, empty token, a '#' inside a line,
            a site named twice or a token shared by two sites.
    """
    entries = parse_token_lines(text, source)
    check_entries(entries)
    return {e.site: e.text for e in entries}


# Built from their own tables (or, for the tokens, from several sources), not from top-level keys.
_STRUCTURED = (
    "round",
    "optimizer",
    "cybgd",
    "influence",
    "aggregation",
    "privacy",
    "tree",
    "upstream",
    "publish",
    "training",
    "broadcast_codec",
    "tls",
    "site_tokens",
    "site_tokens_files",
    "admin_token",
)


_UPSTREAM_FILES = ("token_file", "ca", "cert", "key")


def _upstream(raw: object, settings: Mapping[str, Any]) -> UpstreamConfig:
    """``[upstream]`` (flags merged in), its token read from ``token_file``; an intermediate's
    ``[training]`` is refused: the parent's spec is the one its sites train with."""
    values = _values(UpstreamConfig, raw, "upstream")
    token_file = values.get("token_file")
    if token_file is not None:
        values["token"] = read_secret(token_file, "upstream.token_file")
    if values.get("address") and "training" in settings:
        raise ConfigError(
            f"[training] in an intermediate (upstream.address = {values['address']!r}): the parent "
            "decides the training spec and its sites train with the parent's; remove [training]",
            field="training",
        )
    return UpstreamConfig(**values)


def load_config(path: Path | None, overrides: Mapping[str, Any]) -> ServerConfig:
    """The config from a TOML file (if any) with flag ``overrides`` on top (None = not given).

    Relative paths in the file are relative to the file. Flags (dotted names reach sections:
    ``round.min_sites``) replace the file's values before anything is built, so every check,
    those spanning two settings too, sees the final values. Site tokens add up: the file's
    ``[sites]``, its ``site_tokens_file``, then the flag's; the admin token is the flag's file,
    else the file's, else ``$GDFED_ADMIN_TOKEN``.

    Raises:
        ConfigError: On an unknown setting, a value of the wrong type, an unknown choice or a
            value out of range, naming the setting and what it may be; on a file named that is bad.
    """
    try:
        raw = tomllib.loads(_read_file(path, "config", "settings in TOML", "--config")) if path else {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid TOML: {exc}", field="config") from None
    base = Path(path).parent if path is not None else Path.cwd()

    def rel(value: str | Path) -> Path:
        p = Path(value)
        return p if p.is_absolute() else base / p

    for key in ("state_dir", "init_state", "site_tokens_file", "admin_token_file"):
        if key in raw:
            raw[key] = rel(raw[key])
    if "tls" in raw:
        raw["tls"] = {k: rel(v) if isinstance(v, str) else v for k, v in _table(raw["tls"], "tls").items()}
    if "upstream" in raw:  # its files, as tls's: relative to the config file
        raw["upstream"] = {
            k: rel(v) if k in _UPSTREAM_FILES and isinstance(v, str) else v
            for k, v in _table(raw["upstream"], "upstream").items()
        }
    flags: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        section, dot, name = key.partition(".")
        if dot:
            raw[section] = {**_table(raw.get(section, {}), section), name: value}
        else:
            flags[key] = value

    tokens = dict(_table(raw.pop("sites", {}), "sites"))
    admin = str(raw.pop("admin_token", ""))
    token_files: list[Path] = []
    file_entries: list[TokenEntry] = []
    for source in (raw, flags):  # the file's, then the flags'
        for key, flag in (("site_tokens_file", "--tokens"), ("admin_token_file", "--admin-token-file")):
            if key in source:
                file, label = Path(source.pop(key)), (f"{key} (in {path})" if source is raw else flag)
                if key == "admin_token_file":
                    admin = read_secret(file, key, label)
                else:
                    token_files.append(file)
                    file_entries += read_token_file(file, f"{label} {file}")
    admin = str(flags.pop("admin_token", admin)) or os.environ.get("GDFED_ADMIN_TOKEN", "")
    # A file's line overrides [sites]; across files a site or token named twice is an error.
    from_files = {e.site for e in file_entries}
    check_entries(
        [*(e for e in inline_entries(tokens, "[sites]") if e.site not in from_files), *file_entries], admin
    )
    tokens |= {e.site: e.text for e in file_entries}
    raw |= flags
    tls = TlsConfig(**_values(TlsConfig, raw.pop("tls", {}), "tls"))
    for name, pem in (("cert", tls.cert), ("key", tls.key), ("client_ca", tls.client_ca)):
        if pem is not None and not pem.is_file():  # read only once the run is loaded: check them now
            raise ConfigError(f"tls.{name} {pem}: no such file", field=f"tls.{name}")
    return ServerConfig(
        round=RoundPolicy(**_values(RoundPolicy, raw.pop("round", {}), "round")),
        optimizer=OptimizerConfig(**_values(OptimizerConfig, raw.pop("optimizer", {}), "optimizer")),
        cybgd=CyBgdConfig(**_values(CyBgdConfig, raw.pop("cybgd", {}), "cybgd")),
        influence=InfluenceConfig(**_values(InfluenceConfig, raw.pop("influence", {}), "influence")),
        aggregation=AggregationConfig(
            **_values(AggregationConfig, raw.pop("aggregation", {}), "aggregation")
        ),
        privacy=PrivacyConfig(**_values(PrivacyConfig, raw.pop("privacy", {}), "privacy")),
        tree=TreeConfig(**_values(TreeConfig, raw.pop("tree", {}), "tree")),
        upstream=_upstream(raw.pop("upstream", {}), raw),
        publish=PublishPolicy(**_values(PublishPolicy, raw.pop("publish", {}), "publish")),
        tls=tls,
        training=_training(raw.pop("training", {})),
        broadcast_codec=_codec(raw.pop("broadcast_codec", {}), section="broadcast_codec"),
        site_tokens=tokens,
        site_tokens_files=tuple(token_files),
        admin_token=admin,
        **_values(ServerConfig, raw, "", skip=_STRUCTURED),
    )
