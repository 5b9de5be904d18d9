"""Stage 1 for provided data: read each site's table (or OMOP folder), validate it, write its cohort.

The cohort files have the same layout as the synthetic ones (one row per
patient: the features, `readmitted_30d`, `split`, `site`), so stages 2-5
read them through `fl.data.load_site` unchanged. The feature schema (names,
kinds, log transforms, missing indicators) is written into each cohort
file's metadata. The patient identifier, if given, is used only to drop
duplicate patients (the first row in file order is kept) and is never
written.

A feature a site lacks (`lacks:` in the dataset YAML) is written as missing
at that site; the federated statistics round then imputes it with the mean
over the sites that record it, and its missing indicator tells the model
which rows were imputed (see docs/bring_your_own_data.md).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from compendium.artifacts import atomic_write
from data_synth.cohort import CohortSpec, assign_split, write_cohort
from data_synth.dataset import Dataset, DatasetError, FeatureSpec
from data_synth.features import ATTRITION_FILE, COHORT_FILE, FEATURES, LABEL, SPLIT, Feature
from fl.data import SCHEMA_METADATA_KEY, SYNTHETIC_SCHEMA, FeatureSchema

SITES_DIR = "sites"
#: Attrition steps of a flat table, in order (count of rows after each).
ATTRITION_STEPS = {
    "rows": "rows of the site in the table",
    "excluded_outcome_missing": "excluded: outcome missing",
    "excluded_duplicate_patient": "excluded: repeat rows of a patient (first kept)",
    "cohort": "patients in the cohort",
    "readmitted_30d": "with the outcome (readmitted)",
}
#: Columns an OMOP cohort file loses before it is kept: identifiers and dates stay out of artifacts.
OMOP_IDENTIFIERS = ("person_id", "index_visit_id", "index_admission_date", "index_discharge_date")


@dataclass
class SiteCohort:
    """What stage 1 produced for one provided site."""

    site: str
    folder: Path
    cohort: pd.DataFrame
    attrition: dict[str, int]

    @property
    def outcome_classes(self) -> int:
        return int(self.cohort[LABEL].nunique())


# ---------------------------------------------------------------- values
def _text(values: pd.Series) -> pd.Series:
    """Return values as canonical text (1, 1.0 and "1" all become "1"; True becomes "true"), NaN kept."""
    out = pd.Series(np.nan, index=values.index, dtype=object)
    present = values.notna()
    if pd.api.types.is_bool_dtype(values):
        return values.map({True: "true", False: "false"})
    numbers = pd.to_numeric(values.where(present), errors="coerce")
    is_number = numbers.notna()
    integral = is_number & (numbers % 1 == 0)
    out[integral] = numbers[integral].astype("int64").astype(str)
    out[is_number & ~integral] = numbers[is_number & ~integral].map(repr)
    rest = present & ~is_number
    out[rest] = values[rest].astype(str).str.strip().str.lower().replace({"true": "true", "false": "false"})
    out[rest & values.astype(str).str.strip().eq("")] = np.nan
    return out


def _scalar_text(value) -> str:
    return str(_text(pd.Series([value], dtype=object)).iloc[0])


def _examples(values: pd.Series, limit: int = 3) -> list[str]:
    return [str(v)[:20] for v in pd.unique(values.dropna())[:limit]]


def _where(dataset: Dataset, site: str, column: str) -> str:
    return f"{dataset.source(site).name}: column {column!r} at site {site!r}"


def level_column(feature: str, level) -> str:
    """Return the model column of a categorical level (`nyha` level "III" -> `nyha_III`)."""
    return f"{feature}_{re.sub(r'[^A-Za-z0-9]+', '_', str(level)).strip('_')}"


def model_features(dataset: Dataset) -> list[Feature]:
    """Return the model variables of a flat dataset (categorical features expanded, reference level dropped)."""
    out = []
    for name, spec in dataset.spec.columns.features.items():
        source = f"column {spec.column or name}"
        if spec.type == "categorical":
            for level in spec.levels[1:]:
                out.append(Feature(level_column(name, level), "binary",
                                   f"{source} = {level} (reference: {spec.levels[0]})", spec.why))
        else:
            out.append(Feature(name, spec.type, source, spec.why))
    return out


# ---------------------------------------------------------------- reading
def read_table(path: Path) -> pd.DataFrame:
    """Return a flat table as read (CSV: every column as text; Parquet: its own types)."""
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=True)
        return pq.read_table(path).to_pandas()
    except (OSError, ValueError, pa.ArrowException, pd.errors.ParserError) as error:
        raise DatasetError(f"{path}: cannot read the table ({str(error)[:200]}); "
                           "check that it is a valid CSV (with a header row) or Parquet file") from None


def site_rows(dataset: Dataset, site: str, tables: dict[Path, pd.DataFrame]) -> pd.DataFrame:
    """Return the raw rows of `site` (filtered by the site column where sites share a table)."""
    path = dataset.source(site)
    if path not in tables:
        tables[path] = read_table(path)
    table = tables[path]
    columns = dataset.spec.columns
    if columns.site is None:
        return table
    if columns.site not in table.columns:
        raise DatasetError(f"{path.name}: site column {columns.site!r} (columns.site) is not in the table; "
                           f"its columns are {list(table.columns)[:20]}")
    values = _text(table[columns.site])
    sharing = [name for name in dataset.sites if dataset.source(name) == path]
    site_values = {name: dataset.spec.sites[name].site_value for name in sharing}
    wanted = {name: _scalar_text(name if value is None else value) for name, value in site_values.items()}
    unknown = sorted(set(values.dropna()) - set(wanted.values()))
    if unknown:
        raise DatasetError(f"{path.name}: column {columns.site!r} has value(s) {unknown[:5]} that match no site in "
                           f"{dataset.path.name}; add those sites, or set `site_value:` on the sites they belong to")
    rows = table.loc[values == wanted[site]]
    if rows.empty:
        shown = dataset.spec.sites[site].site_value if dataset.spec.sites[site].site_value is not None else site
        raise DatasetError(f"{path.name}: no rows for site {site!r} (column {columns.site!r} = {shown!r}); "
                           "check `site_value:`")
    return rows


def _numeric(dataset: Dataset, site: str, column: str, values: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(values):
        raise DatasetError(f"{_where(dataset, site, column)} is declared numeric but holds true/false; "
                           "declare it `type: binary`")
    text = values.astype(object).where(values.notna())
    blank = text.astype(str).str.strip().eq("") & text.notna()
    numbers = pd.to_numeric(text.where(~blank), errors="coerce")
    bad = numbers.isna() & text.notna() & ~blank
    if bad.any():
        raise DatasetError(f"{_where(dataset, site, column)}: {int(bad.sum())} value(s) cannot be parsed as numbers, "
                           f"e.g. {_examples(text[bad])}; fix them, leave them empty (missing), or declare the "
                           "feature `type: categorical` with its levels")
    return numbers.astype(float)


def _binary(dataset: Dataset, site: str, column: str, values: pd.Series, positive) -> pd.Series:
    text = _text(values)
    present = text.dropna()
    if positive is None:
        allowed = {"0": 0.0, "1": 1.0, "true": 1.0, "false": 0.0}
        bad = text.notna() & ~text.isin(list(allowed))
        if bad.any():
            raise DatasetError(f"{_where(dataset, site, column)} is declared binary but holds {_examples(values[bad])}"
                               "; binary values must be 0/1 or true/false, or give `positive:` (the value meaning 1)")
        return text.map(allowed).astype(float)
    distinct = sorted(set(present))
    if len(distinct) > 2:
        raise DatasetError(f"{_where(dataset, site, column)} is declared binary but has {len(distinct)} distinct "
                           f"values, e.g. {_examples(values)}; declare it categorical with `levels:`")
    return pd.Series(np.where(text.isna(), np.nan, (text == _scalar_text(positive)).astype(float)), index=values.index)


def _categorical(dataset: Dataset, site: str, name: str, column: str, values: pd.Series,
                 spec: FeatureSpec) -> dict[str, pd.Series]:
    text = _text(values)
    levels = [_scalar_text(level) for level in spec.levels]
    bad = text.notna() & ~text.isin(levels)
    if bad.any():
        raise DatasetError(f"{_where(dataset, site, column)} has value(s) {_examples(values[bad])} not among the "
                           f"declared levels {spec.levels}; add them to `levels:` or recode them")
    return {level_column(name, raw): pd.Series(np.where(text.isna(), np.nan, (text == level).astype(float)),
                                               index=values.index)
            for raw, level in zip(spec.levels[1:], levels[1:])}


def outcome_labels(dataset: Dataset, site: str, rows: pd.DataFrame) -> pd.Series:
    """Return the outcome as 1.0 / 0.0 / NaN (missing); more than two values is an error."""
    outcome = dataset.spec.columns.outcome
    text = _text(rows[outcome.column])
    distinct = sorted(set(text.dropna()))
    if len(distinct) > 2:
        raise DatasetError(f"{_where(dataset, site, outcome.column)}: the outcome has {len(distinct)} distinct values "
                           f"({_examples(rows[outcome.column], 5)}); it must have two (the positive value {outcome.positive!r} and one other)")
    return pd.Series(np.where(text.isna(), np.nan, (text == _scalar_text(outcome.positive)).astype(float)),
                     index=rows.index)


def site_cohort(dataset: Dataset, site: str, rows: pd.DataFrame, seed: int, test_fraction: float) -> tuple[pd.DataFrame, dict]:
    """Return one site's cohort (features, label, split, site; no identifiers) and its attrition counts."""
    columns = dataset.spec.columns
    lacks = set(dataset.spec.sites[site].lacks)
    needed = [columns.outcome.column, *(spec.column or name for name, spec in columns.features.items()
                                        if name not in lacks)]
    needed += [c for c in (columns.patient_id, columns.split.column if columns.split else None) if c]
    missing = [c for c in dict.fromkeys(needed) if c not in rows.columns]
    if missing:
        raise DatasetError(f"{dataset.source(site).name}: site {site!r} has no column(s) {missing}; its columns are "
                           f"{list(rows.columns)[:20]}. Fix the name in {dataset.path.name}, or, if the site does not "
                           f"record a feature, list it under sites.{site}.lacks")
    attrition = {"rows": int(len(rows))}
    labels = outcome_labels(dataset, site, rows)
    keep = labels.notna()
    attrition["excluded_outcome_missing"] = int((~keep).sum())
    rows, labels = rows.loc[keep], labels.loc[keep]
    if columns.patient_id:
        ids = rows[columns.patient_id]
        if ids.isna().any():
            raise DatasetError(f"{_where(dataset, site, columns.patient_id)}: {int(ids.isna().sum())} row(s) have no "
                               "patient identifier; fill them or drop `columns.patient_id`")
        first = ~_text(ids).duplicated(keep="first").to_numpy()
        attrition["excluded_duplicate_patient"] = int((~first).sum())
        rows, labels = rows.loc[first], labels.loc[first]
    else:
        attrition["excluded_duplicate_patient"] = 0
    if len(rows) < 2:
        raise DatasetError(f"site {site!r}: {len(rows)} usable row(s) in {dataset.source(site).name}; a site needs "
                           "at least two patients (one to train on, one to test on)")
    features: dict[str, pd.Series] = {}
    for name, spec in columns.features.items():
        column = spec.column or name
        if name in lacks:
            expanded = [feature.name for feature in model_features(dataset) if feature.name == name or
                        (spec.type == "categorical" and feature.name.startswith(f"{name}_"))]
            features.update({column: pd.Series(np.nan, index=rows.index) for column in expanded})
        elif spec.type == "numeric":
            features[name] = _numeric(dataset, site, column, rows[column])
        elif spec.type == "binary":
            features[name] = _binary(dataset, site, column, rows[column], spec.positive)
        else:
            features.update(_categorical(dataset, site, name, column, rows[column], spec))
    y = labels.to_numpy().astype(np.int8)
    if columns.split is not None:
        text = _text(rows[columns.split.column])
        train, test = _scalar_text(columns.split.train), _scalar_text(columns.split.test)
        bad = ~text.isin([train, test])
        if bad.any():
            raise DatasetError(f"{_where(dataset, site, columns.split.column)}: split values must be {train!r} "
                               f"(train) or {test!r} (test); found {_examples(rows.loc[bad, columns.split.column])}")
        split = np.where(text == test, "test", "train").astype(object)
    else:
        rng = np.random.default_rng(np.random.SeedSequence([seed, *site.encode()]))
        split = assign_split(y, test_fraction, rng)
    cohort = pd.DataFrame({"site": site, **{name: values.to_numpy() for name, values in features.items()}})
    cohort[LABEL] = y
    cohort[SPLIT] = split
    attrition["cohort"] = int(len(cohort))
    attrition["readmitted_30d"] = int(y.sum())
    return cohort, attrition


