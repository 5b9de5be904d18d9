"""A provided dataset's description (dataset YAML): its sites, where their data are, how to read them.

The analyst who brings their own data writes one YAML file (see
docs/bring_your_own_data.md) naming 2 to 10 sites and, per site, either an
OMOP CDM folder (Parquet or CSV tables, read by the cohort builder) or one
flat table (CSV or Parquet) plus the column mapping shared by all flat
sites: the outcome column and its positive value, an optional site column
(when sites share one file), the feature columns with their types, an
optional patient identifier (used only to drop duplicate patients, never
written anywhere) and an optional split column.

Paths in the YAML are relative to the YAML file. `load_dataset` validates the
whole file before any work and raises `DatasetError` naming the file and the
dotted key; errors in the data themselves are found by `data_synth.provided`.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_synth.features import KEY_COLUMNS, LABEL, SCORE_COLUMNS, SPLIT

MIN_SITES, MAX_SITES = 2, 10
TABLE_SUFFIXES = (".csv", ".parquet")
#: Names a feature may not take: they are the cohort file's own columns.
RESERVED = (LABEL, SPLIT, *KEY_COLUMNS, *SCORE_COLUMNS)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class DatasetError(ValueError):
    """A dataset YAML, or the data it points to, cannot be used; the message says where and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Scalar = str | int | float | bool


class Outcome(_Strict):
    """The outcome column and the value that means "readmitted" (every other value means not)."""

    column: str
    positive: Scalar


class SplitColumn(_Strict):
    """A column assigning each row to the training or the test split (values named here)."""

    column: str
    train: Scalar = "train"
    test: Scalar = "test"


class FeatureSpec(_Strict):
    """One model variable read from a column: numeric, binary (0/1 or `positive`) or categorical (`levels`)."""

    type: Literal["numeric", "binary", "categorical"]
    #: The column in the table (default: the feature's own name).
    column: str | None = None
    #: Binary: the value meaning 1 (default: the values must already be 0/1 or true/false).
    positive: Scalar | None = None
    #: Categorical: every allowed value; the first is the reference level.
    levels: Annotated[list[Scalar], Field(min_length=2)] | None = None
    #: Numeric: model the value on the log scale (skewed laboratory values).
    log: bool = False
    #: Why the model needs it (data minimisation; shown in the data card and the report).
    why: str = ""

    @model_validator(mode="after")
    def _type_options(self) -> "FeatureSpec":
        if self.type == "categorical" and not self.levels:
            raise ValueError("a categorical feature needs `levels: [...]` (the first is the reference level)")
        if self.type != "categorical" and self.levels:
            raise ValueError(f"`levels` is only for categorical features, not {self.type}")
        if self.type != "binary" and self.positive is not None:
            raise ValueError(f"`positive` is only for binary features, not {self.type}")
        if self.type != "numeric" and self.log:
            raise ValueError("`log: true` is only for numeric features")
        return self


class Columns(_Strict):
    """The column mapping every flat-table site shares."""

    outcome: Outcome
    features: dict[str, FeatureSpec]
    site: str | None = None
    patient_id: str | None = None
    split: SplitColumn | None = None

    @field_validator("features")
    @classmethod
    def _feature_names(cls, features: dict[str, FeatureSpec]) -> dict[str, FeatureSpec]:
        if not features:
            raise ValueError("name at least one feature")
        for name in features:
            if not _NAME.match(name) or name in RESERVED:
                raise ValueError(f"feature name {name!r} must start with a letter, use only letters, digits and _, "
                                 f"and not be one of {list(RESERVED)}")
        return features


class SiteSource(_Strict):
    """Where one site's data are: a flat table, or an OMOP CDM folder."""

    table: str | None = None
    omop: str | None = None
    #: The site's value in the shared site column (default: the site's name).
    site_value: Scalar | None = None
    #: Features this site does not record at all (imputed from the other sites: see the docs).
    lacks: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_source(self) -> "SiteSource":
        if (self.table is None) == (self.omop is None):
            raise ValueError("give exactly one of `table:` (a CSV or Parquet file) or `omop:` (an OMOP CDM folder)")
        if self.table is not None and not self.table.lower().endswith(TABLE_SUFFIXES):
            raise ValueError(f"table {self.table!r} must be a .csv or .parquet file")
        return self


