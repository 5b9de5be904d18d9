"""The single door to one site's cohort, and the preprocessing every model shares.

`load_site(site_dir, split)` returns one site's features and labels for a
split, validated. Preprocessing is a fitted-transformer-like
`PreprocessingSpec` whose statistics are passed in, never learned silently:
they come from `FeatureStatistics` (counts, sums and sums of squares per
feature), which are aggregates a site can share. Summing the statistics of
several sites gives exactly the pooled statistics, which is how the
federated stage standardises without pooling records.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from compendium.stages import DATA_CARD_STAGE, SYNTHETIC_STAGE
from data_synth.features import COHORT_FILE, FEATURES, LABEL, SPLIT
from data_synth.generator import GROUND_TRUTH_FILE, true_risk

FEATURE_NAMES = tuple(f.name for f in FEATURES)
SPLITS = ("train", "test")
#: Skewed laboratory values are modelled on the log scale (a fixed transform, not learned).
LOG_FEATURES = ("nt_probnp", "creatinine")
#: Variables that may be missing get a 0/1 "was missing" indicator beside the imputed value.
MISSING_INDICATOR_FEATURES = ("nt_probnp", "creatinine", "egfr", "sodium", "potassium", "haemoglobin",
                              "systolic_bp", "lvef")
#: Columns of the model matrix: standardised features, then missing indicators.
MODEL_INPUTS = len(FEATURE_NAMES) + len(MISSING_INDICATOR_FEATURES)
#: Parquet metadata key under which a cohort file carries its FeatureSchema (provided data).
SCHEMA_METADATA_KEY = b"fedhf.feature_schema"


@dataclass(frozen=True)
class FeatureSchema:
    """The model's variables: names in column order, their kinds, fixed transforms, missing indicators.

    The synthetic cohort's schema is `SYNTHETIC_SCHEMA`; a provided dataset's
    schema comes from its dataset YAML and travels inside each site's cohort
    file, so every stage reads the same list from the data themselves.
    """

    features: tuple[str, ...]
    kinds: tuple[str, ...]
    log_features: tuple[str, ...] = ()
    indicator_features: tuple[str, ...] = ()
    #: Columns for subgroup results: {"age": <numeric feature>, "female": <binary feature>} (either may be absent).
    subgroups: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.kinds) != len(self.features):
            raise ValueError("FeatureSchema: one kind per feature")
        unknown = sorted((set(self.log_features) | set(self.indicator_features)) - set(self.features))
        if unknown:
            raise ValueError(f"FeatureSchema: transforms name unknown feature(s) {unknown}")

    @property
    def n_inputs(self) -> int:
        """Return the width of the model matrix (features plus missing indicators)."""
        return len(self.features) + len(self.indicator_features)

    def to_json(self) -> str:
        return json.dumps({"features": list(self.features), "kinds": list(self.kinds),
                           "log_features": list(self.log_features), "indicator_features": list(self.indicator_features),
                           "subgroups": dict(sorted(self.subgroups.items()))}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "FeatureSchema":
        data = json.loads(text)
        return cls(tuple(data["features"]), tuple(data["kinds"]), tuple(data["log_features"]),
                   tuple(data["indicator_features"]), dict(data.get("subgroups", {})))

    def __hash__(self) -> int:
        return hash(self.to_json())


SYNTHETIC_SCHEMA = FeatureSchema(FEATURE_NAMES, tuple(f.kind for f in FEATURES), LOG_FEATURES,
                                 MISSING_INDICATOR_FEATURES, {"age": "age", "female": "female"})


class CohortError(ValueError):
    """A cohort file is missing, unreadable or breaks the cohort's contract."""


@dataclass(frozen=True)
class SiteSplit:
    """One site's rows of one split: features (raw), labels, subgroup columns."""

    site: str
    split: str
    features: pd.DataFrame
    labels: np.ndarray
    sex: pd.Series
    age_band: pd.Series
    lace: np.ndarray
    schema: FeatureSchema = SYNTHETIC_SCHEMA

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> "SiteSplit":
        """Return the split restricted to the given row positions (in that order)."""
        rows = np.asarray(rows)
        return SiteSplit(self.site, self.split, self.features.iloc[rows].reset_index(drop=True), self.labels[rows],
                         self.sex.iloc[rows].reset_index(drop=True), self.age_band.iloc[rows].reset_index(drop=True),
                         self.lace[rows], self.schema)


def stage1_dir(build_dir: Path) -> Path:
    """Return the build folder's stage-1 folder: the data card of provided data, else the synthetic EHR.

    A build folder holds one or the other, never both (provided data build
    under build/<profile>-<dataset>/).
    """
    card = Path(build_dir) / DATA_CARD_STAGE
    return card if card.is_dir() else Path(build_dir) / SYNTHETIC_STAGE


