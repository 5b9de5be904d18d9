"""When does federation pay? A map over the smaller hospital's size and how much its partner differs.

For each heterogeneity level (`data_synth.heterogeneity.partner_at`: 0, the
partner is the smaller hospital in every respect but size; 1, the configured
sites; 2, every difference doubled) and each repeat (a fresh draw of both
hospitals, seeded by level and repeat), both hospitals are generated and
their cohorts built. The smaller hospital's training split is then cut to
each size fraction (its test split stays whole, so every cell is scored on
the same patients), and per hospital the map records the test AUROC of

- `local`: the hospital's own model (stage 2's recipe: early stopping on 20%);
- `federated`: FedAvg with stage 3's chosen settings (the in-process loop of
  `fl.federated`, which the Flower apps reproduce to float precision);
- `federated+finetune`: that model fine-tuned at the hospital (stage 3's personalisation);
- `pooled`: one model on both training splits (the counterfactual pooling the law does not allow);
- `oracle`: the generator's true risk.

`gains` turns the repeats into the mean gain over the local model with a 95%
t-interval across repeats (each repeat is an independent draw of both
hospitals, so the interval covers data-draw variation, training noise and
test-split noise together). Synthetic data only: on provided data there is
no generator to move the sites.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from compendium.params import Profile
from data_synth.cohort import CohortSpec, write_cohort
from data_synth.stage import cohort_spec
from data_synth.generator import generate_site
from data_synth.heterogeneity import partner_at
from data_synth.sites import SiteProfile
from fl.baselines import fit_torch, single_class_reason
from fl.data import FeatureStatistics, PreprocessingSpec, SiteSplit, load_oracle_risk, load_site
from fl.evaluate import auroc
from fl.federated import fedavg_plain, initial_weights, personalised, predict
from fl.flower.server_app import local_train_config
from fl.train import TrainConfig, validation_mask

MODELS = ("local", "federated", "federated+finetune", "pooled", "oracle")


def _site(profile: SiteProfile, name: str, seed: int, spec: CohortSpec, work: Path) -> tuple[SiteSplit, SiteSplit, np.ndarray]:
    folder = Path(work) / name
    generate_site(profile, seed, folder, progress=False)
    write_cohort(folder / "omop", folder, spec, name, progress=False)
    return load_site(folder, "train", name), load_site(folder, "test", name), load_oracle_risk(folder, "test")


def _subsample(data: SiteSplit, fraction: float, rng: np.random.Generator) -> SiteSplit:
    return data.take(np.sort(rng.permutation(len(data))[: max(40, int(round(fraction * len(data))))]))


def cell(profile: Profile, train: dict[str, SiteSplit], test: dict[str, SiteSplit], seed: int,
         local_auroc: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Return per hospital the test AUROC of the local, federated, fine-tuned and pooled models (no oracle).

    `local_auroc` may give a hospital's own-model AUROC already known (the partner's does not change
    with the smaller hospital's size); the others are fitted here.
    """
    local_auroc = dict(local_auroc or {})
    kind, hidden = profile.baselines.model, tuple(profile.baselines.mlp_hidden)
    schema = next(iter(train.values())).schema
    spec = PreprocessingSpec.from_statistics(FeatureStatistics.of_sites([d.features for d in train.values()]), schema)
    arrays = {site: (spec.transform(d.features), d.labels) for site, d in train.items()}
    start = initial_weights(kind, spec.n_outputs, hidden, profile.seed)
    weights, _ = fedavg_plain(kind, hidden, start, arrays, profile.federated.rounds, local_train_config(profile), seed)
    pooled = fit_torch("pooled", list(train.values()), profile.baselines, seed)
    config = local_train_config(profile)
    finetune = TrainConfig(epochs=profile.federated.finetune_epochs, batch_size=config.batch_size,
                           learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                           optimizer=config.optimizer, patience=profile.baselines.patience or 20)
    out = {}
    for site, data in test.items():
        y, x = data.labels, spec.transform(data.features)
        if site not in local_auroc:
            local = fit_torch("local", [train[site]], profile.baselines, seed) if single_class_reason(train[site]) is None else None
            local_auroc[site] = auroc(y, local.predict(data)) if local is not None else np.nan
        held = validation_mask(arrays[site][1], profile.federated.selection.validation_fraction, seed)
        tuned = personalised(["finetune"], kind, hidden, weights, *arrays[site], held, finetune, seed)["finetune"]
        tuned_weights = [tuned[f"weight_{i}"] for i in range(len(weights))]
        out[site] = {"local": local_auroc[site],
                     "federated": auroc(y, predict(kind, hidden, weights, x)),
                     "federated+finetune": auroc(y, predict(kind, hidden, tuned_weights, x)),
                     "pooled": auroc(y, pooled.predict(data))}
    return out


