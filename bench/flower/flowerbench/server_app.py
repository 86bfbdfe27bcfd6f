# mypy: ignore-errors
# (runs in its own venv under bench/, where flwr / nvflare live; the project's .venv has neither)
"""ServerApp: Flower's own FedAvg strategy over K nodes, no evaluation; logs the wall time of each round."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flowerbench.shapes import initial_arrays

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg unchanged, plus a JSON line per round: when it was configured and when aggregated."""

    def __init__(self, timing_file: str, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.timing_file = timing_file
        self.started: dict[int, float] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.started[server_round] = time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        received = time.time()
        train_s = max(float(m.content["metrics"]["train-s"]) for m in replies if m.has_content())
        out = super().aggregate_train(server_round, replies)
        if self.timing_file:
            with open(self.timing_file, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "round": server_round,
                            "start": self.started[server_round],
                            "received": received,
                            "end": time.time(),
                            "replies": len(replies),
                            "train_s": train_s,
                        }
                    )
                    + "\n"
                )
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    k = int(context.run_config["num-sites"])
    strategy = TimedFedAvg(
        str(context.run_config["timing-file"]),
        fraction_train=1.0,
        fraction_evaluate=0.0,  # no evaluation round: it would ship the model once more
        min_train_nodes=k,
        min_available_nodes=k,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial_arrays(bool(context.run_config["quick"]))),
        num_rounds=int(context.run_config["num-rounds"]),
    )
