"""Benchmark: synthetic OMOP generation, Parquet writing and cohort building for one site.

For each size N (default 100,000 and 1,000,000 patients) a fresh child process
generates every OMOP table of one site (the "sahlgrenska" profile with N
patients), writes them as Parquet, and builds the cohort from them, in a
temporary folder that is removed afterwards. Each size runs in its own process
so that its peak memory is its own. Targets on the reference machine (2 cores):
at least 1,000,000 patients per minute for generation, writing and cohort
together, and peak memory at 1,000,000 patients at most 1.5 times that at
100,000 (the generator and the cohort builder stream in chunks of patients).
Results go to build/bench/synth.json.

    python -m benchmarks.synth [--sizes 100000 1000000] [--out build/bench/synth.json]

Peak memory is the child's VmHWM ("peak resident set size") from
/proc/self/status, read by the child at the end of its run. It is not
`ru_maxrss`: on Linux a process's `ru_maxrss` (from getrusage(RUSAGE_SELF), or
from os.wait4 in the parent) starts at the peak of the process that spawned it
(the kernel carries the pre-exec high-water mark over `exec`), so it can never be
below the parent's peak, and RUSAGE_CHILDREN holds the largest child ever
waited for, not a per-child figure. VmHWM belongs to the address space created
by `exec`, so it is the child's own. The wait4 figure is kept as a cross-check.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compendium.artifacts import git_state, package_versions

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = (100_000, 1_000_000)
DEFAULT_OUT = REPO_ROOT / "build" / "bench" / "synth.json"
SITE = "sahlgrenska"
SEED = 0
#: The site profile's bounds on `patients` (data_synth.sites.SiteProfile).
MIN_PATIENTS, MAX_PATIENTS = 50, 50_000_000
TARGET_PATIENTS_PER_MINUTE = 1_000_000
TARGET_PEAK_RSS_RATIO = 1.5
#: Line prefix under which the worker hands its measurements to the parent.
RESULT_MARKER = "BENCH-SYNTH-RESULT "
RSS_METHOD = (
    "peak_rss_mib is VmHWM from the child's /proc/self/status, read at the end of the child "
    "(the peak resident set of the address space created by exec, all threads, this size only). "
    "ru_maxrss_wait4_mib is os.wait4's ru_maxrss for the same child, a cross-check that is an upper "
    "bound: Linux carries the spawning parent's peak over exec, so it is at least the parent's peak "
    "(parent_peak_rss_mib)."
)
MIB = 1024 * 1024


# ---------------------------------------------------------------- child side
def _proc_status_kib(field: str) -> int | None:
    """Return a "kB" field (VmHWM, VmRSS) of /proc/self/status, or None where there is no /proc."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_kib() -> int:
    """Return ru_maxrss of this process in KiB (macOS reports bytes)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value // 1024 if sys.platform == "darwin" else value


def _peak_rss_mib() -> tuple[float, str]:
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024, "VmHWM"
    return _maxrss_kib() / 1024, "ru_maxrss_self"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_worker(patients: int, work_dir: Path) -> dict:
    """Generate, write and build the cohort of one site of `patients` patients in `work_dir`; return measurements."""
    started = time.perf_counter()
    import pyarrow.parquet as pq

    from data_synth import omop
    from data_synth.cohort import CohortSpec, write_cohort
    from data_synth.features import COHORT_FILE
    from data_synth.generator import GROUND_TRUTH_FILE, generate_site
    from data_synth.sites import site_profile

    import_seconds = time.perf_counter() - started
    rss_after_imports = (_proc_status_kib("VmRSS") or _maxrss_kib()) / 1024
    profile = site_profile(SITE, {"patients": patients})
    site_dir = Path(work_dir) / SITE

    cpu, wall = _cpu_seconds(), time.perf_counter()
    omop_dir = generate_site(profile, SEED, site_dir, progress=False)
    generate_seconds = time.perf_counter() - wall
    generate_cpu = _cpu_seconds() - cpu
    peak_after_generation, _ = _peak_rss_mib()

    cpu, wall = _cpu_seconds(), time.perf_counter()
    cohort_path, attrition = write_cohort(omop_dir, site_dir, CohortSpec(seed=SEED), SITE, progress=False)
    cohort_seconds = time.perf_counter() - wall
    cohort_cpu = _cpu_seconds() - cpu
    peak, method = _peak_rss_mib()

    rows = {table: pq.ParquetFile(omop.table_path(omop_dir, table)).metadata.num_rows for table in omop.SCHEMAS}
    rows["ground_truth"] = pq.ParquetFile(site_dir / GROUND_TRUTH_FILE).metadata.num_rows
    rows["cohort"] = pq.ParquetFile(site_dir / COHORT_FILE).metadata.num_rows
    files = {str(path.relative_to(site_dir)): path.stat().st_size
             for path in sorted(site_dir.rglob("*")) if path.is_file()}
    if cohort_path != site_dir / COHORT_FILE or attrition.cohort != rows["cohort"]:
        raise RuntimeError(f"cohort written to {cohort_path} with {attrition.cohort} rows, expected "
                           f"{site_dir / COHORT_FILE} with {rows['cohort']}")
    # Seconds unrounded here: the parent derives rates from them, then rounds.
    return {
        "patients": patients,
        "import_seconds": import_seconds,
        "generate_write_seconds": generate_seconds,
        "cohort_seconds": cohort_seconds,
        "total_seconds": generate_seconds + cohort_seconds,
        "generate_write_cpu_seconds": generate_cpu,
        "cohort_cpu_seconds": cohort_cpu,
        "rss_after_imports_mib": round(rss_after_imports, 1),
        "peak_rss_generation_mib": round(peak_after_generation, 1),
        "peak_rss_mib": round(peak, 1),
        "peak_rss_source": method,
        "rows": rows,
        "cohort_readmitted_30d": attrition.readmitted_30d,
        "bytes_by_file": files,
        "bytes_on_disk": sum(files.values()),
    }


def _worker_main(patients: int, work_dir: Path) -> int:
    result = run_worker(patients, work_dir)
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------- parent side
def measure_size(patients: int, tmp_root: Path | None = None) -> dict:
    """Run one size in a fresh child process, in a temporary folder removed afterwards; return its record."""
    work_dir = Path(tempfile.mkdtemp(prefix=f"bench-synth-{patients}-", dir=tmp_root))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    parent_peak = _peak_rss_mib()[0]
    try:
        log_out, log_err = work_dir / "worker.stdout", work_dir / "worker.stderr"
        data_dir = work_dir / "data"
        data_dir.mkdir()
        started = time.perf_counter()
        with open(log_out, "w") as out, open(log_err, "w") as err:
            child = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.synth", "--worker", str(patients), str(data_dir)],
                cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            )
            # wait4 rather than child.wait(): the same wait also returns the child's rusage.
            try:
                _, status, usage = os.wait4(child.pid, 0)
            except BaseException:
                child.kill()
                child.wait()
                raise
        child.returncode = os.waitstatus_to_exitcode(status)
        process_seconds = time.perf_counter() - started
        stdout, stderr = log_out.read_text(), log_err.read_text()
        if child.returncode != 0:
            raise RuntimeError(f"benchmark worker for {patients} patients failed (exit {child.returncode}):\n"
                               f"{stderr[-3000:]}")
        lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARKER)]
        if len(lines) != 1:
            raise RuntimeError(f"benchmark worker for {patients} patients printed no result:\n{stdout[-2000:]}")
        record = json.loads(lines[0][len(RESULT_MARKER):])
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    maxrss = usage.ru_maxrss / (MIB if sys.platform == "darwin" else 1024)
    record.update({
        "patients_per_minute": round(patients / record["total_seconds"] * 60.0),
        "generate_write_patients_per_minute": round(patients / record["generate_write_seconds"] * 60.0),
        "cohort_patients_per_minute": round(patients / record["cohort_seconds"] * 60.0),
        "process_wall_seconds": round(process_seconds, 3),
        "process_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
        "ru_maxrss_wait4_mib": round(maxrss, 1),
        "parent_peak_rss_mib": round(parent_peak, 1),
        "rows_total": sum(record["rows"].values()),
    })
    for name in ("import_seconds", "generate_write_seconds", "cohort_seconds", "total_seconds",
                 "generate_write_cpu_seconds", "cohort_cpu_seconds"):
        record[name] = round(record[name], 3)
    return record


def evaluate_targets(results: list[dict]) -> dict:
    """Return the targets, the measured values and whether each is met (None where not measurable)."""
    slowest = min(results, key=lambda r: r["patients_per_minute"])
    by_size = sorted(results, key=lambda r: r["patients"])
    small, large = by_size[0], by_size[-1]
    ratio = round(large["peak_rss_mib"] / small["peak_rss_mib"], 3) if len(by_size) >= 2 else None
    return {
        "patients_per_minute": {
            "target": f">= {TARGET_PATIENTS_PER_MINUTE}",
            "threshold": TARGET_PATIENTS_PER_MINUTE,
            "measured": slowest["patients_per_minute"],
            "measured_at_patients": slowest["patients"],
            "rule": "every size (generation + Parquet writing + cohort) at or above the threshold",
            "met": all(r["patients_per_minute"] >= TARGET_PATIENTS_PER_MINUTE for r in results),
        },
        "peak_rss_ratio_1m_vs_100k": {
            "target": f"<= {TARGET_PEAK_RSS_RATIO}",
            "threshold": TARGET_PEAK_RSS_RATIO,
            "measured": ratio,
            "sizes": [small["patients"], large["patients"]] if ratio is not None else None,
            "rule": "peak RSS at the largest size / peak RSS at the smallest size",
            "sizes_are_1m_and_100k": (small["patients"], large["patients"]) == (100_000, 1_000_000),
            "met": None if ratio is None else ratio <= TARGET_PEAK_RSS_RATIO,
        },
    }


def machine_facts() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MIB
    except (ValueError, OSError, AttributeError):
        memory = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_mib": round(memory) if memory else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        **package_versions(("numpy", "pyarrow", "pandas")),
    }


def write_json_atomic(target: Path, data: dict) -> Path:
    """Write `data` as indented JSON to `target` via a temporary file in the same folder and a rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def format_table(results: list[dict], targets: dict) -> str:
    header = (f"{'patients':>10} {'gen+write s':>11} {'cohort s':>9} {'total s':>8} {'patients/min':>13} "
              f"{'peak RSS MiB':>12} {'rows':>11} {'on disk MiB':>11}")
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r['patients']:>10,} {r['generate_write_seconds']:>11.1f} {r['cohort_seconds']:>9.1f} "
                     f"{r['total_seconds']:>8.1f} {r['patients_per_minute']:>13,} {r['peak_rss_mib']:>12.0f} "
                     f"{r['rows_total']:>11,} {r['bytes_on_disk'] / MIB:>11.1f}")
    for name, target in targets.items():
        met = {True: "met", False: "NOT met", None: "not measurable"}[target["met"]]
        extra = f" (sizes {target['sizes']})" if target.get("sizes") else ""
        lines.append(f"target {name} {target['target']}: measured {target['measured']}{extra}: {met}")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line
