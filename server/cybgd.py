"""FedCyBGD block logic: which decoder layer each site trains, in what order, and how block uploads combine.

FedCyBGD (Wang, Wang & Tang, arXiv 2406.11187; authors' code ``L3030/FedCyBGD`` @ 721732ac,
``causal_llms/src/llmtuner/tuner/sft/{workflow.py, utils.py, block_prefix.py}``). One *block* is one
transformer decoder layer, named by its exact parameter-name prefix with the trailing dot
(``"model.layers.3."``). Per round e, in the cyclic modes, sites c = 0..N−1 train **one after another**:
each downloads the latest version of every block updated so far (optionally only a random subset of them,
``download_subset``), trains only its assigned block, and uploads that block, which replaces the server's
copy (latest writer wins). In ``agg`` mode the blocks are visited in order and the sites of one block train
in parallel from the same state, then their uploads are averaged uniformly.

Modes (L blocks, N ≥ L sites, R rounds), from ``run_fl_sft``; N < L is below:

==============  ==========================================================================
``ascending``   site c trains block c mod L, every round
``descending``  site c trains block (L−1) − (c mod L), every round
``random``      site c trains a fresh random block each round, no repeats while blocks remain
``agg``         block b is trained by sites {b, L+b, 2L+b, ...} in parallel, then averaged
==============  ==========================================================================

**Fewer sites than blocks (N < L), cyclic modes.** The authors' table leaves blocks N..L−1 untrained
for ever in ``ascending`` (pitfall 2). Here the cycle then advances by blocks, not by sites: a cycle
is L turns, turn k of cycle e trains block k (``ascending``), L−1−k (``descending``) or element k of
a fresh seeded permutation of the blocks (``random``), and is taken by site (e·L + k) mod N — each
site takes the next untrained block on its turn, so every block is trained once per cycle and the
sites take turns evenly. With N ≥ L the authors' assignment stands unchanged. ``agg`` keeps the
authors' groups (blocks N..L−1 have no site there; ``untrained_blocks`` says which). Pure logic: no
gRPC, no I/O.
"""

from __future__ import annotations

import math
import numbers
import random
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from fractions import Fraction
from typing import NoReturn

import torch

__all__ = [
    "CYCLIC_MODES",
    "DEFAULT_PREFIX_PATTERN",
    "MODES",
    "CyBgdMode",
    "agg_groups",
    "aggregate_block",
    "assign",
    "block_of",
    "download_subset",
    "find_blocks",
    "schedule",
    "untrained_blocks",
]


class CyBgdMode(StrEnum):
    """How sites map to blocks (the table above); ``[cybgd] mode`` in the configuration."""

    ASCENDING = "ascending"
    DESCENDING = "descending"
    RANDOM = "random"
    AGG = "agg"

    @classmethod
    def _missing_(cls, value: object) -> NoReturn:
        # Enum's own message names the class ("is not a valid CyBgdMode"), not the setting.
        raise ValueError(f"mode must be one of {', '.join(cls)}, got {value!r}")


MODES = tuple(CyBgdMode)
# Sequential sites, latest writer wins.
CYCLIC_MODES = (CyBgdMode.ASCENDING, CyBgdMode.DESCENDING, CyBgdMode.RANDOM)
DEFAULT_PREFIX_PATTERN = r"^(.*\.layers\.\d+\.)"


