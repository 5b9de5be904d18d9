"""Benchmark: the deployment engine (SuperLink + SuperNodes) against the simulation, same profile, same data.

One FedAvg run on Flower's deployment engine (`fl.flower.deployment`, TLS,
node authentication, processes on 127.0.0.1) and the same run in the
in-process simulation (`engine: direct`, stage 3's default), on the same
generated sites in a temporary folder. Per-round wall time is read the same
way for both: the interval between consecutive round checkpoints. Reported:
the median per-round time of each and their ratio, the start-up time of the
SuperLink and of each SuperNode (start to ready), and whether the two final
models agree. Results go to build/bench/deployment.json.

    python -m benchmarks.deployment [--profile smoke]
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.flower import prepare_sites
from compendium.artifacts import git_state, package_versions, write_json
from compendium.params import REPO_ROOT, load_params, profile_path
from fl.federated import weights_difference
from fl.flower.deployment import final_weights, round_seconds, run_deployment
from fl.flower.engine import run_direct


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deployment", description=__doc__)
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "bench" / "deployment.json")
    args = parser.parse_args(argv)
    params = profile_path(args.profile)
    profile = load_params(params)
    work = Path(tempfile.mkdtemp(prefix="bench-deployment-"))
    try:
        print(f"preparing {args.profile} sites ...", flush=True)
        dirs = prepare_sites(profile, work / "build")
        print(f"deployment run ({profile.federated.rounds} rounds) ...", flush=True)
        started = time.perf_counter()
        deployed = run_deployment(params, work / "build", progress=False)
        deployment_seconds = time.perf_counter() - started
        simulated_rounds, simulation_seconds = [], []
        for repeat in range(3):  # the in-process run is fast: keep the fastest of three
            out = work / f"simulation-{repeat}"
            started = time.perf_counter()
            result = run_direct(profile, "fedavg", dirs, out)
            simulation_seconds.append(time.perf_counter() - started)
            simulated_rounds.append(round_seconds(out))
        deployed_weights = final_weights(deployed.folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_round_deployed = statistics.median(deployed.summary["round_seconds"])
    per_round_simulated = min(statistics.median(r) for r in simulated_rounds)
    difference = weights_difference(deployed_weights, result.weights)
    report = {
        "benchmark": "deployment", "profile": args.profile, "strategy": "fedavg",
        "rounds": profile.federated.rounds,
        "deployment": {"per_round_seconds": round(per_round_deployed, 3),
                       "round_seconds": deployed.summary["round_seconds"],
                       "run_seconds": round(deployment_seconds, 2),
                       "startup_seconds": deployed.summary["startup_seconds"]},
        "simulation": {"engine": "direct (in-process Flower grid)", "per_round_seconds": round(per_round_simulated, 4),
                       "run_seconds": round(min(simulation_seconds), 3)},
        "per_round_ratio_deployment_to_simulation": round(per_round_deployed / per_round_simulated, 1),
        "final_weights_max_abs_difference": difference,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "packages": package_versions(("flwr", "torch")),
        "git": git_state(),
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "method": "per-round = median interval between consecutive round checkpoints (written by the ServerApp "
                  "after each round's training and evaluation), the same measure for both engines; start-up = "
                  "process start until the SuperLink listens / the SuperNode has joined. In Flower 1.42 every "
                  "message to a SuperNode starts a new flwr-clientapp process, and the SuperNode and the "
                  "ServerApp poll every 3 s (fixed in Flower), which sets the deployment's per-round floor.",
    }
    write_json(args.out, report)
    print(f"deployment {per_round_deployed:.2f} s/round, simulation {per_round_simulated:.4f} s/round "
          f"(ratio {report['per_round_ratio_deployment_to_simulation']}x); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