def _size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be a whole number of patients, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be a positive number of patients, got {value}")
    if not MIN_PATIENTS <= value <= MAX_PATIENTS:
        raise argparse.ArgumentTypeError(
            f"size must lie between {MIN_PATIENTS} and {MAX_PATIENTS:,} patients (the site profile's bounds), got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.synth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=_size, default=list(DEFAULT_SIZES), metavar="N",
                        help="site sizes in patients, one child process each (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result JSON (default: build/bench/synth.json)")
    parser.add_argument("--tmp-dir", type=Path, default=None,
                        help="where the temporary site folders go (default: the system temporary folder)")
    parser.add_argument("--worker", nargs=2, metavar=("PATIENTS", "DIR"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.worker:
        patients, work_dir = args.worker
        try:
            patients = _size(patients)
        except argparse.ArgumentTypeError as error:
            parser.error(f"--worker: {error}")
        if not Path(work_dir).is_dir():
            parser.error(f"--worker: {work_dir} is not a folder")
        return _worker_main(patients, Path(work_dir))
    if len(set(args.sizes)) != len(args.sizes):
        parser.error(f"--sizes: each size once, got {args.sizes}")
    if args.out.is_dir():
        parser.error(f"--out: {args.out} is a folder; give the JSON file's path")
    if args.tmp_dir is not None and not args.tmp_dir.is_dir():
        parser.error(f"--tmp-dir: {args.tmp_dir} is not a folder")

    results = []
    for patients in args.sizes:
        print(f"{patients:,} patients: generating, writing and building the cohort in a fresh process ...",
              flush=True)
        try:
            record = measure_size(patients, args.tmp_dir)
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"  {record['total_seconds']:.1f} s, {record['patients_per_minute']:,} patients/min, "
              f"peak RSS {record['peak_rss_mib']:.0f} MiB", flush=True)
        results.append(record)
    targets = evaluate_targets(results)
    ratio = targets["peak_rss_ratio_1m_vs_100k"]
    data = {
        "benchmark": "synth",
        "description": "one site (profile 'sahlgrenska', seed 0): generate_site (all OMOP tables, Parquet) "
                       "then write_cohort, each size in a fresh child process, in a temporary folder",
        "site": SITE,
        "seed": SEED,
        "sizes": list(args.sizes),
        "results": results,
        "peak_rss_ratio": ratio["measured"],
        "peak_rss_ratio_sizes": ratio["sizes"],
        "targets": targets,
        "targets_met": {name: target["met"] for name, target in targets.items()},
        "all_targets_met": all(target["met"] is True for target in targets.values()),
        "rss_method": RSS_METHOD,
        "timing_method": "time.perf_counter around generate_site (generation + Parquet writing) and write_cohort "
                         "(reading, cohort building, cohort.parquet) in the child; interpreter start-up and "
                         "imports excluded (import_seconds, process_wall_seconds show them); progress bars off",
        "bytes_method": "sum of file sizes (st_size) under the site folder: omop/*.parquet, ground_truth.parquet, "
                        "cohort.parquet, attrition.json",
        "machine": machine_facts(),
        "git": git_state(),
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(args.out, data)
    print(format_table(results, targets))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
