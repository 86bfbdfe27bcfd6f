"""Builders of the protobuf replies from the aggregator's domain views (the one place they meet).

The servicers call these and nothing else to make a reply; the domain side
(``membership``, ``run_admin``, ``run_state``) never sees a protobuf message.
"""

from __future__ import annotations

from common.pb.gradualdiff.v1 import admin_pb2, federation_pb2
from common.serde import training_spec_to_proto, training_stats_to_proto
from common.spec import TrainingSpec
from server.membership import RoundView
from server.records import RoundState, SiteRecord, training_of
from server.run_admin import RoundReport, StatusView
from server.run_state import Event
from server.tree_view import IntermediateView
from server.uploads import Receipt


def round_state(state: RoundState | None) -> federation_pb2.RoundState.ValueType:
    """The wire value of a round state (UNSPECIFIED for none)."""
    return federation_pb2.RoundState.ValueType(int(state) if state is not None else 0)


def round_spec(view: RoundView, training: TrainingSpec) -> federation_pb2.RoundSpec:
    """What a worker learns of the round it may train in."""
    return federation_pb2.RoundSpec(
        run_id=view.run_id,
        round=view.round,
        state=round_state(view.state),
        training=training_spec_to_proto(training),
        deadline_unix_ms=view.deadline_ms,
        quorum=federation_pb2.Quorum(
            min_sites=view.policy.min_sites, min_sample_fraction=view.policy.min_sample_fraction
        ),
        run_finished=view.finished,
        base_round=view.base_round,
        trainable_tensors=list(view.assignment.tensors),
        assigned_lora_rank=view.assignment.lora_rank,
        sits_out=not view.assignment.trains,
        download_blocks=list(view.assignment.download_blocks),
    )


def receipt(done: Receipt) -> federation_pb2.PushReceipt:
    """What PushDelta answers once an upload is counted (or was counted already)."""
    return federation_pb2.PushReceipt(
        upload_id=done.upload_id,
        round=done.round,
        bytes_received=done.bytes_received,
        accepted=done.accepted,
        duplicate=done.duplicate,
    )


def run_status(status: StatusView, server_version: str) -> admin_pb2.RunStatus:
    run, current, policy = status.run, status.current, status.policy
    return admin_pb2.RunStatus(
        run_id=run.run_id,
        paused=run.paused,
        finished=run.finished,
        current_round=run.current_round,
        total_rounds=status.total_rounds,
        current_state=round_state(current.state if current else None),
        sites_alive=status.sites_alive,
        sites_known=status.sites_known,
        full_model_bytes=status.full_model_bytes,
        quorum=federation_pb2.Quorum(
            min_sites=policy.min_sites, min_sample_fraction=policy.min_sample_fraction
        ),
        round_deadline_s=policy.deadline_s,
        started_unix_ms=run.created_ms,
        server_version=server_version,
        waiting_reason=status.waiting_reason,
        pause_reason=run.pause_reason if run.paused else "",
        min_sites_to_open=policy.min_sites_to_open,
        dp_epsilon=run.dp_epsilon,
        dp_delta=run.dp_delta,
        dp_noise_multiplier=run.dp_noise_multiplier,
        dp_rounds=run.dp_rounds,
        intermediates=[intermediate_status(view) for view in status.intermediates],
    )


def intermediate_status(view: IntermediateView) -> admin_pb2.IntermediateStatus:
    """One intermediate of a root's tree: its liveness and its last accepted partial sum."""
    site, last = view.site, view.last
    return admin_pb2.IntermediateStatus(
        site_id=view.site_id,
        joined=site is not None,
        state=admin_pb2.SiteState.ValueType(int(site.state) if site else 0),
        last_beat_unix_ms=site.last_beat_ms if site else 0,
        round=last.round if last else 0,
        sites=last.sites if last else 0,
        samples=last.sample_count if last else 0,
        accepted_unix_ms=last.accepted_ms if last else 0,
    )


def round_status(report: RoundReport) -> admin_pb2.RoundStatus:
    record = report.record
    msg = admin_pb2.RoundStatus(
        round=record.round,
        state=round_state(record.state),
        samples=record.samples,
        bytes_in=record.bytes_in,
        bytes_out=record.bytes_out,
        diff_bytes=record.diff_bytes,
        opened_unix_ms=record.opened_ms,
        closed_unix_ms=record.closed_ms,
        published_unix_ms=record.published_ms,
        aggregate_seconds=record.aggregate_seconds,
        mean_train_loss=record.mean_train_loss,
        mean_eval_loss=record.mean_eval_loss,
        failure_reason=record.failure_reason,
        close_reason=record.close_reason,
        ratio_to_full_model=report.ratio_to_full_model,
        aggregation_rule=record.aggregation_rule,
        trimmed_per_side=record.trimmed_per_side,
        dp_noise_multiplier=record.dp_noise_multiplier,
        dp_noise_std=record.dp_noise_std,
        dp_sample_rate=record.dp_sample_rate,
        dp_epsilon=record.dp_epsilon,
    )
    for site in report.sites:
        msg.participants.append(
            admin_pb2.SiteRoundStatus(
                site_id=site.site_id,
                sample_count=site.sample_count,
                bytes_in=site.bytes_in,
                accepted=site.accepted,
                dropped=site.dropped,
                train_loss=site.train_loss,
                eval_loss=site.eval_loss,
                upload_seconds=site.upload_seconds,
                norm=site.norm,
                clip_scale=site.clip_scale,
                outlier=site.outlier,
                training=training_stats_to_proto(site.training),
                sites=site.sites,
            )
        )
    return msg


def site_status(site: SiteRecord) -> admin_pb2.SiteStatus:
    return admin_pb2.SiteStatus(
        site_id=site.site_id,
        state=admin_pb2.SiteState.ValueType(int(site.state)),
        last_beat_unix_ms=site.last_beat_ms,
        rounds_joined=site.rounds_joined,
        held_round=site.held_round,
        phase=federation_pb2.Phase.ValueType(site.phase),
        step=site.step,
        loss=site.loss,
        capabilities=federation_pb2.Capabilities(
            device=federation_pb2.Device.ValueType(site.device),
            memory_bytes=site.memory_bytes,
            lora_rank=site.lora_rank,
            num_samples=site.num_samples,
        ),
        total_steps=site.total_steps,
        last_problem=site.last_problem,
        timings=federation_pb2.PhaseTimings(
            load_seconds=site.load_seconds,
            sync_seconds=site.sync_seconds,
            train_seconds=site.train_seconds,
            upload_seconds=site.upload_seconds,
        ),
        training=training_stats_to_proto(training_of(site)),
    )


def run_event(event: Event) -> admin_pb2.RunEvent:
    return admin_pb2.RunEvent(
        unix_ms=event.unix_ms,
        round=event.round,
        kind=event.kind,
        site_id=event.site_id,
        state=round_state(event.state),
        detail=event.detail,
    )
