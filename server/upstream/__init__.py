"""An intermediate aggregator: a site to its parent, an aggregator to its own sites (issue 20).

    settings.py    [upstream]: the parent's address, this aggregator's site id and token there,
                   TLS for that link, the forwarding margin; what an intermediate refuses
    link.py        the gRPC client to the parent (Join, Heartbeat, AwaitRound, FetchDiff,
                   PushDelta with resume), every call retried by common.retry
    bootstrap.py   the first start: the parent's run id, training spec and latest state become
                   this aggregator's round k (its rounds are numbered as the parent's)
    forward.py     a closed round's partial sum Σ n_i·Δ_i -> a payload on disk -> PushDelta,
                   idempotent across retries and restarts (a ledger file per round)
    adopt.py       the parent's published differences -> this aggregator's published rounds,
                   state += difference exactly as a worker applies it (bit-identical)
    relay_loop.py  the round loop of an intermediate: follows the parent's rounds, opens the
                   same round for its sites, closes it by its own quorum and deadline, forwards,
                   adopts

docs/operator.md, "A tree of aggregators: intermediates".
"""
