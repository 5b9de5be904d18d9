"""Parameter profiles (params/<profile>.yaml): the typed schema and its loader.

A profile is validated in full before any work starts. An unknown key, a
value of the wrong type or one out of range stops the run with a
`ParamsError` naming the file and the dotted key, e.g.
`params/default.yaml: synthetic.sites.halland.patients: Input should be
greater than or equal to 50 (got 10)`.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compendium.paths import PARAMS_DIR, REPO_ROOT
from data_synth.sites import SITE_NAMES, SiteProfile, site_profile


class ParamsError(ValueError):
    """A parameter file is missing, unreadable or breaks the schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SyntheticSite(_Strict):
    """One synthetic hospital: a known site (or a new one built from a template) plus overrides."""

    template: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)


class SyntheticParams(_Strict):
    sites: dict[str, SyntheticSite]
    #: Patients per site in the data card's knob attribution (each group of site differences alone,
    #: data_synth.heterogeneity): every scenario regenerates the sites at this size.
    transport_patients: Annotated[int, Field(ge=500, le=1_000_000)] = 12_000

    @field_validator("sites")
    @classmethod
    def _at_least_two(cls, sites: dict[str, SyntheticSite]) -> dict[str, SyntheticSite]:
        if len(sites) < 2:
            raise ValueError(f"a federation needs at least two sites, got {list(sites)}")
        return sites


class CohortParams(_Strict):
    study_start: dt.date = dt.date(2016, 1, 1)
    study_end: dt.date = dt.date(2021, 12, 31)
    followup_end: dt.date = dt.date(2022, 12, 31)
    one_index_per_patient: bool = True
    test_fraction: Annotated[float, Field(ge=0.05, le=0.5)] = 0.3

    @model_validator(mode="after")
    def _ordered(self) -> "CohortParams":
        if not self.study_start <= self.study_end <= self.followup_end:
            raise ValueError("need study_start <= study_end <= followup_end")
        return self


class BaselineParams(_Strict):
    """Stage 2: local and pooled baselines, references, evaluation and the site-size sweep."""

    model: Literal["logistic", "mlp"] = "logistic"
    mlp_hidden: Annotated[list[Annotated[int, Field(ge=1, le=1024)]], Field(min_length=1, max_length=4)] = [32]
    epochs: Annotated[int, Field(ge=1, le=10_000)] = 300
    batch_size: Annotated[int, Field(ge=8)] | None = None
    learning_rate: Annotated[float, Field(gt=0, le=10)] = 0.05
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 1e-4
    patience: Annotated[int, Field(ge=1)] | None = 20
    validation_fraction: Annotated[float, Field(ge=0.05, le=0.5)] = 0.2
    bootstrap_resamples: Annotated[int, Field(ge=50, le=20_000)] = 1000
    gbt_max_iter: Annotated[int, Field(ge=10, le=5000)] = 200
    gbt_learning_rate: Annotated[float, Field(gt=0, le=1)] = 0.05
    sweep_fractions: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)] = [0.1, 0.25, 0.5, 1.0]
    sweep_repeats: Annotated[int, Field(ge=1, le=50)] = 3


class SelectionParams(_Strict):
    """Federated model selection: a grid of local-training settings, each run as a federation on the
    sites' training data with a validation share held out at every site; the candidate and round with
    the lowest validation loss (example-weighted over sites) are chosen for every strategy."""

    enabled: bool = True
    validation_fraction: Annotated[float, Field(ge=0.05, le=0.5)] = 0.2
    #: Per local optimiser, the learning rates tried (Adam's steps are about the rate; SGD's scale with
    #: the gradient, so their useful ranges differ).
    learning_rates: dict[Literal["adam", "sgd"], Annotated[list[Annotated[float, Field(gt=0, le=10)]],
                                                           Field(min_length=1)]] = {
        "sgd": [0.5, 1.5], "adam": [0.01, 0.05]}
    local_epochs: Annotated[list[Annotated[int, Field(ge=1, le=100)]], Field(min_length=1)] = [1, 5]
    weight_decays: Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=1)] = [1e-4]

    @field_validator("learning_rates")
    @classmethod
    def _some_optimiser(cls, value: dict) -> dict:
        if not value:
            raise ValueError("name at least one optimiser (adam or sgd) with its learning rates")
        return value