def _natural_key(text: str) -> tuple[str | int, ...]:
    """Sort key comparing digit runs as numbers: "layers.2." < "layers.10."."""
    parts = re.split(r"(\d+)", text)  # even positions text, odd positions digits
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def find_blocks(names: Sequence[str], prefix_pattern: str = DEFAULT_PREFIX_PATTERN) -> list[str]:
    """The distinct block prefixes among parameter names, ordered by layer index (numerically).

    A name belongs to a block when ``re.match(prefix_pattern, name)`` succeeds; group 1 is the block's
    prefix and must end with ``"."`` so that matching stays exact (pitfall (3)). The default pattern covers
    Llama/Mistral/Qwen ``model.layers.N.``, ChatGLM ``transformer.encoder.layers.N.`` and PEFT-wrapped names
    (``base_model.model.model.layers.N.``); pass ``r"^(.*\\.h\\.\\d+\\.)"`` for GPT-2/BLOOM ``transformer.h.N.``.
    Ordering compares digit runs as integers, then text, so ``layers.2.`` precedes ``layers.10.``.

    Names matching no block — embeddings, the final norm, lm_head — are in no block: FedCyBGD never
    trains them in the LLM pipeline [INFERRED from code: ``block_prefix.py`` lists only decoder layers].

    Raises:
        ValueError: the pattern has no capture group, or a captured prefix does not end with ".".

    Example:
        >>> find_blocks(["model.layers.10.mlp.w", "model.layers.2.mlp.w", "model.norm.weight"])
        ['model.layers.2.', 'model.layers.10.']
    """
    regex = re.compile(prefix_pattern)
    if regex.groups < 1:
        raise ValueError(f"prefix_pattern {prefix_pattern!r} needs a capture group for the block prefix")
    found: set[str] = set()
    for name in names:
        match = regex.match(name)
        if match is None:
            continue
        prefix = match.group(1)
        if not prefix or not prefix.endswith("."):
            raise ValueError(
                f"block prefix {prefix!r} (from {name!r}) must end with '.', or 'layers.1' would also "
                "match 'layers.10'; end the capture group with \\."
            )
        found.add(prefix)
    return sorted(found, key=_natural_key)


def block_of(name: str, blocks: Sequence[str]) -> str | None:
    """The block whose prefix ``name`` starts with (the longest, if nested), or None (embeddings, norm, head).

    Prefixes keep their trailing dot, so ``"model.layers.1."`` never claims ``"model.layers.10.q.weight"``.

    Raises:
        ValueError: a block prefix does not end with ".".
    """
    best: str | None = None
    for block in blocks:
        if not block.endswith("."):
            raise ValueError(f"block prefix {block!r} must end with '.' for exact matching")
        if name.startswith(block) and (best is None or len(block) > len(best)):
            best = block
    return best


def _check_mode(mode: str) -> None:
    CyBgdMode(mode)  # ValueError naming the modes


def _check_sizes(n_sites: int, n_blocks: int) -> None:
    if n_sites < 1 or n_blocks < 1:
        raise ValueError(f"need at least one site and one block, got n_sites={n_sites}, n_blocks={n_blocks}")