def site_dir(build_dir: Path, site: str) -> Path:
    """Return a site's stage-1 folder within a profile's build folder."""
    return stage1_dir(build_dir) / "sites" / site


def age_band(age: pd.Series) -> pd.Series:
    """Return the age band used for subgroup results: <70, 70-79, 80-89, 90+."""
    return pd.cut(age, bins=[-np.inf, 70, 80, 90, np.inf], right=False,
                  labels=["<70", "70-79", "80-89", "90+"]).astype(str)


def cohort_schema(table: pa.Table) -> FeatureSchema:
    """Return the feature schema a cohort table carries in its metadata (the synthetic one if none)."""
    metadata = table.schema.metadata or {}
    if SCHEMA_METADATA_KEY in metadata:
        return FeatureSchema.from_json(metadata[SCHEMA_METADATA_KEY])
    return SYNTHETIC_SCHEMA


def read_cohort(path: Path) -> pd.DataFrame:
    """Return a validated cohort table (every feature, the label in {0,1}, the split).

    The table's feature schema is in `frame.attrs["schema"]`.
    """
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"cohort file {path} does not exist; run stage 1 (`make all`) first")
    try:
        # Opened by Python, not by Arrow, so a node's isolation guard (fl.flower.isolation) sees every read.
        with open(path, "rb") as handle:
            table = pq.read_table(handle)
    except PermissionError:
        raise
    except (pa.ArrowInvalid, OSError) as error:
        raise CohortError(f"{path} is not a readable Parquet file ({error})") from None
    try:
        schema = cohort_schema(table)
    except (ValueError, KeyError, TypeError) as error:
        raise CohortError(f"{path}: unreadable feature schema in the file's metadata ({error}); "
                          "rebuild stage 1") from None
    missing = [c for c in (*schema.features, LABEL, SPLIT) if c not in table.column_names]
    if missing:
        raise CohortError(f"{path}: missing column(s) {missing}")
    frame = table.to_pandas()
    labels = frame[LABEL]
    bad = ~labels.isin([0, 1])
    if bad.any():
        examples = labels[bad].head(3).tolist()
        raise CohortError(f"{path}: column {LABEL!r} must be 0 or 1; {int(bad.sum())} row(s) are not, "
                          f"e.g. {examples} at rows {list(labels[bad].index[:3])}")
    bad_split = ~frame[SPLIT].isin(SPLITS)
    if bad_split.any():
        raise CohortError(f"{path}: column {SPLIT!r} must be one of {SPLITS}; found "
                          f"{sorted(frame.loc[bad_split, SPLIT].astype(str).unique())[:3]}")
    for name in schema.features:
        if not pd.api.types.is_numeric_dtype(frame[name]):
            raise CohortError(f"{path}: feature {name!r} must be numeric, found {frame[name].dtype}")
    frame.attrs["schema"] = schema
    return frame


def load_site(directory: Path, split: str, site: str | None = None) -> SiteSplit:
    """Return one site's features and labels for `split` ("train", "test" or "all")."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {SPLITS + ('all',)}, got {split!r}")
    directory = Path(directory)
    frame = read_cohort(directory / COHORT_FILE)
    if split != "all":
        frame = frame.loc[frame[SPLIT] == split]
    schema = frame.attrs["schema"]
    frame = frame.reset_index(drop=True)
    female, age = schema.subgroups.get("female"), schema.subgroups.get("age")
    unknown = pd.Series(np.full(len(frame), "all", dtype=object))
    return SiteSplit(
        site=site or directory.name, split=split,
        features=frame[list(schema.features)].astype(float),
        labels=frame[LABEL].to_numpy(dtype=np.int64),
        sex=pd.Series(np.where(frame[female] == 1, "women", np.where(frame[female] == 0, "men", "unknown")))
        if female else unknown,
        age_band=age_band(frame[age]).replace("nan", "unknown") if age else unknown,
        lace=frame["lace_score"].to_numpy(dtype=float) if "lace_score" in frame else np.full(len(frame), np.nan),
        schema=schema,
    )


def load_oracle_risk(directory: Path, split: str = "test") -> np.ndarray:
    """Return the generator's true risk for the site's `split` rows, in load_site's row order."""
    directory = Path(directory)
    cohort = read_cohort(directory / COHORT_FILE)
    if split != "all":
        cohort = cohort.loc[cohort[SPLIT] == split]
    truth_path = directory / GROUND_TRUTH_FILE
    if not truth_path.is_file():
        raise CohortError(f"{truth_path} not found: the oracle exists only for synthetic data")
    truth = pd.read_parquet(truth_path, columns=["visit_occurrence_id", "true_risk_30d"])
    try:
        return true_risk(cohort["index_visit_id"], truth)
    except ValueError as error:
        raise CohortError(f"{truth_path}: {error}") from None