class MapParams(_Strict):
    """The size x heterogeneity map (synthetic data only): the smaller hospital's training share times
    how far its partner differs (0: alike but for size, 1: the configured sites, 2: every difference doubled)."""

    enabled: bool = True
    size_fractions: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)] = [0.1, 0.3, 1.0]
    levels: Annotated[list[Annotated[float, Field(ge=0, le=3)]], Field(min_length=1)] = [0.0, 1.0, 2.0]
    repeats: Annotated[int, Field(ge=2, le=50)] = 3


class FederatedParams(_Strict):
    """Stage 3: federated training between the sites (model class from `baselines.model`).

    `optimizer`, `learning_rate`, `local_epochs`, `weight_decay` and `rounds` are the settings used
    when `selection.enabled` is false; with selection they are replaced by the chosen ones (and
    `rounds` is the most the selection tries).
    """

    strategies: Annotated[list[Literal["fedavg", "fedprox", "fedadam", "fedper"]], Field(min_length=1)] = [
        "fedavg", "fedprox", "fedadam", "fedper"]
    #: What each site does with every strategy's final model, at home (FedPer adds its own head).
    personalisation: list[Literal["finetune", "recalibrate"]] = ["finetune", "recalibrate"]
    finetune_epochs: Annotated[int, Field(ge=1, le=10_000)] = 100
    selection: SelectionParams = SelectionParams()
    map: MapParams = MapParams()
    rounds: Annotated[int, Field(ge=1, le=1000)] = 30
    local_epochs: Annotated[int, Field(ge=1, le=100)] = 5
    batch_size: Annotated[int, Field(ge=8)] | None = None
    learning_rate: Annotated[float, Field(gt=0, le=10)] = 0.05
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 1e-4
    proximal_mu: Annotated[float, Field(gt=0, le=100)] = 0.1
    server_learning_rate: Annotated[float, Field(gt=0, le=10)] = 0.05
    engine: Literal["direct", "ray"] = "direct"
    round_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 600.0


