"""The synthetic-data benchmark runs end to end at tiny sizes and writes a sane, complete JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from benchmarks.synth import SEED, SITE
from data_synth import omop
from data_synth.cohort import CohortSpec, write_cohort
from data_synth.features import COHORT_FILE
from data_synth.generator import GROUND_TRUTH_FILE, generate_site
from data_synth.sites import site_profile

REPO = Path(__file__).resolve().parents[1]
SIZES = (2000, 4000)


def _run(*args: str, tmp_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "benchmarks.synth", *args, "--tmp-dir", str(tmp_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _rows_generated_here(patients: int, folder: Path) -> tuple[dict[str, int], int]:
    """Return each table's rows and the readmitted count for the benchmark's site and seed, generated in this process.

    Tables are read whole here (the benchmark reads Parquet footers in its child), so a count the
    benchmark misreports or takes from another table or size shows up as a difference.
    """
    omop_dir = generate_site(site_profile(SITE, {"patients": patients}), SEED, folder, progress=False)
    _, attrition = write_cohort(omop_dir, folder, CohortSpec(seed=SEED), SITE, progress=False)
    rows = {table: pq.read_table(omop.table_path(omop_dir, table)).num_rows for table in omop.SCHEMAS}
    rows["ground_truth"] = pq.read_table(folder / GROUND_TRUTH_FILE).num_rows
    rows["cohort"] = pq.read_table(folder / COHORT_FILE).num_rows
    return rows, attrition.readmitted_30d


def test_benchmark_writes_complete_json_and_cleans_up(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "bench" / "synth.json"  # parent folder does not exist yet
    result = _run("--sizes", *map(str, SIZES), "--out", str(out), tmp_dir=scratch)
    assert result.returncode == 0, result.stderr
    assert "patients/min" in result.stdout
    assert list(scratch.iterdir()) == []  # every temporary site folder removed
    assert [p.name for p in out.parent.iterdir()] == ["synth.json"]  # no temporary JSON left

    data = json.loads(out.read_text())
    assert data["sizes"] == list(SIZES)
    assert [r["patients"] for r in data["results"]] == list(SIZES)
    for r in data["results"]:
        assert r["generate_write_seconds"] > 0 and r["cohort_seconds"] > 0
        assert r["total_seconds"] == pytest.approx(r["generate_write_seconds"] + r["cohort_seconds"], abs=2e-3)
        assert r["patients_per_minute"] > 0
        assert r["patients_per_minute"] == pytest.approx(r["patients"] / r["total_seconds"] * 60, rel=0.02)
        assert r["peak_rss_mib"] > 0 and r["peak_rss_generation_mib"] <= r["peak_rss_mib"]
        assert r["ru_maxrss_wait4_mib"] > 0
        assert set(r["rows"]) == {*omop.SCHEMAS, "ground_truth", "cohort"}
        assert r["rows"]["person"] == r["rows"]["ground_truth"] == r["patients"]
        assert 0 < r["rows"]["cohort"] <= r["patients"]
        assert r["rows_total"] == sum(r["rows"].values())
        assert 0 < r["cohort_readmitted_30d"] < r["rows"]["cohort"]
        assert r["bytes_on_disk"] == sum(r["bytes_by_file"].values()) > 0
        assert {f"omop/{t}.parquet" for t in omop.SCHEMAS} <= set(r["bytes_by_file"])
    small, large = data["results"]
    assert large["rows"]["measurement"] > small["rows"]["measurement"]
    # Exact counts, generated and counted again here (the smaller size: about 2 s).
    rows, readmitted = _rows_generated_here(small["patients"], tmp_path / "here")
    assert small["rows"] == rows
    assert small["cohort_readmitted_30d"] == readmitted
    assert all(count > 0 for count in rows.values()), rows  # every table has rows at this size

    ratio = data["peak_rss_ratio"]
    assert ratio == pytest.approx(large["peak_rss_mib"] / small["peak_rss_mib"], abs=1e-3)
    assert data["peak_rss_ratio_sizes"] == list(SIZES)
    targets = data["targets"]
    assert targets["patients_per_minute"]["threshold"] == 1_000_000
    assert targets["patients_per_minute"]["met"] == all(r["patients_per_minute"] >= 1_000_000 for r in data["results"])
    assert targets["peak_rss_ratio_1m_vs_100k"]["threshold"] == 1.5
    assert targets["peak_rss_ratio_1m_vs_100k"]["measured"] == ratio
    assert targets["peak_rss_ratio_1m_vs_100k"]["met"] == (ratio <= 1.5)
    assert data["targets_met"] == {name: t["met"] for name, t in targets.items()}
    assert isinstance(data["all_targets_met"], bool)
    assert "VmHWM" in data["rss_method"]

    machine = data["machine"]
    assert machine["cpu_count"] >= 1 and machine["python"] and machine["numpy"] and machine["pyarrow"]
    assert "commit" in data["git"] and data["created_utc"]


@pytest.mark.parametrize("sizes, message", [
    (["0"], "positive"),
    (["-5"], "positive"),
    (["many"], "whole number"),
    (["10"], "between 50"),
    (["2000", "2000"], "each size once"),
])
def test_benchmark_rejects_bad_sizes(tmp_path, sizes, message):
    result = _run("--sizes", *sizes, "--out", str(tmp_path / "synth.json"), tmp_dir=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "synth.json").exists()
