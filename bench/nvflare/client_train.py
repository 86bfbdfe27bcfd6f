# mypy: ignore-errors
# (runs in its own venv under bench/, where flwr / nvflare live; the project's .venv has neither)
"""NVFlare client script (Client API): take the global array, add the fixed step (trivial training), send it back.

Runs inside NVFlare's client job process, in bench/.venv-nvflare. NVFlare's
numpy FedAvg recipe carries one array (NPModelPersistor keeps a single
``numpy_key``), so the model is GPT-2 small's 124,439,808 fp32 parameters as
one flat array; the same bytes as Flower's and our 148 tensors.
"""

from __future__ import annotations

import time

import numpy as np
import nvflare.client as flare

STEP_STD = 1e-4
STEP_ELEMENTS = 1 << 22


def main() -> None:
    flare.init()
    site = flare.get_site_name()
    seed = 100 + int("".join(c for c in site if c.isdigit()) or 0)
    step = np.random.default_rng(seed).standard_normal(STEP_ELEMENTS, dtype=np.float32) * np.float32(STEP_STD)
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        arrays = model.params
        start = time.perf_counter()
        for value in arrays.values():
            flat = value.reshape(-1)
            for lo in range(0, flat.size, STEP_ELEMENTS):
                hi = min(lo + STEP_ELEMENTS, flat.size)
                flat[lo:hi] += step[: hi - lo]
        train_s = time.perf_counter() - start
        print(f"GDFEDBENCH train_s={train_s:.6f}", flush=True)
        flare.send(
            flare.FLModel(params=arrays, metrics={"train_s": train_s}, meta={"NUM_STEPS_CURRENT_ROUND": 100})
        )


if __name__ == "__main__":
    main()
