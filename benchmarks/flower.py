"""Benchmark: the Flower federation against a plain in-process FedAvg loop, same data, same run.

For each engine (the plain loop, Flower with the in-process `direct` grid,
Flower's Ray simulation) the same FedAvg run is timed at two round counts;
per-round time is the slope between them and start-up time the intercept
(everything before the first round: Ray start, federated statistics, ...).
The plain loop does the same per-round work as the Flower app: local
training at each site, aggregation, and scoring the global model on each
site's test split. Data: the default profile's site sizes, generated into a
temporary folder. Results go to build/bench/flower.json.

    python -m benchmarks.flower [--profile default] [--rounds 3 23] [--engines plain direct ray]
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compendium.artifacts import git_state, package_versions, write_json
from compendium.params import REPO_ROOT, load_params, profile_path
from data_synth.stage import cohort_spec
from data_synth.cohort import write_cohort
from data_synth.generator import generate_site

TARGET_STARTUP_SECONDS = 10.0
TARGET_ROUND_RATIO = 2.0


def prepare_sites(profile, root: Path) -> list[Path]:
    """Return the site folders of a freshly generated federation for the profile, under root."""
    from fl.data import site_dir

    dirs = []
    for site, site_profile in profile.site_profiles().items():
        folder = site_dir(root, site)
        generate_site(site_profile, profile.seed, folder, progress=False)
        write_cohort(folder / "omop", folder, cohort_spec(profile), site, progress=False)
        dirs.append(folder)
    return dirs


def _with_rounds(profile, rounds: int):
    return profile.model_copy(update={"federated": profile.federated.model_copy(update={"rounds": rounds})})


def _plain(profile, dirs: list[Path], out: Path) -> None:
    """The plain loop, doing what the Flower run does: statistics, then train, aggregate, evaluate."""
    from fl.evaluate import auroc
    from fl.data import FeatureStatistics, PreprocessingSpec, load_site
    from fl.federated import fedavg_plain, initial_weights, predict
    from fl.flower.server_app import local_train_config

    train = {d.name: load_site(d, "train") for d in dirs}
    test = {d.name: load_site(d, "test") for d in dirs}
    spec = PreprocessingSpec.from_statistics(FeatureStatistics.of_sites([t.features for t in train.values()]))
    kind, hidden = profile.baselines.model, tuple(profile.baselines.mlp_hidden)
    arrays = {site: (spec.transform(t.features), t.labels) for site, t in train.items()}
    test_x = {site: spec.transform(t.features) for site, t in test.items()}

    def evaluate(_round, weights):
        for site, t in test.items():
            auroc(t.labels, predict(kind, hidden, weights, test_x[site]))

    fedavg_plain(kind, hidden, initial_weights(kind, spec.n_outputs, hidden, profile.seed), arrays,
                 profile.federated.rounds, local_train_config(profile), profile.seed, after_round=evaluate)


def _direct(profile, dirs: list[Path], out: Path) -> None:
    from fl.flower.engine import run_direct

    run_direct(profile, "fedavg", dirs, out)


def _ray(profile, dirs: list[Path], out: Path, params_file: Path) -> None:
    from fl.flower.engine import run_ray

    run_ray(params_file, "fedavg", dirs, out)


def _time(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def measure(engine: str, profile, dirs: list[Path], rounds: tuple[int, int], work: Path, params_dir: Path,
            repeats: int = 2) -> dict:
    """Return wall seconds at two round counts, per-round seconds (slope) and start-up (intercept).

    Each count runs `repeats` times after one warm-up run and keeps the fastest,
    so one-off costs of this process (first imports, torch initialisation) do
    not masquerade as per-round cost. Ray starts afresh in every run, so its
    start-up is measured in full each time.
    """
    seconds = {}
    for count in (rounds[0], *[c for c in rounds for _ in range(repeats)]):
        run_profile = _with_rounds(profile, count)
        out = work / f"{engine}-{count}"
        if engine == "plain":
            elapsed = _time(lambda: _plain(run_profile, dirs, out))
        elif engine == "direct":
            elapsed = _time(lambda: _direct(run_profile, dirs, out))
        else:
            # Ray's ServerApp reads the profile from a file: write one with this round count.
            import yaml

            data = yaml.safe_load(profile_path(profile.profile).read_text())
            data.setdefault("federated", {})["rounds"] = count
            params_file = params_dir / f"{profile.profile}.yaml"
            params_file.write_text(yaml.safe_dump(data))
            elapsed = _time(lambda: _ray(run_profile, dirs, out, params_file))
        seconds[count] = min(seconds.get(count, float("inf")), elapsed)
    low, high = rounds
    per_round = (seconds[high] - seconds[low]) / (high - low)
    return {"seconds": {str(k): round(v, 3) for k, v in seconds.items()}, "per_round_seconds": round(per_round, 4),
            "startup_seconds": round(seconds[low] - low * per_round, 3)}


def import_seconds(module: str) -> float:
    """Return the wall time of importing a module in a fresh interpreter."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=REPO_ROOT)
    return round(time.perf_counter() - started, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flower", description=__doc__)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--rounds", nargs=2, type=int, default=[3, 23])
    parser.add_argument("--engines", nargs="+", default=["plain", "direct", "ray"], choices=["plain", "direct", "ray"])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "bench" / "flower.json")
    args = parser.parse_args(argv)
    low, high = sorted(args.rounds)
    if low < 1 or high <= low:
        parser.error("--rounds needs two different positive round counts")
    profile = load_params(profile_path(args.profile))
    work = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    try:
        print(f"preparing {args.profile} sites ...", flush=True)
        dirs = prepare_sites(profile, work / "build")
        results = {}
        for engine in args.engines:
            print(f"timing {engine} at {low} and {high} rounds ...", flush=True)
            results[engine] = measure(engine, profile, dirs, (low, high), work, work)
            print(f"  {engine}: {results[engine]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plain = results.get("plain", {}).get("per_round_seconds")
    report = {"benchmark": "flower", "profile": args.profile, "strategy": "fedavg", "rounds": [low, high],
              "engines": results, "targets": {}}
    for engine in ("direct", "ray"):
        if engine in results and plain:
            ratio = results[engine]["per_round_seconds"] / plain
            results[engine]["per_round_ratio_to_plain"] = round(ratio, 2)
            report["targets"][engine] = {
                "startup_under_10s": results[engine]["startup_seconds"] < TARGET_STARTUP_SECONDS,
                "per_round_at_most_2x_plain": ratio <= TARGET_ROUND_RATIO,
            }
    report.update({
        "import_seconds": {m: import_seconds(m) for m in ("flwr", "flwr.simulation", "torch")},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "packages": package_versions(("flwr", "ray", "torch")),
        "git": git_state(),
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "method": "per-round = slope between the two round counts; start-up = intercept. Each engine runs "
                  "statistics, then per round: local training at every site, aggregation, evaluation on every "
                  "site's test split. Ray: flwr.simulation.run_simulation, one CPU per site.",
    })
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