class DatasetSpec(_Strict):
    """The whole dataset YAML."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=40)]
    description: str = ""
    sites: dict[str, SiteSource]
    columns: Columns | None = None
    #: Feature names to use for subgroup results: {age: <numeric feature>, female: <binary feature>}.
    subgroups: dict[Literal["age", "female"], str] = Field(default_factory=dict)

    @field_validator("sites")
    @classmethod
    def _site_count(cls, sites: dict[str, SiteSource]) -> dict[str, SiteSource]:
        if not MIN_SITES <= len(sites) <= MAX_SITES:
            raise ValueError(f"a federation here has {MIN_SITES} to {MAX_SITES} sites, got {len(sites)}")
        for name in sites:
            if not re.match(r"^[a-z0-9][a-z0-9_-]*$", name):
                raise ValueError(f"site name {name!r}: use lower-case letters, digits, _ and -")
        return sites

    @model_validator(mode="after")
    def _consistent(self) -> "DatasetSpec":
        flat = [s for s, src in self.sites.items() if src.table is not None]
        omop = [s for s, src in self.sites.items() if src.omop is not None]
        if flat and omop:
            raise ValueError(f"mix of flat-table sites {flat} and OMOP sites {omop}: give every site the same kind "
                             "(build flat tables from the OMOP sites, or OMOP folders for the flat ones)")
        if flat and self.columns is None:
            raise ValueError("flat-table sites need a `columns:` mapping (outcome, features, ...)")
        if omop and self.columns is not None:
            raise ValueError("OMOP sites use the cohort builder's variables; remove `columns:`")
        features = set(self.columns.features) if self.columns else set()
        for site, src in self.sites.items():
            unknown = sorted(set(src.lacks) - features)
            if unknown:
                raise ValueError(f"sites.{site}.lacks: {unknown} are not features in columns.features")
            if omop and src.lacks:
                raise ValueError(f"sites.{site}.lacks: only for flat-table sites")
            if src.site_value is not None and (self.columns is None or self.columns.site is None):
                raise ValueError(f"sites.{site}.site_value needs `columns.site` (the column naming the site)")
        for feature in features:
            if all(feature in src.lacks for src in self.sites.values()):
                raise ValueError(f"feature {feature!r} is lacked by every site: remove it from columns.features")
        tables = [Path(src.table) for src in self.sites.values() if src.table is not None]
        if self.columns is not None and self.columns.site is None and len(set(tables)) < len(tables):
            raise ValueError("several sites read the same table: name the column that tells them apart "
                             "in `columns.site`")
        for role, feature in self.subgroups.items():
            wanted = "numeric" if role == "age" else "binary"
            spec = self.columns.features.get(feature) if self.columns else None
            if spec is None or spec.type != wanted:
                raise ValueError(f"subgroups.{role}: {feature!r} must be a {wanted} feature in columns.features")
        return self


class Dataset:
    """A validated dataset YAML with its paths resolved."""

    def __init__(self, spec: DatasetSpec, path: Path):
        self.spec = spec
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.spec.sites)

    @property
    def kind(self) -> str:
        """Return "omop" or "flat"."""
        return "omop" if next(iter(self.spec.sites.values())).omop is not None else "flat"

    def source(self, site: str) -> Path:
        """Return the site's table or OMOP folder (resolved against the YAML's folder)."""
        src = self.spec.sites[site]
        return (self.path.parent / (src.table or src.omop)).resolve()

    def input_files(self) -> list[Path]:
        """Return every data file the dataset reads (for the manifest's content hashes)."""
        files = set()
        for site in self.sites:
            path = self.source(site)
            if path.is_dir():
                files.update(file for file in path.rglob("*")
                             if file.is_file() and file.suffix.lower() in TABLE_SUFFIXES)
            elif path.is_file():
                files.add(path)
        return sorted(files)


def _format(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (not in the dataset schema; check the spelling)"
        lines.append(f"{loc}: {message}" if loc else message)
    return lines


def validate_dataset(data: Any, path: Path, shown: str | None = None) -> Dataset:
    """Return the Dataset of parsed YAML `data` read from `path`; raise DatasetError naming the file."""
    shown = shown or str(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{shown}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        spec = DatasetSpec.model_validate(data)
    except ValidationError as error:
        raise DatasetError(f"{shown}: " + f"\n{shown}: ".join(_format(error))) from None
    dataset = Dataset(spec, path)
    for site in dataset.sites:
        source = dataset.source(site)
        kind = "table" if spec.sites[site].table else "omop"
        if kind == "table" and not source.is_file():
            raise DatasetError(f"{shown}: sites.{site}.table: file {source} is not there; check the path "
                               "(relative to the dataset YAML)")
        if kind == "omop" and not source.is_dir():
            raise DatasetError(f"{shown}: sites.{site}.omop: folder {source} is not there; check the path "
                               "(relative to the dataset YAML)")
    return dataset


def load_dataset(path: str | Path) -> Dataset:
    """Return the validated dataset described by the YAML file at `path`."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file; give the path of a dataset YAML "
                           "(see docs/bring_your_own_data.md)")
    return _load(path.resolve(), path.read_text(), str(path))


@lru_cache(maxsize=8)
def _load(path: Path, text: str, shown: str) -> Dataset:
    """Return the Dataset of one YAML text (cached: stages ask for the sites many times)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise DatasetError(f"{shown}: not valid YAML ({error})") from None
    return validate_dataset(data, path, shown)