def feature_schema(dataset: Dataset, cohorts: dict[str, pd.DataFrame]) -> FeatureSchema:
    """Return the dataset's schema: missing indicators for every variable missing anywhere (one per categorical)."""
    features = model_features(dataset)
    names = tuple(feature.name for feature in features)
    columns = dataset.spec.columns
    missing_anywhere = {name for name in names if any(cohort[name].isna().any() for cohort in cohorts.values())}
    indicators = []
    for name, spec in columns.features.items():
        expanded = [level_column(name, level) for level in spec.levels[1:]] if spec.type == "categorical" else [name]
        if any(column in missing_anywhere for column in expanded):
            indicators.append(expanded[0])
    logs = tuple(name for name, spec in columns.features.items() if spec.log)
    return FeatureSchema(names, tuple(feature.kind for feature in features), logs, tuple(indicators),
                         dict(dataset.spec.subgroups))


def _write(folder: Path, cohort: pd.DataFrame, schema: FeatureSchema | None, attrition: dict) -> None:
    table = pa.Table.from_pandas(cohort, preserve_index=False)
    table = table.replace_schema_metadata({SCHEMA_METADATA_KEY: schema.to_json().encode()} if schema else None)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / COHORT_FILE, lambda tmp: pq.write_table(table, tmp, compression="snappy"))
    atomic_write(folder / ATTRITION_FILE, lambda tmp: tmp.write_text(json.dumps(attrition, indent=2) + "\n"))


