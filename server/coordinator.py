"""The coordinator: builds the aggregator's parts around one ``RunState``, recovers, starts and stops.

    RunState (run_state)             the lock, the run record, round queries, events
      ├── Membership (membership)    Join, Heartbeat, AwaitRound, liveness
      ├── Intake (intake)            PushDelta, GetUploadOffset
      ├── Fetching (fetching)        FetchDiff
      ├── Closing (closing)          close, aggregate and publish, or fail a round
      ├── RoundLoop (round_loop)     tick -> rounds.decide -> close or fail -> open the next
      │     or RelayLoop (upstream)  an intermediate's: the parent's rounds, forward, adopt
      └── RunAdmin (run_admin)       the Admin service's reads and controls

Each part receives the state and the narrow collaborators it calls; none of
them knows this class. Only ``server.app`` does, to hand the parts to the
servicers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from common.statefile import StateReader
from server.blobs import BlobStore
from server.closing import Closing
from server.config import ServerConfig
from server.fetching import Fetching
from server.folding import FoldWorker
from server.genesis import load_or_create_run
from server.intake import Intake
from server.membership import Membership
from server.methods import plan_of
from server.publish import rebuild
from server.records import RoundRecord, RoundState, RunRecord
from server.round_loop import RoundLoop
from server.run_admin import RunAdmin
from server.run_state import RunState
from server.spool import Spool
from server.store import Store
from server.upstream.relay_loop import relay_loop

logger = logging.getLogger(__name__)


class Coordinator:
    """Owns the run's parts. ``start`` launches the round loop; ``stop`` makes every received byte
    durable and closes the store."""

    def __init__(self, config: ServerConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.state_dir / "state.db")
        self.blobs = BlobStore(config.state_dir)
        self.spool = Spool(config.state_dir / "spool")
        run = load_or_create_run(config, self.store, self.blobs, lambda: int(clock() * 1000))
        latest = self.store.select(
            RoundRecord, "state = ?", (int(RoundState.PUBLISHED),), order="round DESC"
        )[0]
        manifest = StateReader(self.blobs.path(latest.state_blob)).manifest
        self.state = state = RunState(store=self.store, run=run, plan=plan_of(config, manifest), clock=clock)
        self.fetching = Fetching(
            store=self.store,
            blobs=self.blobs,
            lock=state.lock,
            run_id=run.run_id,
            metrics=state.observe,
            joined_site=state.joined_site,
            latest_published=state.latest_published,
        )
        self.folder = FoldWorker(self.spool)
        self.membership = Membership(state=state, config=config)
        self.closing = Closing(
            state=state,
            config=config,
            blobs=self.blobs,
            spool=self.spool,
            manifest=manifest,
            snapshot_estimate=self.fetching.snapshot_estimate,
        )
        if config.upstream.enabled:  # an intermediate of a tree: its rounds are its parent's
            self.loop: RoundLoop = relay_loop(
                state=state,
                membership=self.membership,
                closing=self.closing,
                config=config,
                blobs=self.blobs,
                spool=self.spool,
                snapshot_estimate=self.fetching.snapshot_estimate,
            )
        else:
            self.loop = RoundLoop(
                state=state, membership=self.membership, closing=self.closing, config=config
            )
        self.intake = Intake(state=state, spool=self.spool, folder=self.folder, config=config)
        self.admin = RunAdmin(
            state=state,
            rounds=self.loop,
            intake=self.intake,
            full_model_bytes=sum(t.numel * 4 for t in manifest),
            total_rounds=config.rounds,
            configured_sites=len(config.site_tokens),
            intermediates=config.tree.intermediates,
        )
        self._recover()

    @property
    def run(self) -> RunRecord:
        """The run's record (read it under ``state.lock`` where a consistent view matters)."""
        return self.state.run

    def _recover(self) -> None:
        """After a restart: reopen the current round where it was, or run the aggregation it was in."""
        state = self.state
        with state.lock:
            current = state.current_round()
            if current is None or current.state.is_final:
                self.loop.open_next_round()
                return
            state.acc = self.closing.start_sum(current.round)
            if current.state.accepts_uploads:
                state.set_open_round(current.round)
            accepted = state.accepted_uploads(current.round)
            if accepted:
                logger.info(
                    "[recover] round=%d replaying %d accepted upload(s)", current.round, len(accepted)
                )
                rebuild(state.acc, accepted, self.spool)
            if current.state is not RoundState.AGGREGATING:
                return
        logger.info("[recover] round=%d was aggregating; aggregating again", current.round)
        self.loop.aggregate(current.round)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.loop.start()

    def stop_rounds(self) -> None:
        """Stop the round loop (liveness, quorum, deadlines) and wake long polls; the first step of a shutdown.

        While the server drains its calls it refuses new ones, heartbeats included: the loop
        must not drop the sites, or close their round, for beats they cannot send.
        """
        self.state.stopping.set()
        self.loop.stop()
        with self.state.lock:
            self.state.changed.notify_all()

    def stop(self, drain_s: float = 10.0) -> None:
        """Stop the loop, commit what every upload has received, close the store.

        Each live upload's handler commits its received bytes (``UploadSession.interrupt``) as its
        call ends, which may be after the server reports its calls stopped: wait up to ``drain_s``
        for them, so the store is still open for those commits.
        """
        self.stop_rounds()
        self.intake.drain("the aggregator is shutting down", drain_s)
        self.folder.stop()
        self.store.close()
