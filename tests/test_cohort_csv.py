"""A real extract may come as CSV: the same tables as CSV give the same cohort as Parquet."""
from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data_synth import omop
from data_synth.cohort import CohortSpec, build_cohort
from data_synth.generator import generate_site
from data_synth.sites import site_profile


def test_csv_extract_gives_the_parquet_cohort(tmp_path):
    generate_site(site_profile("sahlgrenska", {"patients": 800}), 9, tmp_path / "site", progress=False)
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    for table in omop.TABLE_NAMES:
        data = pq.read_table(tmp_path / "site" / "omop" / f"{table}.parquet")
        plain = pa.table({name: (col.cast(pa.string()) if pa.types.is_dictionary(col.type) else col)
                          for name, col in zip(data.column_names, data.columns)})
        pacsv.write_csv(plain, csv_dir / f"{table}.csv")
    spec = CohortSpec(seed=9)
    from_parquet, attrition_parquet = build_cohort(tmp_path / "site" / "omop", spec, "s", progress=False)
    from_csv, attrition_csv = build_cohort(csv_dir, spec, "s", progress=False)
    pd.testing.assert_frame_equal(from_parquet, from_csv)
    assert attrition_parquet == attrition_csv