def _check_outcome_overall(dataset: Dataset, cohorts: dict[str, pd.DataFrame]) -> None:
    labels = np.concatenate([cohort[LABEL].to_numpy() for cohort in cohorts.values()])
    if np.unique(labels).size < 2:
        outcome = dataset.spec.columns.outcome if dataset.spec.columns else None
        where = f" (column {outcome.column!r}, positive value {outcome.positive!r})" if outcome else ""
        raise DatasetError(f"{dataset.path.name}: every patient at every site has {LABEL}={int(labels[0])}{where}; "
                           "a model needs both outcomes. Check `positive:` in the outcome mapping")


def run(dataset: Dataset, spec: CohortSpec, output_dir: Path, progress: bool = False) -> tuple[dict[str, SiteCohort], FeatureSchema]:
    """Read, validate and write every site's cohort under output_dir/sites/<site>/; return them and the schema."""
    if dataset.kind == "omop":
        return _run_omop(dataset, spec, output_dir, progress)
    tables: dict[Path, pd.DataFrame] = {}
    built = {}
    for site in dataset.sites:
        built[site] = site_cohort(dataset, site, site_rows(dataset, site, tables), spec.seed, spec.test_fraction)
    cohorts = {site: cohort for site, (cohort, _) in built.items()}
    _check_outcome_overall(dataset, cohorts)
    schema = feature_schema(dataset, cohorts)
    results = {}
    for site, (cohort, attrition) in built.items():
        folder = Path(output_dir) / SITES_DIR / site
        _write(folder, cohort, schema, attrition)
        results[site] = SiteCohort(site, folder, cohort, attrition)
    return results, schema


