"""``[upstream]``: where an intermediate aggregator's parent is, and what it refuses to run.

An aggregator with ``[upstream] address`` set is an intermediate of a tree
(docs/operator.md, "A tree of aggregators: intermediates"): the parent, not
this config, decides the run, the training spec, the rounds and the server
optimizer. ``check_upstream`` refuses, naming the setting, what would make the
tree compute something else than the flat federation (the same rules the
root's ``[tree]`` applies, server.tree_config) and what only the parent may set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import InvalidArgument
from common.spec import Method
from server.config_error import ConfigError
from server.records import check_id

__all__ = ["DEFAULT_MARGIN_FRACTION", "TREE_METHODS", "UpstreamConfig", "check_upstream", "method_refusal"]

# Without forward_margin_s: this fraction of the time the parent's round has left when it opens
# here is kept for forwarding the partial sum.
DEFAULT_MARGIN_FRACTION = 0.1
# What a tree computes exactly as a flat federation: the sample-weighted mean of the sites' deltas.
TREE_METHODS = (Method.GRADUALDIFF,)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    """``[upstream]``: this aggregator's parent (empty ``address``: it is a root or stands alone)."""

    address: str = ""  # host:port of the parent aggregator
    site_id: str = ""  # this aggregator's site id at the parent
    token_file: Path | None = None  # its site token there (server.config_file reads it into token)
    token: str = ""
    ca: Path | None = None  # TLS to the parent, trusting this CA
    cert: Path | None = None  # with key: mutual TLS
    key: Path | None = None
    # Seconds before the parent's deadline at which this aggregator closes its own round and
    # forwards; 0 = 10 % of the time the parent's round has left when it opens here.
    forward_margin_s: float = 0.0
    # How long one call to the parent is retried before the loop logs it and starts over (the
    # first start, which needs the parent's state, gives up after it).
    max_wait_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.address:
            return
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(
                f"upstream.address = {self.address!r}: must be host:port of the parent aggregator",
                field="upstream.address",
            )
        try:
            check_id(self.site_id, "upstream.site_id")
        except InvalidArgument as exc:
            raise ConfigError(
                f"{exc.message} (this aggregator's site id at its parent)", field="upstream.site_id"
            ) from None
        if not self.token:
            raise ConfigError(
                "upstream.token_file is not set: this aggregator needs its site token at the parent",
                field="upstream.token_file",
            )
        if (self.cert is None) != (self.key is None):
            missing = "upstream.key" if self.key is None else "upstream.cert"
            raise ConfigError(
                f"mutual TLS to the parent needs both upstream.cert and upstream.key; {missing} is not set",
                field=missing,
            )
        if self.cert is not None and self.ca is None:
            raise ConfigError("upstream.cert (mutual TLS) needs upstream.ca", field="upstream.ca")
        if not self.forward_margin_s >= 0:
            raise ConfigError(
                f"upstream.forward_margin_s = {self.forward_margin_s!r}: must be >= 0",
                field="upstream.forward_margin_s",
                limit=0,
            )
        if not self.max_wait_s > 0:
            raise ConfigError(
                f"upstream.max_wait_s = {self.max_wait_s!r}: must be > 0",
                field="upstream.max_wait_s",
                limit=0,
            )

    @property
    def enabled(self) -> bool:
        """Whether this aggregator is an intermediate (it has a parent)."""
        return bool(self.address)


def method_refusal(method: Method) -> str:
    """Why a tree cannot run ``method`` ("" when it can)."""
    if method is Method.FLEXLORA:
        return (
            "training.method flexlora cannot run in a tree of aggregators: its close is an SVD of "
            "each site's own adapters, which a partial sum no longer holds"
        )
    if method is Method.FEDCYBGD:
        return (
            "training.method fedcybgd cannot run in a tree of aggregators: its blocks are assigned "
            "to sites one by one, and an intermediate is not a site that trains"
        )
    return ""


def check_upstream(
    upstream: UpstreamConfig,
    *,
    method: Method,
    server_optimizer: tuple[str, float],
    rule: str,
    privacy: bool,
    rounds: int,
    init_state: Path | None,
) -> None:
    """ConfigError if an intermediate is configured with what only its parent decides, or with
    what a tree cannot compute. ``method`` is the parent's (the bootstrap puts its spec in)."""
    if not upstream.enabled:
        return
    refusal = method_refusal(method)
    if refusal:
        raise ConfigError(
            f"the parent at {upstream.address} trains with {method.name.lower()}: {refusal}",
            field="training.method",
        )
    name, lr = server_optimizer
    if name != "fedavg" or lr != 1.0:
        raise ConfigError(
            f"[optimizer] {name} with lr {lr} in an intermediate: the server optimizer runs at the root "
            "only, on the mean of the whole tree; remove [optimizer] here",
            field="optimizer",
        )
    if rule != "mean":
        raise ConfigError(
            f'aggregation.rule = "{rule}" in an intermediate: its partial sum must be the sample-weighted '
            'sum of its sites\' deltas; use rule = "mean"',
            field="aggregation.rule",
        )
    if privacy:
        raise ConfigError(
            "privacy.noise_multiplier > 0 in an intermediate: client-level DP is the root's, and "
            "cannot run in a tree",
            field="privacy.noise_multiplier",
        )
    if rounds:
        raise ConfigError(
            f"rounds = {rounds} in an intermediate: the parent decides when the run ends; remove it",
            field="rounds",
        )
    if init_state is not None:
        raise ConfigError(
            "init_state in an intermediate: its initial state is the parent's, fetched at the first start",
            field="init_state",
        )
