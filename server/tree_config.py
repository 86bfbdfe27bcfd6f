"""The root's side of a tree of aggregators: ``[tree] intermediates``, and what a tree refuses.

A root names the intermediate aggregators that may upload partial sums
(``DELTA_KIND_PARTIAL_SUM``: Σ n_i·Δ_i of their sites, with Σ n_i); each is an
ordinary site id with an ordinary site token. A tree computes the same mean as
a flat federation only where the round's result is a sample-weighted sum of
the sites' deltas, so ``check_tree`` refuses, naming the setting and why:

- ``training.method`` flexlora: its close is an SVD of each site's own adapters;
- ``training.method`` fedcybgd: blocks are assigned to sites one by one;
- ``aggregation.rule`` trimmed_mean / median: they need every site's own upload;
- ``privacy.noise_multiplier`` > 0: the root's clip and noise are calibrated per site.

(docs/operator.md, "A tree of aggregators: the root".)
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import InvalidArgument
from common.spec import Method
from server.config_error import ConfigError
from server.records import check_id

__all__ = ["TreeConfig", "check_tree"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TreeConfig:
    """``[tree]``: the intermediates whose PARTIAL_SUM uploads the root takes (empty: no tree)."""

    intermediates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "intermediates", tuple(self.intermediates))
        seen: set[str] = set()
        for index, site in enumerate(self.intermediates):
            field = f"tree.intermediates[{index}]"
            try:
                check_id(site, field)
            except (InvalidArgument, TypeError):
                raise ConfigError(
                    f"{field} = {site!r}: an intermediate is a site id, 1..64 characters of [A-Za-z0-9._-]",
                    field=field,
                    limit=64,
                ) from None
            if site in seen:
                raise ConfigError(f"{field} = {site!r} is listed twice", field=field)
            seen.add(site)

    @property
    def enabled(self) -> bool:
        """Whether this aggregator is the root of a tree (it names intermediates)."""
        return bool(self.intermediates)


def check_tree(tree: TreeConfig, *, method: Method, rule: str, privacy: bool) -> None:
    """ConfigError if a root with ``tree.intermediates`` runs what a tree cannot compute.

    ``rule`` is ``aggregation.rule``'s value ("mean" is the only one a tree keeps), ``privacy``
    whether ``[privacy]`` adds noise.
    """
    if not tree.enabled:
        return
    named = f"tree.intermediates ({', '.join(tree.intermediates)})"
    if method is Method.FLEXLORA:
        raise ConfigError(
            f"{named} cannot be used with training.method flexlora: its close is an SVD of each "
            "site's own adapters, which a partial sum no longer holds",
            field="training.method",
        )
    if method is Method.FEDCYBGD:
        raise ConfigError(
            f"{named} cannot be used with training.method fedcybgd: its blocks are assigned to "
            "sites one by one, and an intermediate is not a site that trains",
            field="training.method",
        )
    if rule != "mean":
        raise ConfigError(
            f'{named} cannot be used with aggregation.rule = "{rule}": a robust rule compares every '
            "site's own upload, and a partial sum is many sites' sum; use rule = \"mean\"",
            field="aggregation.rule",
        )
    if privacy:
        raise ConfigError(
            f"{named} cannot be used with privacy.noise_multiplier > 0: the root clips and calibrates "
            "its noise per site, and a partial sum is many sites' sum",
            field="privacy.noise_multiplier",
        )