def _random_block(site_index: int, round_index: int, n_blocks: int, seed: int) -> int:
    """Round e's block for one site in ``random`` mode: element e mod L of the site's (e // L)-th permutation."""
    rng = random.Random(f"fedcybgd-random/{seed}/{site_index}")  # str seeds hash with SHA-512: stable
    order = list(range(n_blocks))
    for _ in range(round_index // n_blocks + 1):  # one fresh uniform permutation per L rounds
        rng.shuffle(order)
    return order[round_index % n_blocks]


def _block_cycle(
    mode: str, n_sites: int, n_blocks: int, round_index: int, seed: int
) -> list[tuple[int, int]]:
    """N < L in a cyclic mode: cycle ``round_index``'s L (site, block) turns, every block once."""
    if mode == "descending":
        blocks = list(range(n_blocks - 1, -1, -1))
    elif mode == "random":
        blocks = list(range(n_blocks))
        random.Random(f"fedcybgd-random-cycle/{seed}/{round_index}").shuffle(blocks)
    else:
        blocks = list(range(n_blocks))
    first = round_index * n_blocks  # the sites go on taking turns across cycles
    return [((first + k) % n_sites, b) for k, b in enumerate(blocks)]


def assign(
    mode: str, *, site_index: int, round_index: int, n_blocks: int, n_sites: int, seed: int
) -> list[int]:
    """The block index(es) site ``site_index`` trains in round ``round_index``, in turn order.

    With N ≥ L (and always in ``agg``), exactly one block:

    * ``ascending``: c mod L. ``descending``: (L−1) − (c mod L). Same block every round.
    * ``random``: site c's rounds 0..L−1 visit a random permutation of all L blocks, so no block repeats
      while blocks remain; rounds L..2L−1 visit a fresh permutation, and so on [INFERRED]. The authors draw
      ``random.sample(blocks, R)`` per client, which raises once R > L; a new permutation per L rounds is
      our extension (the last block of one permutation may equal the first of the next). Deterministic in
      (seed, site, round), independent of N and of other sites [INFERRED: the authors use the global RNG].
    * ``agg``: c mod L, the block whose group c belongs to (``agg_groups``).

    With N < L in a cyclic mode, the blocks of the turns k with (e·L + k) mod N = c (module
    docstring): one or more, so that the cycle trains every block.

    Raises:
        ValueError: unknown mode, site_index outside 0..N−1, negative round, N or L < 1.

    Example:
        >>> assign("descending", site_index=1, round_index=0, n_blocks=4, n_sites=6, seed=0)
        [2]
    """
    _check_mode(mode)
    _check_sizes(n_sites, n_blocks)
    if not 0 <= site_index < n_sites:
        raise ValueError(f"site_index must be in 0..{n_sites - 1}, got {site_index}")
    if round_index < 0:
        raise ValueError(f"round_index must be ≥ 0, got {round_index}")
    if n_sites < n_blocks and mode in CYCLIC_MODES:
        return [b for c, b in _block_cycle(mode, n_sites, n_blocks, round_index, seed) if c == site_index]
    if mode == "descending":
        return [(n_blocks - 1) - (site_index % n_blocks)]
    if mode == "random":
        return [_random_block(site_index, round_index, n_blocks, seed)]
    return [site_index % n_blocks]  # ascending, agg


def agg_groups(n_sites: int, n_blocks: int) -> dict[int, list[int]]:
    """``agg`` mode: block b → the sites {b, L+b, 2L+b, ...} below N that train it in parallel.

    Every block 0..L−1 is a key; blocks with no site (b ≥ N) map to []. The authors hard-code exactly
    ``[b, L+b]`` (which fails for N < 2L and leaves sites ≥ 2L idle); every c ≡ b (mod L) is our
    generalisation [INFERRED], identical for their N = 2L.

    Example:
        >>> agg_groups(5, 2)
        {0: [0, 2, 4], 1: [1, 3]}
    """
    _check_sizes(n_sites, n_blocks)
    return {b: list(range(b, n_sites, n_blocks)) for b in range(n_blocks)}


def schedule(
    mode: str, n_sites: int, n_blocks: int, rounds: int, seed: int = 0
) -> list[list[tuple[int, int]]]:
    """Per round, the ordered (site, block) pairs.

    Cyclic modes list sites c = 0..N−1 in order (N < L: the L turns of the block cycle, module
    docstring): they train one after another, each starting from the blocks its predecessors uploaded (pitfall (1): wall-clock ∝ N; do not parallelise and average).
    ``agg`` lists blocks 0..L−1 in order, each followed by its group's sites (which train in parallel
    from the same state), e.g. L=2, N=3: [(0, 0), (2, 0), (1, 1)].

    Raises:
        ValueError: unknown mode, N or L < 1, negative rounds.
    """
    _check_mode(mode)
    _check_sizes(n_sites, n_blocks)
    if rounds < 0:
        raise ValueError(f"rounds must be ≥ 0, got {rounds}")
    if mode == "agg":
        groups = agg_groups(n_sites, n_blocks)
        one_round = [(c, b) for b in range(n_blocks) for c in groups[b]]
        return [list(one_round) for _ in range(rounds)]
    if n_sites < n_blocks:
        return [_block_cycle(mode, n_sites, n_blocks, e, seed) for e in range(rounds)]
    return [
        [
            (c, b)
            for c in range(n_sites)
            for b in assign(mode, site_index=c, round_index=e, n_blocks=n_blocks, n_sites=n_sites, seed=seed)
        ]
        for e in range(rounds)
    ]


def untrained_blocks(mode: str, n_sites: int, n_blocks: int, rounds: int, *, seed: int = 0) -> set[int]:
    """Blocks that no site trains in ``rounds`` rounds: they stay at their pretrained values.

    The cyclic modes train every block in every round (cycle) whatever N (the block cycle when
    N < L); ``random`` with N ≥ L depends on ``seed`` and is empty once rounds ≥ L. ``agg`` with N < L
    never trains N..L−1 (the authors' groups). Zero rounds leave every block untrained.

    Example:
        >>> sorted(untrained_blocks("agg", n_sites=3, n_blocks=5, rounds=10))
        [3, 4]
    """
    trained = {b for pairs in schedule(mode, n_sites, n_blocks, rounds, seed) for _, b in pairs}
    return set(range(n_blocks)) - trained


def download_subset(updated_blocks: Sequence[int], fraction: float, rng: random.Random) -> list[int]:
    """The download compression: a random ceil(p·|updated|) subset of the updated blocks, sorted.

    Draw once per download (the authors redraw in ``update_global`` for every client). Blocks left out
    stay at their pretrained values on the site, so it trains against a mixed model — intended. The
    count is taken on p's decimal value (``repr``), so p = 0.14 of 50 blocks is 7, not ceil(0.14 * 50) =
    ceil(7.000000000000001) = 8 as float arithmetic (and the authors' code) would give.

    Args:
        updated_blocks: indices of the blocks updated so far (distinct).
        fraction: p, with 0 < p ≤ 1. The authors' default ``--compress -1`` makes ``random.sample``
            raise, so there is no default here.
        rng: the source of randomness (seed it for reproducible runs).

    Raises:
        ValueError: p outside (0, 1] or not a number, or repeated block indices.

    Example:
        >>> download_subset([0, 1, 2, 3], 0.5, random.Random(0))
        [1, 3]
    """
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
        raise ValueError(
            f"download fraction p must satisfy 0 < p ≤ 1, got {fraction!r} "
            "(the authors' default -1 crashes random.sample; use 1 to send every updated block)"
        )
    pool = list(updated_blocks)
    if len(set(pool)) != len(pool):
        raise ValueError(f"updated_blocks has repeated indices: {pool}")
    count = math.ceil(Fraction(repr(float(fraction))) * len(pool))
    return sorted(rng.sample(pool, count))


def aggregate_block(uploads: Sequence[Mapping[str, torch.Tensor]], mode: str) -> dict[str, torch.Tensor]:
    """Combine one block's uploads from one round into the server's new copy of that block.

    * Cyclic modes: latest writer wins — the last upload, as given (pass uploads in arrival order,
      which is schedule order); no averaging, as the authors' ``block_results[b] = ...``. The tensors
      are returned as they are, not copied.
    * ``agg``: the plain uniform mean over uploads, *not* weighted by n (as the authors'
      ``aggregate_params``), accumulated in at least fp32 and returned in each tensor's own dtype
      (the authors accumulate in the fp16 parameter dtype; we do not copy that).

    Raises:
        ValueError: no uploads, unknown mode, or (agg) uploads whose names or shapes differ.
    """
    _check_mode(mode)
    if not uploads:
        raise ValueError("aggregate_block needs at least one upload")
    if mode in CYCLIC_MODES:
        return dict(uploads[-1])
    first = uploads[0]
    for i, up in enumerate(uploads):
        if set(up) != set(first):
            raise ValueError(
                f"upload {i} has tensors {sorted(set(up) ^ set(first))} that upload 0 lacks or has; "
                "all uploads of one block must carry the same names"
            )
        for name, t in up.items():
            if t.shape != first[name].shape:
                raise ValueError(
                    f"upload {i}: {name} has shape {tuple(t.shape)}, upload 0 has {tuple(first[name].shape)}"
                )
    out: dict[str, torch.Tensor] = {}
    for name, ref in first.items():
        acc_dtype = torch.promote_types(ref.dtype, torch.float32)
        acc = torch.zeros(ref.shape, dtype=acc_dtype, device=ref.device)
        for up in uploads:
            acc += up[name].to(device=ref.device, dtype=acc_dtype)
        out[name] = (acc / len(uploads)).to(ref.dtype)
    return out
