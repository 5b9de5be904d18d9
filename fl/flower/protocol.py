"""What travels in the pilot's messages: record keys, settings, and their encoding.

One place defines what a hospital receives and returns, so the ledger test
and the documentation can say exactly what crosses a site boundary.
"""
from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord

from fl.data import FeatureSchema, PreprocessingSpec
from fl.train import TrainConfig

ARRAYS = "arrays"  # model weights (global model out, local model back)
CONFIG = "config"  # settings from the server
METRICS = "metrics"  # aggregate metrics back from a site
STATISTICS = "statistics"  # per-feature counts, sums, sums of squares (query reply)
SITE = "site"  # the replying site's name and feature list
QUERY_STATISTICS = "query.statistics"
QUERY_PERSONALISE = "query.personalise"

#: Settings of federated model selection and personalisation (present only when used).
VALIDATION_FRACTION = "validation-fraction"  # > 0: train on the rest of the training split, evaluate on this share
PERSONAL_ARRAYS = "personal-arrays"  # FedPer: the model's last arrays (its head) stay at each site
PERSONALISE = "personalise"  # the personalisation methods a site runs on the final model
#: Where a FedPer site keeps its own head between rounds (Context.state).
OWN_HEAD = "own-head"

NUM_EXAMPLES = "num-examples"
#: Every site's weight is 1 under this key: client-level DP averages sites unweighted (its sensitivity is C/n).
CLIENT_WEIGHT = "client-weight"


def settings_record(spec: PreprocessingSpec, train: TrainConfig, model: str, hidden: tuple[int, ...],
                    seed: int) -> ConfigRecord:
    """Return the settings a site needs: preprocessing statistics (aggregates), training config, seed."""
    return ConfigRecord({
        "spec-mean": [float(v) for v in spec.mean],
        "spec-std": [float(v) for v in spec.std],
        **site_schema_fields(spec.schema),
        "model": model,
        "hidden": [int(h) for h in hidden],
        "local-epochs": int(train.epochs),
        "batch-size": int(train.batch_size or 0),
        "learning-rate": float(train.learning_rate),
        "weight-decay": float(train.weight_decay),
        "optimizer": train.optimizer,
        "seed": int(seed),
    })


def site_schema_fields(schema: FeatureSchema) -> dict:
    """Return the schema fields a site reports with its statistics (names only, no values).

    Flower's ConfigRecord cannot hold an empty list: an empty transform list is left out.
    """
    fields = {"features": list(schema.features), "log-features": list(schema.log_features),
              "indicator-features": list(schema.indicator_features)}
    return {key: value for key, value in fields.items() if value}


def schema_of(record) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Return (features, log features, indicator features) named in a site or settings record."""
    return tuple(record["features"]), tuple(record.get("log-features", [])), tuple(record.get("indicator-features", []))


def read_settings(config: ConfigRecord, schema: FeatureSchema) -> tuple[PreprocessingSpec, TrainConfig, str, tuple[int, ...], int]:
    """Return (spec, train config, model kind, hidden sizes, seed) from a settings record.

    `schema` is the receiving site's own; the server's must name the same features and transforms.
    """
    mine = (schema.features, schema.log_features, schema.indicator_features)
    if schema_of(config) != mine:
        raise ValueError("the server's feature list differs from this site's: "
                         f"{list(config['features'])} vs {list(schema.features)}")
    spec = PreprocessingSpec(mean=np.asarray(config["spec-mean"], dtype=float),
                             std=np.asarray(config["spec-std"], dtype=float), schema=schema)
    train = TrainConfig(
        epochs=int(config["local-epochs"]),
        batch_size=int(config["batch-size"]) or None,
        learning_rate=float(config["learning-rate"]),
        weight_decay=float(config["weight-decay"]),
        optimizer=str(config["optimizer"]),
        patience=None,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    return spec, train, str(config["model"]), tuple(int(h) for h in config["hidden"]), int(config["seed"])


#: Patient-level DP-SGD settings in a training config (present only when DP is on): key -> DPConfig field.
DP_FIELDS = {"dp-noise-multiplier": "noise_multiplier", "dp-max-grad-norm": "max_grad_norm",
             "dp-sample-rate": "sample_rate", "dp-delta": "delta", "dp-learning-rate": "learning_rate",
             "dp-local-epochs": "local_epochs"}
DP_KEYS = tuple(DP_FIELDS)
#: Where a site keeps its DP accountant between rounds (Context.state).
DP_ACCOUNTANT = "dp-accountant"


def _dp_value(field: str, value) -> int | float:
    return int(value) if field == "local_epochs" else float(value)


def dp_entries(config) -> dict:
    """Return the training-config entries of a patient-level DP-SGD configuration (fl.privacy.dp.DPConfig)."""
    return {key: _dp_value(field, getattr(config, field)) for key, field in DP_FIELDS.items()}


def read_dp(config: ConfigRecord):
    """Return the DPConfig a training (or run) config carries, or None when DP is off (no or zero noise)."""
    if float(config.get(DP_KEYS[0], 0.0)) <= 0:
        return None
    from fl.privacy.dp import DPConfig

    return DPConfig(**{field: _dp_value(field, config[key]) for key, field in DP_FIELDS.items()})
