"""Client-level differential privacy, DP-FedAvg style (McMahan et al. 2018): noise, and the ε it spends.

With ``privacy.noise_multiplier`` z > 0 the configuration guarantees a fixed clip bound C
(``influence.clip_norm``, adaptive clipping off) and the mean rule. Then, per round::

    each accepted upload is clipped to C (server.influence) and weighs 1, whatever its sample count
    S  = Σ_i min(1, C/‖Δ_i‖)·Δ_i               L2 sensitivity C to adding or removing one site
    Δ̄  = (S + N(0, z²C²·I)) / K                K = the round's accepted uploads
       = S/K + N(0, (zC/K)²·I)                 what is implemented: noise of std zC/K on the mean

The count K is treated as public, as in DP-FedAvg with a fixed number of sites per round and in
TFF's DP aggregators: every participant learns it anyway. Uniform weights are what keeps the
sensitivity at C; sample-weighted uploads would let one site's claimed count scale its share.

**Noise.** Per round and tensor, a ``torch.Generator`` seeded from
HMAC-SHA256(secret, run id / round / tensor name); the secret is 32 random bytes in
``STATE_DIR/privacy.seed``, created once with mode 0600. A round rebuilt after a restart adds the
same noise, so it publishes the same state; no site can predict it. Whoever reads that file can
take the noise out of every published state: it is a secret like the admin token.

**Accounting.** Each round published with noise is one step of the sampled Gaussian mechanism
with noise multiplier z and sample rate q = K / N (N = ``privacy.population``, or the sites the run
has registered so far; at least K). Opacus's ``RDPAccountant`` composes the steps of every such
round published so far and converts to ε at ``privacy.delta``. Nothing of the accountant is
stored: each publication recomputes ε from the rounds' records (z, q), so a restart changes
nothing. q < 1 is the amplification by subsampling, valid only if the round's sites are a random
sample of the N; the aggregator does not sample them, so with every site in every round q is 1.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from server.config import ConfigError, PrivacyConfig
from server.records import RoundRecord, RoundState, SiteRecord
from server.store import Store

logger = logging.getLogger(__name__)

SEED_NAME = "privacy.seed"
_SEED_BYTES = 32
_NOISE_CHUNK = 1 << 20  # elements of noise drawn at a time (4 MiB); fixed, so the draws are too


@dataclass(frozen=True, slots=True)
class RoundPrivacy:
    """What one round published with noise spent, and what the run has spent up to it."""

    noise_multiplier: float  # z
    noise_std: float  # of the noise on each coordinate of the mean delta: z·C/K
    sample_rate: float  # q = K/N, as the accountant takes it
    epsilon: float  # spent by every round published with noise, this one included, at ``delta``
    delta: float
    rounds: int  # rounds published with noise, this one included


def load_secret(state_dir: Path) -> bytes:
    """The run's noise secret from ``STATE_DIR/privacy.seed``, created (0600) if it is not there.

    Raises:
        ConfigError: the file is there but does not hold the secret (64 hex digits), or cannot be read.
    """
    path = state_dir / SEED_NAME
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_bytes(_SEED_BYTES).hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        directory = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(directory)  # the name too: a noise seed lost in a crash would change a rebuild
        finally:
            os.close(directory)
        logger.info("[privacy] created the noise secret %s (mode 0600)", path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text(encoding="ascii").strip()
        secret = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(
            f"{path}: cannot read the DP noise secret ({exc}); it holds {_SEED_BYTES} random bytes as hex, "
            "written by the daemon the first time privacy was on",
            field="privacy.noise_multiplier",
        ) from None
    if len(secret) != _SEED_BYTES:
        raise ConfigError(
            f"{path}: the DP noise secret is {len(secret)} bytes; it must be {_SEED_BYTES} (as hex)",
            field="privacy.noise_multiplier",
        )
    if mode & 0o077:
        logger.warning(
            "[privacy] %s is readable by others (mode %04o): whoever reads it can remove the noise; "
            "chmod 600 it",
            path,
            mode,
        )
    return secret


@dataclass(frozen=True, slots=True)
class RoundNoise:
    """The Gaussian noise of one round: reproducible from the secret, unpredictable without it."""

    secret: bytes
    run_id: str
    round: int
    std: float

    def add_to(self, name: str, mean: torch.Tensor) -> torch.Tensor:
        """Add N(0, std²) to every element of tensor ``name``'s mean delta (fp32, in place); it."""
        generator = torch.Generator().manual_seed(self.seed(name))
        flat = mean.view(-1)
        for lo in range(0, flat.numel(), _NOISE_CHUNK):
            part = flat[lo : lo + _NOISE_CHUNK]
            part.add_(torch.randn(part.numel(), generator=generator, dtype=torch.float32), alpha=self.std)
        return mean

    def seed(self, name: str) -> int:
        """The generator seed of one tensor (63 bits of an HMAC: tensors and rounds draw apart)."""
        message = f"gdfed-dp-noise/{self.run_id}/{self.round}/{name}".encode()
        digest = hmac.new(self.secret, message, hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def noised(
    means: Iterable[tuple[str, torch.Tensor]], noise: RoundNoise | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The mean deltas, each with the round's noise added (as they are without ``noise``)."""
    for name, mean in means:
        yield name, (mean if noise is None else noise.add_to(name, mean))


def sample_rate(sites: int, population: int) -> float:
    """q = sites / population, the population taken as at least ``sites`` (and q at most 1)."""
    return sites / max(population, sites, 1)


def epsilon_spent(steps: Sequence[tuple[float, float]], delta: float) -> float:
    """ε at ``delta`` of these (noise multiplier, sample rate) steps composed, by opacus's RDP accountant.

    RDP composes by addition, in any order: equal steps are given to the accountant together, so
    the cost grows with the distinct (z, q) pairs, not with the rounds.
    """
    if not steps:
        return 0.0
    # Imported here: opacus takes over a second to import, and only runs with DP need it.
    from opacus.accountants import RDPAccountant  # type: ignore[import-untyped]

    accountant = RDPAccountant()
    for (z, q), count in sorted(Counter(steps).items()):
        for _ in range(count):
            accountant.step(noise_multiplier=z, sample_rate=q)
    return float(accountant.get_epsilon(delta=delta))


def past_steps(store: Store, before_round: int) -> list[tuple[float, float]]:
    """The (z, q) of every round before ``before_round`` published with noise, in round order."""
    rows = store.select(
        RoundRecord,
        "state = ? AND round < ? AND dp_noise_multiplier > 0",
        (int(RoundState.PUBLISHED), before_round),
        order="round",
    )
    return [(r.dp_noise_multiplier, r.dp_sample_rate) for r in rows]


def round_privacy(
    config: PrivacyConfig, clip: float, store: Store, round_number: int, uploads: int
) -> RoundPrivacy:
    """The noise and the ε of round ``round_number``, published from ``uploads`` clipped to ``clip``."""
    population = config.population or len(store.select(SiteRecord))
    q = sample_rate(uploads, population)
    z = config.noise_multiplier
    steps = [*past_steps(store, round_number), (z, q)]
    return RoundPrivacy(
        noise_multiplier=z,
        noise_std=z * clip / uploads,
        sample_rate=q,
        epsilon=epsilon_spent(steps, config.delta),
        delta=config.delta,
        rounds=len(steps),
    )
