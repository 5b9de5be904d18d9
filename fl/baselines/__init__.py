"""Stage 2's models: a hospital's own model, the pooled model and the gradient-boosted reference.

Each site's split comes through the single data door (`site_splits`). The
preprocessing statistics are explicit: a local model standardises with its
own site's statistics, the pooled model with the sum of all sites'
statistics (exactly what the federated stage computes without pooling).

- `stage`: what the stage-2 notebook runs (every model on every site's test
  split, the site-size sweep, tables, checks and the summary).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from torch import nn

from compendium.params import BaselineParams
from fl.data import FeatureSchema, FeatureStatistics, PreprocessingSpec, SiteSplit, load_site, site_dir
from fl.models import build_model
from fl.train import TrainConfig, fit, predict_proba, validation_mask


def train_config(params: BaselineParams) -> TrainConfig:
    """Return the training configuration of a profile's baselines."""
    return TrainConfig(epochs=params.epochs, batch_size=params.batch_size, learning_rate=params.learning_rate,
                       weight_decay=params.weight_decay, patience=params.patience)


@dataclass
class FittedModel:
    """A torch model with the preprocessing it was trained with."""

    name: str
    model: nn.Module
    spec: PreprocessingSpec
    train_rows: int

    def predict(self, data: SiteSplit) -> np.ndarray:
        return predict_proba(self.model, self.spec.transform(data.features))


def fit_torch(name: str, train: list[SiteSplit], params: BaselineParams, seed: int,
              spec: PreprocessingSpec | None = None) -> FittedModel:
    """Return the profile's model trained on the concatenated training splits (early stopping on 20%)."""
    features = pd.concat([split.features for split in train], ignore_index=True)
    labels = np.concatenate([split.labels for split in train])
    if spec is None:
        # A site's own model standardises with its own statistics; a feature the site does not record is a
        # constant input for it.
        schema = train[0].schema
        spec = PreprocessingSpec.from_statistics(FeatureStatistics.of(features, schema), schema, unobserved="constant")
    x = spec.transform(features)
    held_out = validation_mask(labels, params.validation_fraction, seed)
    model = build_model(params.model, x.shape[1], seed=seed, hidden=tuple(params.mlp_hidden))
    fit(model, x[~held_out], labels[~held_out], train_config(params), seed=seed,
        validation=(x[held_out], labels[held_out]))
    return FittedModel(name, model, spec, int(len(labels)))


def fit_gbt(train: list[SiteSplit], params: BaselineParams, seed: int) -> HistGradientBoostingClassifier:
    """Return a gradient-boosted trees reference trained on the pooled training splits."""
    features = pd.concat([split.features for split in train], ignore_index=True)
    labels = np.concatenate([split.labels for split in train])
    model = HistGradientBoostingClassifier(max_iter=params.gbt_max_iter, learning_rate=params.gbt_learning_rate,
                                           early_stopping=False, random_state=seed)
    return model.fit(features, labels)


def site_splits(build_dir: Path, sites: tuple[str, ...], split: str) -> dict[str, SiteSplit]:
    """Return each site's split, loaded through the single data door (every site must share one schema)."""
    splits = {site: load_site(site_dir(build_dir, site), split, site) for site in sites}
    shared_schema(splits)
    return splits


def shared_schema(splits: dict[str, SiteSplit]) -> FeatureSchema:
    """Return the feature schema every site shares; raise naming the sites whose schema differs."""
    first, *rest = splits
    schema = splits[first].schema
    differ = [site for site in rest if splits[site].schema != schema]
    if differ:
        raise ValueError(f"site(s) {differ} have other feature columns than {first!r}; rebuild stage 1 so that "
                         "every site's cohort has the dataset's feature list")
    return schema


def single_class_reason(data: SiteSplit) -> str | None:
    """Return why a model cannot be fitted on these training data (one outcome class), or None."""
    if np.unique(data.labels).size < 2:
        outcome = "readmitted" if data.labels.size and data.labels[0] else "not readmitted"
        return f"not estimable: every training patient at {data.site} has the same outcome ({outcome})"
    return None