# ---------------------------------------------------------------- preprocessing
def transformed_features(features: pd.DataFrame, schema: FeatureSchema = SYNTHETIC_SCHEMA) -> pd.DataFrame:
    """Return the schema's features as floats with the fixed log transforms applied (missing stays NaN).

    This is the scale `FeatureStatistics` summarise and `PreprocessingSpec` standardises.
    """
    out = features[list(schema.features)].astype(float).copy()
    for name in schema.log_features:
        out[name] = np.log(out[name].clip(lower=1e-3))
    return out


@dataclass(frozen=True)
class FeatureStatistics:
    """Per-feature aggregates of one or more sites: non-missing count, sum, sum of squares, rows."""

    count: np.ndarray
    total: np.ndarray
    total_squares: np.ndarray
    rows: int

    @classmethod
    def of(cls, features: pd.DataFrame, schema: FeatureSchema = SYNTHETIC_SCHEMA) -> "FeatureStatistics":
        """Return the statistics of a feature table (after the fixed log transforms)."""
        values = transformed_features(features, schema).to_numpy()
        present = ~np.isnan(values)
        filled = np.where(present, values, 0.0)
        return cls(present.sum(axis=0).astype(float), filled.sum(axis=0), (filled**2).sum(axis=0), len(values))

    @classmethod
    def of_sites(cls, site_features: list[pd.DataFrame], schema: FeatureSchema = SYNTHETIC_SCHEMA) -> "FeatureStatistics":
        """Return the sum of each site's statistics: what the federated statistics round computes."""
        parts = [cls.of(features, schema) for features in site_features]
        return sum(parts[1:], parts[0])

    def __add__(self, other: "FeatureStatistics") -> "FeatureStatistics":
        return FeatureStatistics(self.count + other.count, self.total + other.total,
                                 self.total_squares + other.total_squares, self.rows + other.rows)

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {"count": self.count, "total": self.total, "total_squares": self.total_squares,
                "rows": np.array([self.rows], dtype=float)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "FeatureStatistics":
        return cls(np.asarray(arrays["count"], float), np.asarray(arrays["total"], float),
                   np.asarray(arrays["total_squares"], float), int(np.asarray(arrays["rows"]).ravel()[0]))


@dataclass(frozen=True)
class PreprocessingSpec:
    """Mean imputation, standardisation and missing indicators with given statistics.

    Imputation is at the (federated) mean: a value missing at a site, or a
    feature a site does not record at all, becomes the mean over the sites
    that observed it, with its missing indicator set.
    """

    mean: np.ndarray
    std: np.ndarray
    schema: FeatureSchema = SYNTHETIC_SCHEMA

    @classmethod
    def from_statistics(cls, stats: FeatureStatistics, schema: FeatureSchema = SYNTHETIC_SCHEMA,
                        unobserved: str = "error") -> "PreprocessingSpec":
        """Return the spec of the statistics; a feature nobody observed is an error, or with
        `unobserved="constant"` (a local model at a site lacking the feature) a constant 0 input."""
        empty = [n for n, c in zip(schema.features, stats.count) if c == 0]
        if empty and unobserved != "constant":
            raise ValueError(f"no observed values for feature(s) {empty}: cannot standardise; "
                             "at least one site must record each feature")
        count = np.where(stats.count > 0, stats.count, 1.0)
        mean = stats.total / count
        variance = np.maximum(stats.total_squares / count - mean**2, 0.0)
        std = np.sqrt(variance)
        return cls(mean=mean, std=np.where(std > 0, std, 1.0), schema=schema)

    @property
    def key(self) -> str:
        """Return a short content hash (to cache data transformed with this spec)."""
        import hashlib

        return hashlib.sha256(np.ascontiguousarray(self.mean).tobytes() + np.ascontiguousarray(self.std).tobytes()
                              + self.schema.to_json().encode()).hexdigest()[:16]

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.schema.features + tuple(f"{name}_missing" for name in self.schema.indicator_features)

    @property
    def n_outputs(self) -> int:
        return len(self.output_names)

    def transform(self, features: pd.DataFrame) -> np.ndarray:
        """Return the model matrix (float32): standardised features, imputed at the mean, plus indicators."""
        values = transformed_features(features, self.schema).to_numpy()
        missing = np.isnan(values)
        standardised = np.where(missing, 0.0, (values - self.mean) / self.std)
        indicator_columns = [self.schema.features.index(name) for name in self.schema.indicator_features]
        return np.hstack([standardised, missing[:, indicator_columns].astype(float)]).astype(np.float32)