def run_map(profile: Profile, small: str, partner: str, progress: bool = True) -> pd.DataFrame:
    """Return one row per (level, size fraction, repeat, hospital, model) with the test AUROC and the
    smaller hospital's training stays; `small` and `partner` name the profile's two sites."""
    from tqdm.auto import tqdm

    settings = profile.federated.map
    sites = profile.site_profiles()
    spec = cohort_spec(profile)
    rows = []
    steps = len(settings.levels) * settings.repeats
    with tempfile.TemporaryDirectory(prefix="federation-map-") as work, \
            tqdm(total=steps * len(settings.size_fractions), desc="federation map", disable=not progress) as bar:
        for repeat in range(settings.repeats):
            seed = int(np.random.SeedSequence([profile.seed, 21, repeat]).generate_state(1)[0])
            small_train, small_test, small_oracle = _site(sites[small], small, seed, spec, Path(work) / f"r{repeat}")
            for level in settings.levels:
                other = partner_at(sites[small], sites[partner], level)
                partner_seed = int(np.random.SeedSequence([profile.seed, 22, repeat, int(level * 1000)]).generate_state(1)[0])
                partner_train, partner_test, partner_oracle = _site(other, partner, partner_seed, spec,
                                                                   Path(work) / f"r{repeat}-l{level:g}")
                oracle = {small: auroc(small_test.labels, small_oracle), partner: auroc(partner_test.labels, partner_oracle)}
                known: dict[str, float] = {}
                for fraction in settings.size_fractions:
                    rng = np.random.default_rng(np.random.SeedSequence([seed, 23, int(fraction * 1e6)]))
                    subset = _subsample(small_train, fraction, rng) if fraction < 1 else small_train
                    scores = cell(profile, {small: subset, partner: partner_train},
                                  {small: small_test, partner: partner_test}, seed, known)
                    known[partner] = scores[partner]["local"]
                    for site, by_model in scores.items():
                        for model, value in {**by_model, "oracle": oracle[site]}.items():
                            rows.append({"level": level, "fraction": fraction, "repeat": repeat, "site": site,
                                         "role": "smaller" if site == small else "partner",
                                         "small_train_stays": len(subset), "model": model, "auroc": value})
                    bar.update()
    return pd.DataFrame(rows)


def gains(table: pd.DataFrame) -> pd.DataFrame:
    """Return per (level, size fraction, hospital, model) the mean AUROC and the mean gain over the local
    model with a 95% t-interval across repeats (paired within each repeat)."""
    wide = table.pivot_table(index=["level", "fraction", "repeat", "role", "site"], columns="model",
                             values="auroc").reset_index()
    stays = table.groupby(["level", "fraction"])["small_train_stays"].mean()
    rows = []
    for (level, fraction, role, site), group in wide.groupby(["level", "fraction", "role", "site"]):
        for model in MODELS:
            if model == "local":
                continue
            gain = (group[model] - group["local"]).dropna().to_numpy()
            n = len(gain)
            half = stats.t.ppf(0.975, n - 1) * gain.std(ddof=1) / np.sqrt(n) if n >= 2 else np.nan
            rows.append({"level": level, "fraction": fraction, "role": role, "site": site, "model": model,
                         "small_train_stays": int(round(stays[(level, fraction)])), "repeats": n,
                         "auroc": round(float(group[model].mean()), 4),
                         "local_auroc": round(float(group["local"].mean()), 4),
                         "gain": round(float(gain.mean()), 4) if n else np.nan,
                         "lower": round(float(gain.mean() - half), 4) if n >= 2 else np.nan,
                         "upper": round(float(gain.mean() + half), 4) if n >= 2 else np.nan})
    return pd.DataFrame(rows)


def headline(table: pd.DataFrame, model: str = "federated") -> dict:
    """Return where federation pays the smaller hospital: cells whose gain interval lies above 0, below 0, or spans it."""
    small = table[(table["role"] == "smaller") & (table["model"] == model)]
    def cells(mask):
        return [{"level": float(r.level), "small_train_stays": int(r.small_train_stays), "gain": float(r.gain),
                 "lower": float(r.lower), "upper": float(r.upper)} for r in small[mask].itertuples()]
    return {"gains": cells(small["lower"] > 0), "losses": cells(small["upper"] < 0),
            "unclear": cells((small["lower"] <= 0) & (small["upper"] >= 0))}


def plot_map(table: pd.DataFrame, default_stays: int | None = None, default_level: float = 1.0):
    """Return the map figure: per hospital, the federated model's AUROC gain over the hospital's own model
    against the smaller hospital's training stays, one line per heterogeneity level, 95% intervals, the
    default profile marked."""
    import matplotlib.pyplot as plt

    roles = [r for r in ("smaller", "partner") if r in set(table["role"])]
    fig, axes = plt.subplots(1, len(roles), figsize=(5.2 * len(roles), 4.2), sharey=True)
    for ax, role in zip(np.atleast_1d(axes), roles):
        rows = table[(table["role"] == role) & (table["model"] == "federated")]
        for level, group in rows.groupby("level"):
            group = group.sort_values("small_train_stays")
            line, = ax.plot(group["small_train_stays"], group["gain"], marker="o", label=f"difference level {level:g}")
            ax.fill_between(group["small_train_stays"], group["lower"], group["upper"], alpha=0.15,
                            color=line.get_color())
        ax.axhline(0, color="grey", linewidth=0.8)
        if default_stays is not None:
            ax.axvline(default_stays, color="black", linestyle=":", linewidth=1)
            ax.annotate(f"default profile\n(level {default_level:g})", (default_stays, ax.get_ylim()[1]),
                        fontsize="small", ha="right", va="top")
        ax.set_xscale("log")
        ax.set_xlabel("the smaller hospital's training stays")
        ax.set_title(f"AUROC gain at the {role} hospital")
    np.atleast_1d(axes)[0].set_ylabel("federated minus own model (AUROC), 95% CI")
    np.atleast_1d(axes)[-1].legend(fontsize="small")
    fig.suptitle("When does federation pay? Gain over a hospital's own model, by size and difference from its partner")
    fig.tight_layout()
    return fig