class PrivacyParams(_Strict):
    """Stage 4: membership inference with batched reference models, attacks on updates."""

    reference_models: Annotated[int, Field(ge=8, le=4096)] = 64
    target_models: Annotated[int, Field(ge=2, le=256)] = 8
    population_size: Annotated[int, Field(ge=50, le=1_000_000)] = 2000
    positive_control_patients: Annotated[int, Field(ge=10, le=1000)] = 40
    positive_control_epochs: Annotated[int, Field(ge=1, le=10_000)] = 100
    # Patient-level DP-SGD (Opacus) at each hospital: the privacy-utility frontier.
    dp_noise_multipliers: Annotated[list[Annotated[float, Field(gt=0, le=100)]], Field(min_length=1)] = [
        0.5, 1.0, 2.0, 4.0]
    dp_max_grad_norm: Annotated[float, Field(gt=0, le=100)] = 1.0
    dp_sample_rate: Annotated[float, Field(gt=0, le=1)] = 0.05
    dp_learning_rate: Annotated[float, Field(gt=0, le=10)] = 0.5
    dp_delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    # Client-level DP (Flower's server-side clipping wrapper): unit of privacy one hospital, same delta.
    client_dp_noise_multipliers: Annotated[list[Annotated[float, Field(gt=0, le=100)]], Field(min_length=1)] = [
        0.5, 1.0, 2.0, 4.0]
    client_dp_clipping_norm: Annotated[float, Field(gt=0, le=100)] = 0.5
    # Membership attacks on DP-SGD federations: reference pipelines per noise level (DP steps are many and small).
    dp_attack_reference_models: Annotated[int, Field(ge=8, le=4096)] = 32
    # ... on this many patients per site (epsilon depends on the sampling rate and steps, not on the site's size).
    dp_attack_patients: Annotated[int, Field(ge=50, le=1_000_000)] = 1000
    # Attribute inference: the diagnosis the attacker tries to recover (a binary cohort feature).
    sensitive_attribute: str = "renal_failure"
    # Canaries: outlier patients injected into the first site's data (at least 5, so aggregates can be shown).
    canaries: Annotated[int, Field(ge=5, le=1000)] = 8
    # Gradient-matching reconstruction from FedSGD batch gradients: batch sizes, batches per size.
    reconstruction_batch_sizes: Annotated[list[Annotated[int, Field(ge=1, le=256)]], Field(min_length=1)] = [
        1, 2, 4, 8]
    reconstruction_batches: Annotated[int, Field(ge=5, le=1000)] = 20
    # Secure aggregation (Flower's SecAgg+): FedAvg rounds re-run with it (the default is capped at
    # federated.rounds; an explicit value above it is an error), and the
    # range each site's weighted model weights are clipped to before quantisation (Flower's default: 8).
    secagg_rounds: Annotated[int, Field(ge=1, le=100)] = 3
    secagg_clipping_range: Annotated[float, Field(gt=0, le=1e4)] = 8.0
    # DP over the whole release: the preprocessing every DP run uses. public_ranges: fixed published ranges
    # (fl/privacy/public_scaling.py), no statistics round; federated_statistics: round 0 in the clear (outside
    # every guarantee).
    dp_preprocessing: Literal["public_ranges", "federated_statistics"] = "public_ranges"
    # Where DP noise comes from: seeded (reproducible, not private against anyone knowing the seed) or os
    # (seeded from the OS's cryptographic source at every call; runs are then not reproducible).
    dp_noise_source: Literal["seeded", "os"] = "seeded"
    # Empirical DP audit: federations with a canary in a random half (even count) and patients per site.
    audit_models: Annotated[int, Field(ge=8, le=65_536, multiple_of=2)] = 512
    audit_patients: Annotated[int, Field(ge=20, le=1_000_000)] = 100
    # ... and its two controls (planted accounting error, round 0 in the clear) claim this noise: an epsilon
    # the audit can test (below its ceiling), so that the controls must come out as violations.
    audit_control_noise: Annotated[float, Field(gt=0, le=100)] = 4.0

    @field_validator("sensitive_attribute")
    @classmethod
    def _binary_attribute(cls, value: str) -> str:
        from data_synth.features import FEATURES

        binary = [f.name for f in FEATURES if f.kind == "binary"]
        if value not in binary:
            raise ValueError(f"must be a binary cohort feature, one of {binary}; got {value!r}")
        return value

    @model_validator(mode="after")
    def _targets_below_models(self) -> "PrivacyParams":
        if self.target_models >= self.reference_models:
            raise ValueError("target_models must be smaller than reference_models")
        if self.target_models >= self.dp_attack_reference_models:
            raise ValueError("target_models must be smaller than dp_attack_reference_models")
        return self


class Profile(_Strict):
    """A whole parameter profile. Later stages add their sections here."""

    profile: str
    description: str = ""
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)]
    synthetic: SyntheticParams
    cohort: CohortParams = CohortParams()
    baselines: BaselineParams = BaselineParams()
    federated: FederatedParams = FederatedParams()
    privacy: PrivacyParams = PrivacyParams()
    #: A provided dataset (dataset YAML, relative to the repository root): stages 2-5 run on it, and stage 1
    #: becomes its data card. `python -m compendium run --data` and `make all DATA=...` set it too.
    data: str | None = None

    @property
    def dataset(self):
        """Return the provided Dataset, or None for the synthetic data."""
        if self.data is None:
            return None
        from data_synth.dataset import load_dataset

        return load_dataset(_resolve(self.data))

    def site_profiles(self) -> dict[str, SiteProfile]:
        """Return each synthetic site's full, validated profile."""
        return {
            name: site_profile(name, site.overrides, site.template)
            for name, site in self.synthetic.sites.items()
        }

    @property
    def sites(self) -> tuple[str, ...]:
        """Return the site names: the provided dataset's, else the synthetic generator's."""
        dataset = self.dataset
        return dataset.sites if dataset is not None else tuple(self.synthetic.sites)


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def _format_errors(error: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in (*([prefix] if prefix else []), *item["loc"]))
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (not in the schema; check the spelling)"
        given = item.get("input")
        shown = "" if item["type"] in ("extra_forbidden", "missing") or isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"{loc}: {message}{shown}")
    return lines