def _run_omop(dataset: Dataset, spec: CohortSpec, output_dir: Path, progress: bool):
    """OMOP sites: the cohort builder, then identifiers and dates dropped; single-class sites allowed."""
    results, cohorts = {}, {}
    for site in dataset.sites:
        folder = Path(output_dir) / SITES_DIR / site
        try:
            write_cohort(dataset.source(site), folder, spec, site, progress=progress)
        except ValueError as error:
            raise DatasetError(f"{dataset.path.name}: sites.{site}.omop: {error}") from None
        cohort = pd.read_parquet(folder / COHORT_FILE).drop(columns=list(OMOP_IDENTIFIERS))
        attrition = json.loads((folder / ATTRITION_FILE).read_text())
        attrition.pop("extra", None)
        _write(folder, cohort, None, attrition)
        cohorts[site] = cohort
        results[site] = SiteCohort(site, folder, cohort, attrition)
    _check_outcome_overall(dataset, cohorts)
    return results, SYNTHETIC_SCHEMA


def site_overview(results: dict[str, SiteCohort]) -> pd.DataFrame:
    """Return per site: patients, readmitted n (%), test patients, outcome classes (counts under 5 suppressed)."""
    from compendium.disclosure import count_cell, count_percent_cell

    rows = {}
    for site, result in results.items():
        labels = result.cohort[LABEL].to_numpy()
        rows[site] = {
            "patients in the cohort": count_cell(labels.size),
            "readmitted, n (%)": count_percent_cell(int(labels.sum()), labels.size),
            "test-split patients": count_cell(int((result.cohort[SPLIT] == "test").sum())),
            "outcome classes": "both" if result.outcome_classes == 2 else
            "one only: no local model (it still trains in the federation)",
        }
    return pd.DataFrame(rows)


