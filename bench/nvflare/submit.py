# mypy: ignore-errors
# (runs in its own venv under bench/, where flwr / nvflare live; the project's .venv has neither)
"""Build NVFlare's built-in numpy FedAvg recipe, submit it to a running POC system, wait for it to finish.

Runs in bench/.venv-nvflare:

    python submit.py --kit ADMIN_STARTUP_KIT --init INIT.npy --clients K --rounds R --work DIR

Prints one JSON line: the job id and its final status.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nvflare.app_common.np.recipes import NumpyFedAvgRecipe
from nvflare.fuel.flare_api.flare_api import new_secure_session

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kit", required=True, help="the admin user's startup kit folder")
    parser.add_argument("--init", required=True, help="the initial model, one flat fp32 .npy")
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    # Every setting at its default (in-time aggregation, full weights, in-process client script)
    # except what the benchmark fixes: K clients, R rounds, the model, the trivial training script.
    recipe = NumpyFedAvgRecipe(
        name="gdfedbench",
        initial_ckpt=str(Path(args.init).resolve()),
        min_clients=args.clients,
        num_rounds=args.rounds,
        train_script=str(HERE / "client_train.py"),
    )
    job_dir = Path(args.work) / "job"
    recipe.export(str(job_dir))
    session = new_secure_session("admin@nvidia.com", args.kit, timeout=60)
    try:
        job_id = session.submit_job(str(job_dir / "gdfedbench"))
        print(json.dumps({"job_id": job_id, "event": "submitted"}), flush=True)
        _, meta = session.monitor_job_and_return_job_meta(job_id, timeout=args.timeout, poll_interval=1.0)
        status = (meta or {}).get("status", "unknown")
        print(json.dumps({"job_id": job_id, "status": str(status)}), flush=True)
    finally:
        session.close()
    return 0 if "FINISHED" in str(status) else 1


if __name__ == "__main__":
    sys.exit(main())
