"""FedCyBGD block logic: block discovery, per-mode assignment tables, download subsets, block aggregation."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.cybgd import (
    MODES,
    agg_groups,
    aggregate_block,
    assign,
    block_of,
    download_subset,
    find_blocks,
    schedule,
    untrained_blocks,
)


def _llama_names(n_layers: int, prefix: str = "") -> list[str]:
    names = [f"{prefix}model.embed_tokens.weight", f"{prefix}model.norm.weight", f"{prefix}lm_head.weight"]
    for i in range(n_layers):
        for leaf in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            names.append(f"{prefix}model.layers.{i}.{leaf}")
    return names


# ------------------------------------------------------------------------------------------ blocks


def test_blocks_are_ordered_by_layer_index_numerically() -> None:
    names = _llama_names(12)
    random.Random(0).shuffle(names)
    assert find_blocks(names) == [f"model.layers.{i}." for i in range(12)]


def test_peft_prefixed_names_are_blocks_too() -> None:
    names = [f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.default.weight" for i in (10, 3, 2)]
    assert find_blocks(names) == [f"base_model.model.model.layers.{i}." for i in (2, 3, 10)]
    assert block_of(names[0], find_blocks(names)) == "base_model.model.model.layers.10."


def test_other_architectures_with_a_custom_pattern() -> None:
    names = [
        "transformer.wte.weight",
        "transformer.h.11.attn.c_attn.weight",
        "transformer.h.2.mlp.c_fc.weight",
    ]
    assert find_blocks(names, r"^(.*\.h\.\d+\.)") == ["transformer.h.2.", "transformer.h.11."]
    chatglm = ["transformer.encoder.layers.27.mlp.w", "transformer.encoder.layers.0.mlp.w"]
    assert find_blocks(chatglm) == ["transformer.encoder.layers.0.", "transformer.encoder.layers.27."]


def test_embeddings_norm_and_head_belong_to_no_block() -> None:
    blocks = find_blocks(_llama_names(3))
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert block_of(name, blocks) is None


def test_prefix_matching_is_exact_with_the_trailing_dot() -> None:
    blocks = find_blocks(_llama_names(12))
    assert block_of("model.layers.10.mlp.down_proj.weight", blocks) == "model.layers.10."
    assert block_of("model.layers.1.mlp.down_proj.weight", blocks) == "model.layers.1."
    # With only layer 1 known, layer 10's and 11's parameters are still not layer 1's.
    assert block_of("model.layers.10.mlp.down_proj.weight", ["model.layers.1."]) is None
    assert block_of("model.layers.11.self_attn.q_proj.weight", ["model.layers.1."]) is None


def test_block_prefixes_without_a_trailing_dot_are_refused() -> None:
    with pytest.raises(ValueError, match=r"must end with '\.'"):
        block_of("model.layers.10.w", ["model.layers.1"])
    with pytest.raises(ValueError, match=r"must end with '\.'"):
        find_blocks(["model.layers.1.w"], r"^(.*\.layers\.\d+)")
    with pytest.raises(ValueError, match="capture group"):
        find_blocks(["model.layers.1.w"], r"^.*\.layers\.\d+\.")


def test_names_outside_any_block_give_no_blocks() -> None:
    assert find_blocks(["embed.weight", "lm_head.weight"]) == []


# -------------------------------------------------------------------------------------- assignment


def _blocks(mode: str, n_sites: int, n_blocks: int, round_index: int, seed: int = 0) -> list[int]:
    """Each site's block in one round, via assign()."""
    out = []
    for c in range(n_sites):
        got = assign(
            mode, site_index=c, round_index=round_index, n_blocks=n_blocks, n_sites=n_sites, seed=seed
        )
        assert len(got) == 1
        out.extend(got)
    return out


@pytest.mark.parametrize(
    ("mode", "n_sites", "n_blocks", "expected"),
    [
        ("ascending", 4, 4, [0, 1, 2, 3]),  # N = L
        ("ascending", 7, 3, [0, 1, 2, 0, 1, 2, 0]),  # N > L
        ("descending", 4, 4, [3, 2, 1, 0]),
        ("descending", 7, 3, [2, 1, 0, 2, 1, 0, 2]),
        ("agg", 3, 5, [0, 1, 2]),
        ("agg", 4, 4, [0, 1, 2, 3]),
        ("agg", 7, 3, [0, 1, 2, 0, 1, 2, 0]),
    ],
)
def test_fixed_modes_give_the_same_table_every_round(
    mode: str, n_sites: int, n_blocks: int, expected: list[int]
) -> None:
    for e in range(4):
        assert _blocks(mode, n_sites, n_blocks, e) == expected