def validate_profile(data: Any, source: str) -> Profile:
    """Return the validated Profile for parsed YAML `data`; raise ParamsError naming `source`."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        profile = Profile.model_validate(data)
    except ValidationError as error:
        raise ParamsError(f"{source}: " + f"\n{source}: ".join(_format_errors(error))) from None
    problems = []
    for name, site in profile.synthetic.sites.items():
        if site.template is None and name not in SITE_NAMES:
            problems.append(f"synthetic.sites.{name}: unknown site; known sites are {list(SITE_NAMES)}, "
                            "or give `template: <known site>`")
            continue
        if site.template is not None and site.template not in SITE_NAMES:
            problems.append(f"synthetic.sites.{name}.template: unknown site {site.template!r}; "
                            f"known sites are {list(SITE_NAMES)}")
            continue
        try:
            site_profile(name, site.overrides, site.template)
        except ValidationError as error:
            problems.extend(_format_errors(error, f"synthetic.sites.{name}.overrides"))
    # Unset, secure aggregation takes the federation's first rounds, up to its default (fl.privacy.secagg);
    # asked for explicitly, more rounds than the federation has is a mistake to name.
    if "secagg_rounds" in profile.privacy.model_fields_set and profile.privacy.secagg_rounds > profile.federated.rounds:
        problems.append(f"privacy.secagg_rounds: {profile.privacy.secagg_rounds} is more than federated.rounds "
                        f"({profile.federated.rounds}); secure aggregation re-runs rounds of the federation, "
                        "so lower it")
    codes = [p.site_code for p in (profile.site_profiles().values() if not problems else [])]
    if len(set(codes)) != len(codes):
        problems.append("synthetic.sites: two sites share a site_code; give each a distinct overrides.site_code")
    if problems:
        raise ParamsError(f"{source}: " + f"\n{source}: ".join(problems))
    _check_dataset(profile, source)
    return profile


def _check_dataset(profile: Profile, source: str) -> None:
    """Raise ParamsError unless the profile's provided dataset (if any) is a valid dataset YAML."""
    from data_synth.dataset import DatasetError

    try:
        profile.dataset
    except DatasetError as error:
        raise ParamsError(f"{source}: data: {error}") from None


def with_data(profile: Profile, data: str | Path | None, source: str = "--data") -> Profile:
    """Return the profile running on the provided dataset at `data` (unchanged if None)."""
    if data is None or str(data) == "":
        return profile
    from compendium.artifacts import relative

    changed = profile.model_copy(update={"data": relative(_resolve(data))})
    _check_dataset(changed, source)
    return provided_defaults(changed)


def provided_defaults(profile: Profile) -> Profile:
    """Return the profile with the defaults that differ on provided data.

    The published clinical ranges of the DP runs' fixed scaling
    (fl/privacy/public_scaling.py) name the synthetic extract's features; a
    provided dataset's features have none, so unless the profile sets
    `privacy.dp_preprocessing` its DP runs use the statistics round, and every
    DP artifact says that round 0 lies outside the guarantee.
    """
    if profile.data is None or "dp_preprocessing" in profile.privacy.model_fields_set:
        return profile
    return profile.model_copy(update={"privacy": profile.privacy.model_copy(
        update={"dp_preprocessing": "federated_statistics"})})


def build_name(profile: str, data: str | Path | None) -> str:
    """Return the build folder name: <profile>, or <profile>-<dataset file stem> for a provided dataset.

    Synthetic and provided builds never share a folder.
    """
    return profile if not data else f"{profile}-{Path(data).stem}"


def load_params(path: str | Path, data: str | Path | None = None) -> Profile:
    """Return the validated profile in `path` (a YAML file), on the provided dataset `data` if given."""
    path = Path(path)
    shown = _shown(path)
    if not path.is_file():
        available = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))
        raise ParamsError(f"{shown}: no such parameter file; profiles in params/: {available}")
    try:
        parsed = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParamsError(f"{shown}: not valid YAML ({error})") from None
    profile = validate_profile(parsed, shown)
    if profile.profile != path.stem:
        raise ParamsError(f"{shown}: profile: must equal the file name {path.stem!r} (got {profile.profile!r})")
    return provided_defaults(with_data(profile, data))


def profile_path(name: str) -> Path:
    """Return the YAML path of the named profile."""
    return PARAMS_DIR / f"{name}.yaml"


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
