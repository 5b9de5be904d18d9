"""Benchmark: wall time of `make smoke` and `make all` from a built environment.

Each profile runs from an empty build folder (so every stage executes) and the
result is compared with its budget on the reference machine (2 cores):
`make smoke` within 90 s, `make all` (default) within 600 s, and stage 1 of
the smoke profile within 20 s. `byod` is the worked bring-your-own-data
example (`make all PROFILE=smoke DATA=examples/byod/four-sites.yaml`),
also within 90 s. Results go to build/bench/pipeline.json.

    python -m benchmarks.pipeline [--profiles smoke default byod] [--out build/bench/pipeline.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compendium.artifacts import git_state, write_json
from compendium.params import REPO_ROOT, build_name

BUDGET_SECONDS = {"smoke": 90.0, "default": 600.0, "byod": 90.0}
#: Benchmarks that are a profile on a provided dataset: name -> (profile, dataset YAML).
PROVIDED = {"byod": ("smoke", "examples/byod/four-sites.yaml")}
STAGE1_SMOKE_BUDGET = 20.0


REPORT_TEXT = REPO_ROOT / "report" / "text" / "en.yaml"


def _make_all(profile: str, build_root: Path, data: str | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(["make", "--no-print-directory", "all", f"PROFILE={profile}", f"BUILD_ROOT={build_root}",
                             *([f"DATA={data}"] if data else [])], cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"make all PROFILE={profile} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


def run_profile(profile: str, rebuild: bool = False, data: str | None = None) -> dict:
    """Return the wall time of the whole pipeline and of each stage for one profile, from scratch.

    With `rebuild`, also time `make all` after touching only the report text
    (only the report stage and the site should rerun).
    """
    build_root = Path(tempfile.mkdtemp(prefix=f"bench-{profile}-"))
    try:
        wall = _make_all(profile, build_root, data)
        stages = {}
        for manifest in sorted((build_root / build_name(profile, data)).glob("*/manifest.json")):
            stages[manifest.parent.name] = json.loads(manifest.read_text())["wall_seconds"]
        measured = {"wall_seconds": round(wall, 2), "stage_notebook_seconds": stages}
        if rebuild:
            os.utime(REPORT_TEXT)  # a report-text edit, as make sees it
            before = {s: (build_root / profile / s / "manifest.json").stat().st_mtime for s in stages}
            rerun = _make_all(profile, build_root)
            rebuilt = sorted(s for s in stages
                             if (build_root / profile / s / "manifest.json").stat().st_mtime != before[s])
            measured["report_text_rebuild"] = {"wall_seconds": round(rerun, 2), "ratio_to_full": round(rerun / wall, 3),
                                               "stages_rerun": rebuilt, "within_20s": rerun < 20.0}
        return measured
    finally:
        shutil.rmtree(build_root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__)
    parser.add_argument("--profiles", nargs="+", default=["smoke", "default", "byod"], choices=sorted(BUDGET_SECONDS))
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "bench" / "pipeline.json")
    args = parser.parse_args(argv)
    results = {}
    for profile in args.profiles:
        print(f"running make all PROFILE={profile} from an empty build folder ...", flush=True)
        base, data = PROVIDED.get(profile, (profile, None))
        measured = run_profile(base, rebuild=profile == "default", data=data)
        measured["budget_seconds"] = BUDGET_SECONDS[profile]
        measured["within_budget"] = measured["wall_seconds"] <= BUDGET_SECONDS[profile]
        results[profile] = measured
        print(f"  {profile}: {measured['wall_seconds']:.1f} s (budget {BUDGET_SECONDS[profile]:.0f} s); "
              f"stages {measured['stage_notebook_seconds']}")
    if "smoke" in results:
        stage1 = results["smoke"]["stage_notebook_seconds"].get("01_synthetic_ehr")
        results["smoke"]["stage1_within_20s"] = stage1 is not None and stage1 <= STAGE1_SMOKE_BUDGET
    write_json(args.out, {
        "benchmark": "pipeline",
        "profiles": results,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "git": git_state(),
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "note": "wall time includes papermill kernel start-up and HTML rendering of each notebook",
    })
    print(f"wrote {args.out}")
    if "default" in results:
        write_json(args.out.parent / "rebuild.json", {
            "benchmark": "rebuild", "profile": "default", "change": "touched report/text/en.yaml",
            **results["default"]["report_text_rebuild"], "full_run_seconds": results["default"]["wall_seconds"],
            "git": git_state(), "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        })
        print(f"wrote {args.out.parent / 'rebuild.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