@pytest.mark.parametrize("mode", ["ascending", "descending", "random"])
@pytest.mark.parametrize(("n_sites", "n_blocks"), [(1, 4), (3, 4), (3, 5), (2, 7)])
def test_fewer_sites_than_blocks_still_train_every_block_each_cycle(
    mode: str, n_sites: int, n_blocks: int
) -> None:
    for e, pairs in enumerate(schedule(mode, n_sites, n_blocks, 4, seed=2)):
        assert sorted(b for _, b in pairs) == list(range(n_blocks)), (e, pairs)
        # The sites take the turns in order, on from where the last cycle stopped.
        assert [c for c, _ in pairs] == [(e * n_blocks + k) % n_sites for k in range(n_blocks)]
        for c in range(n_sites):  # assign() agrees with the schedule, in turn order
            got = assign(mode, site_index=c, round_index=e, n_blocks=n_blocks, n_sites=n_sites, seed=2)
            assert got == [b for s, b in pairs if s == c]


def test_block_cycle_tables_for_fewer_sites_than_blocks() -> None:
    assert schedule("ascending", 3, 5, 2, 0) == [
        [(0, 0), (1, 1), (2, 2), (0, 3), (1, 4)],
        [(2, 0), (0, 1), (1, 2), (2, 3), (0, 4)],
    ]
    assert schedule("descending", 3, 5, 1, 0) == [[(0, 4), (1, 3), (2, 2), (0, 1), (1, 0)]]
    # N = L and N > L keep the authors' table: site c trains block c mod L.
    assert schedule("ascending", 5, 4, 1, 0) == [[(0, 0), (1, 1), (2, 2), (3, 3), (4, 0)]]


@pytest.mark.parametrize(
    ("n_sites", "n_blocks", "expected"),
    [
        (2, 4, {0: [0], 1: [1], 2: [], 3: []}),
        (4, 4, {0: [0], 1: [1], 2: [2], 3: [3]}),
        (7, 3, {0: [0, 3, 6], 1: [1, 4], 2: [2, 5]}),
        (8, 4, {0: [0, 4], 1: [1, 5], 2: [2, 6], 3: [3, 7]}),  # the authors' N = 2L layout [b, L+b]
    ],
)
def test_agg_groups(n_sites: int, n_blocks: int, expected: dict[int, list[int]]) -> None:
    assert agg_groups(n_sites, n_blocks) == expected


def test_random_mode_is_pinned_for_a_given_seed() -> None:
    """Pins the RNG stream: a change here changes every random-mode run's block order."""
    assert schedule("random", 4, 3, 4, seed=0) == [  # N ≥ L: each site its own permutations
        [(0, 1), (1, 1), (2, 1), (3, 2)],
        [(0, 0), (1, 0), (2, 0), (3, 0)],
        [(0, 2), (1, 2), (2, 2), (3, 1)],
        [(0, 0), (1, 1), (2, 2), (3, 0)],
    ]
    # N < L: one permutation of the blocks per cycle, the sites in turn.
    assert schedule("random", 3, 4, 2, seed=0) == [
        [(0, 1), (1, 3), (2, 2), (0, 0)],
        [(1, 3), (2, 2), (0, 1), (1, 0)],
    ]


@settings(max_examples=40, deadline=None)
@given(
    n_blocks=st.integers(1, 6),
    extra_sites=st.integers(0, 4),
    cycles=st.integers(1, 3),
    seed=st.integers(0, 10**6),
)
def test_random_mode_never_repeats_while_blocks_remain(
    n_blocks: int, extra_sites: int, cycles: int, seed: int
) -> None:
    n_sites = n_blocks + extra_sites  # N ≥ L: the authors' per-site draws
    rounds = cycles * n_blocks + 1
    plan = schedule("random", n_sites, n_blocks, rounds, seed)
    for c in range(n_sites):
        visits = [dict(pairs)[c] for pairs in plan]
        for k in range(cycles):  # each window of L rounds is a permutation of all blocks
            assert sorted(visits[k * n_blocks : (k + 1) * n_blocks]) == list(range(n_blocks))
        assert 0 <= visits[-1] < n_blocks