def distribution_features(dataset: Dataset, limit: int = 4) -> list[str]:
    """Return up to `limit` numeric features to draw as distributions (log-scale ones first)."""
    if dataset.kind == "omop":
        return ["nt_probnp", "egfr", "sodium", "haemoglobin"]
    numeric = [(not spec.log, name) for name, spec in dataset.spec.columns.features.items()
               if spec.type == "numeric"]
    return [name for _, name in sorted(numeric, key=lambda entry: entry[0])][:limit]


def categorical_groups(dataset: Dataset) -> dict[str, list[str]]:
    """Return each categorical feature's model columns (its levels after the reference)."""
    if dataset.kind == "omop":
        return {}
    return {name: [level_column(name, level) for level in spec.levels[1:]]
            for name, spec in dataset.spec.columns.features.items() if spec.type == "categorical"}


def variables(dataset: Dataset) -> list[Feature]:
    """Return the model variables with their source and reason (the data card's variables table)."""
    return list(FEATURES) if dataset.kind == "omop" else model_features(dataset)


def summary(profile, dataset: Dataset, results: dict[str, SiteCohort], schema: FeatureSchema) -> dict:
    """Return stage 1's summary.json for provided data: per site counts, classes, features it lacks."""
    sites = {}
    for site, result in results.items():
        labels = result.cohort[LABEL].to_numpy()
        test = result.cohort[SPLIT].to_numpy() == "test"
        sites[site] = {
            "patients": int(result.attrition.get("persons", result.attrition.get("rows", labels.size))),
            "index_admissions": int(labels.size),
            "readmitted_30d": int(labels.sum()),
            "readmission_rate": round(float(labels.mean()), 4),
            "test_index_admissions": int(test.sum()),
            "outcome_classes": result.outcome_classes,
            "lacks": list(dataset.spec.sites[site].lacks),
        }
    all_labels = np.concatenate([result.cohort[LABEL].to_numpy() for result in results.values()])
    return {
        "stage": "01_data_card",
        "profile": profile.profile,
        "seed": profile.seed,
        "data": {"kind": "provided", "name": dataset.name, "description": dataset.spec.description,
                 "source": dataset.kind, "file": dataset.path.name},
        "features": list(schema.features),
        "missing_indicators": list(schema.indicator_features),
        "sites": sites,
        "total": {"index_admissions": int(all_labels.size), "readmission_rate": round(float(all_labels.mean()), 4)},
        "attrition": {site: result.attrition for site, result in results.items()},
    }
