# mypy: ignore-errors
# (runs in its own venv under bench/, where flwr / nvflare live; the project's .venv has neither)
"""ClientApp: take the global arrays, add the fixed step (trivial training), return them (FedAvg)."""

from __future__ import annotations

import os
import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowerbench.shapes import add_step, fixed_step

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    step = fixed_step(100 + int(context.node_config.get("site", os.getpid())))
    start = time.perf_counter()
    add_step(arrays, step)
    train_s = time.perf_counter() - start
    content = RecordDict(
        {
            "arrays": ArrayRecord(arrays, keep_input=False),
            "metrics": MetricRecord({"num-examples": 100, "train-s": train_s}),
        }
    )
    return Message(content=content, reply_to=msg)