def test_random_mode_is_deterministic_per_seed_and_site() -> None:
    one = schedule("random", 8, 5, 8, seed=3)
    assert one == schedule("random", 8, 5, 8, seed=3)
    assert one != schedule("random", 8, 5, 8, seed=4)
    # N ≥ L: a site's draws do not depend on how many other sites there are.
    assert [dict(p)[1] for p in schedule("random", 6, 5, 8, seed=3)] == [dict(p)[1] for p in one]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "fixed"},
        {"site_index": 3},
        {"site_index": -1},
        {"round_index": -1},
        {"n_blocks": 0},
        {"n_sites": 0, "site_index": 0},
    ],
)
def test_assign_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "mode": "ascending",
        "site_index": 0,
        "round_index": 0,
        "n_blocks": 4,
        "n_sites": 3,
        "seed": 0,
    } | kwargs
    with pytest.raises(ValueError):
        assign(**args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- schedule


def test_sequential_schedule_lists_sites_in_order() -> None:
    assert schedule("ascending", 3, 2, 2, 0) == [[(0, 0), (1, 1), (2, 0)], [(0, 0), (1, 1), (2, 0)]]
    assert schedule("descending", 3, 2, 1, 0) == [[(0, 1), (1, 0), (2, 1)]]
    assert schedule("random", 4, 3, 0, 0) == []


def test_agg_schedule_groups_sites_by_block() -> None:
    assert schedule("agg", 5, 2, 2, 0) == [[(0, 0), (2, 0), (4, 0), (1, 1), (3, 1)]] * 2
    assert schedule("agg", 2, 3, 1, 0) == [[(0, 0), (1, 1)]]


@pytest.mark.parametrize("mode", MODES)
def test_every_site_trains_exactly_once_per_round_when_sites_are_at_least_blocks(mode: str) -> None:
    for n_sites, n_blocks in [(4, 4), (7, 3)]:
        for pairs in schedule(mode, n_sites, n_blocks, 3, seed=1):
            assert sorted(c for c, _ in pairs) == list(range(n_sites))


def test_schedule_rejects_negative_rounds_and_unknown_modes() -> None:
    with pytest.raises(ValueError, match="rounds"):
        schedule("ascending", 2, 2, -1, 0)
    with pytest.raises(ValueError, match="mode"):
        schedule("full", 2, 2, 1, 0)


# ------------------------------------------------------------------------------------ untrained blocks


@pytest.mark.parametrize(
    ("mode", "n_sites", "n_blocks", "rounds", "expected"),
    [
        ("ascending", 3, 5, 1, set()),  # N < L: the block cycle trains every block in one cycle
        ("descending", 3, 5, 1, set()),
        ("random", 2, 5, 1, set()),
        ("agg", 3, 5, 10, {3, 4}),  # the authors' groups: blocks N..L-1 have no site
        ("ascending", 5, 5, 1, set()),
        ("descending", 7, 5, 1, set()),
        ("agg", 6, 5, 1, set()),
        ("random", 1, 5, 5, set()),  # one site, L rounds: a full permutation
        ("ascending", 3, 5, 0, {0, 1, 2, 3, 4}),
    ],
)
def test_untrained_blocks(mode: str, n_sites: int, n_blocks: int, rounds: int, expected: set[int]) -> None:
    assert untrained_blocks(mode, n_sites, n_blocks, rounds) == expected


def test_random_mode_untrained_blocks_depend_on_the_seed() -> None:
    # N ≥ L: each site draws its own block, so one round may leave some untrained.
    assert untrained_blocks("random", 6, 5, 1, seed=0) == {0, 4}
    assert untrained_blocks("random", 6, 5, 1, seed=3) == {0}
    assert untrained_blocks("random", 6, 5, 5, seed=0) == set()  # L rounds: every site a permutation


# ------------------------------------------------------------------------------------ download subset


@pytest.mark.parametrize("fraction", [0.1, 0.14, 0.25, 0.28, 0.3, 0.5, 0.56, 0.9, 1.0, 1])
@pytest.mark.parametrize("n_updated", [0, 1, 3, 10, 25, 50])
def test_download_subset_size_and_membership(fraction: float, n_updated: int) -> None:
    updated = list(range(100, 100 + 2 * n_updated, 2))
    got = download_subset(updated, fraction, random.Random(n_updated))
    assert len(got) == math.ceil(Fraction(str(fraction)) * n_updated)
    assert set(got) <= set(updated) and len(set(got)) == len(got)
    assert got == sorted(got)


def test_download_subset_counts_on_the_decimal_fraction() -> None:
    assert len(download_subset(list(range(10)), 0.3, random.Random(0))) == 3
    assert 0.14 * 50 > 7  # 7.000000000000001 in floating point
    assert len(download_subset(list(range(50)), 0.14, random.Random(0))) == 7
    assert len(download_subset(list(range(50)), 0.56, random.Random(0))) == 28


def test_download_subset_is_reproducible_and_full_at_one() -> None:
    assert download_subset(list(range(10)), 0.3, random.Random(42)) == [0, 1, 4]
    assert download_subset(list(range(10)), 0.3, random.Random(42)) == [0, 1, 4]
    assert download_subset([5, 2, 9], 1.0, random.Random(0)) == [2, 5, 9]


@pytest.mark.parametrize("fraction", [-1, -1.0, 0, 0.0, 1.5, float("nan"), float("inf"), True])
def test_download_subset_rejects_fractions_outside_0_1(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"0 < p ≤ 1.*-1"):
        download_subset([0, 1, 2], fraction, random.Random(0))


def test_download_subset_rejects_repeated_blocks() -> None:
    with pytest.raises(ValueError, match="repeated"):
        download_subset([1, 1, 2], 0.5, random.Random(0))


# ---------------------------------------------------------------------------------- block aggregation


def _upload(value: float, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {
        "model.layers.0.mlp.w": torch.full((2, 3), value, dtype=dtype),
        "model.layers.0.norm.w": torch.full((3,), -value, dtype=dtype),
    }


@pytest.mark.parametrize("mode", ["ascending", "descending", "random"])
def test_cyclic_modes_keep_the_latest_writer(mode: str) -> None:
    uploads = [_upload(1.0), _upload(2.0), _upload(7.0)]
    got = aggregate_block(uploads, mode)
    assert set(got) == set(uploads[-1])
    for name, t in got.items():
        assert t is uploads[-1][name]


def test_agg_mode_is_a_plain_uniform_mean() -> None:
    got = aggregate_block([_upload(1.0), _upload(2.0), _upload(6.0)], "agg")
    torch.testing.assert_close(got["model.layers.0.mlp.w"], torch.full((2, 3), 3.0))
    torch.testing.assert_close(got["model.layers.0.norm.w"], torch.full((3,), -3.0))


def test_agg_mode_accumulates_half_precision_in_fp32() -> None:
    """bf16 256 + 1 + 1 summed in bf16 is 256 (8-bit mantissa): mean 85.5; in fp32 it is 258/3 → bf16 86."""
    got = aggregate_block(
        [_upload(256.0, torch.bfloat16), _upload(1.0, torch.bfloat16), _upload(1.0, torch.bfloat16)], "agg"
    )
    w = got["model.layers.0.mlp.w"]
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, torch.full((2, 3), 86.0, dtype=torch.bfloat16))


def test_aggregate_block_validates() -> None:
    with pytest.raises(ValueError, match="at least one upload"):
        aggregate_block([], "agg")
    with pytest.raises(ValueError, match="mode"):
        aggregate_block([_upload(1.0)], "mean")
    missing = _upload(1.0)
    del missing["model.layers.0.norm.w"]
    with pytest.raises(ValueError, match=r"upload 1 has tensors \['model.layers.0.norm.w'\]"):
        aggregate_block([_upload(1.0), missing], "agg")
    wrong = _upload(1.0) | {"model.layers.0.norm.w": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"upload 1: model.layers.0.norm.w has shape \(4,\)"):
        aggregate_block([_upload(1.0), wrong], "agg")
