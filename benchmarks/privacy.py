"""Benchmark: reference models per second, batched (one tensor program) against a Python loop.

Both train the same federated pipelines (own federated statistics, FedAvg
rounds of full-batch Adam at each site) on the same random member halves of
the default profile's sites: the loop calls the target pipeline
(`fl.federated.fedavg_plain`) once per model, the batched trainer
(`fl.privacy.reference.train_federated`) trains them all at once. The loop
runs a subset of the models (its per-model cost is flat). Results go to
build/bench/privacy.json; target: at least 10x.

    python -m benchmarks.privacy [--models 64] [--loop-models 8]
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from compendium.artifacts import git_state, package_versions, write_json
from compendium.params import REPO_ROOT, load_params, profile_path
from data_synth.cohort import write_cohort
from data_synth.generator import generate_site
from data_synth.stage import cohort_spec
from fl.data import MODEL_INPUTS, FeatureStatistics, PreprocessingSpec, load_site, site_dir
from fl.federated import fedavg_plain, initial_weights
from fl.flower.server_app import local_train_config
from fl.privacy.reference import SiteTensors, membership_masks, train_federated

TARGET_SPEEDUP = 10.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.privacy", description=__doc__)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--loop-models", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "bench" / "privacy.json")
    args = parser.parse_args(argv)
    if not 1 <= args.loop_models <= args.models:
        parser.error("need 1 <= --loop-models <= --models")
    profile = load_params(profile_path(args.profile))
    work = Path(tempfile.mkdtemp(prefix="bench-privacy-"))
    try:
        sites = {}
        for site, site_profile in profile.site_profiles().items():
            folder = site_dir(work, site)
            generate_site(site_profile, profile.seed, folder, progress=False)
            write_cohort(folder / "omop", folder, cohort_spec(profile), site, progress=False)
            sites[site] = load_site(folder, "all")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    federated = profile.federated
    config = local_train_config(profile)
    start = initial_weights("logistic", MODEL_INPUTS, (), profile.seed)
    masks = membership_masks({s: len(d) for s, d in sites.items()}, args.models, np.random.default_rng(0))
    tensors = {s: SiteTensors.of(d.features, d.labels) for s, d in sites.items()}

    def loop_model(m: int) -> None:
        members = {s: masks[s][m].numpy() for s in sites}
        chosen = {s: (d.features.loc[members[s]], d.labels[members[s]]) for s, d in sites.items()}
        spec = PreprocessingSpec.from_statistics(FeatureStatistics.of_sites([x for x, _ in chosen.values()]))
        fedavg_plain("logistic", (), start, {s: (spec.transform(x), y) for s, (x, y) in chosen.items()},
                     federated.rounds, config, profile.seed)

    # Warm-up: first calls pay one-off torch and allocator costs that belong to neither side.
    train_federated(tensors, {s: m[:2] for s, m in masks.items()}, federated.rounds, federated.local_epochs,
                    federated.learning_rate, federated.weight_decay, (start[0], start[1]))
    loop_model(0)

    print(f"batched: {args.models} federated pipelines ...", flush=True)
    started = time.perf_counter()
    train_federated(tensors, masks, federated.rounds, federated.local_epochs, federated.learning_rate,
                    federated.weight_decay, (start[0], start[1]))
    batched = time.perf_counter() - started

    print(f"loop: {args.loop_models} pipelines, one at a time ...", flush=True)
    started = time.perf_counter()
    for m in range(args.loop_models):
        loop_model(m)
    loop = time.perf_counter() - started

    batched_rate = args.models / batched
    loop_rate = args.loop_models / loop
    speedup = batched_rate / loop_rate
    write_json(args.out, {
        "benchmark": "privacy", "profile": args.profile, "rounds": federated.rounds,
        "local_epochs": federated.local_epochs,
        "patients": {s: len(d) for s, d in sites.items()},
        "batched": {"models": args.models, "seconds": round(batched, 3), "models_per_second": round(batched_rate, 3)},
        "python_loop": {"models": args.loop_models, "seconds": round(loop, 3), "models_per_second": round(loop_rate, 3)},
        "speedup": round(speedup, 2), "target_speedup": TARGET_SPEEDUP, "target_met": speedup >= TARGET_SPEEDUP,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0]},
        "packages": package_versions(("torch", "numpy")), "git": git_state(),
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })
    print(f"batched {batched_rate:.1f} models/s, loop {loop_rate:.2f} models/s: {speedup:.1f}x; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
