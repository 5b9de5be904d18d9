"""A hospital's ClientApp: answers the statistics query, trains locally, evaluates locally.

The site's data folder comes from the node configuration (`site-dir`, as a
SuperNode is started in a deployment) or, in simulation, from the run
configuration's `site-dirs` list indexed by `partition-id`. The node
configuration always wins: nothing the server sends can point a node at
another folder. A deployed node also names its site (`site`, checked
against the folder) and is confined to its folder (`confine`, see
`fl.flower.isolation`). Data are read only through `fl.data.load_site`.
Replies carry weights and aggregates; no record-level value leaves the site.

With node configuration `site-ledger` (a file path), the `site_ledger` mod
appends one line per message the node receives or sends: the site's own
record of what crossed its boundary, in the same bytes as the server's ledger.

The hospital's own floors (node configuration `min-batch-size`,
`max-local-epochs`, `require-dp`, `max-epsilon`, `allowed-models`; see
`fl.flower.policy`) are checked before any training. With node
configuration `site-log` (a file path), the `hospital_guard` mod turns
every failure into a reply with a fixed code and keeps the exception's
text in that local log, so no row number, value or path reaches the server.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_to_proto

from data_synth.features import COHORT_FILE
from fl.data import FeatureStatistics, PreprocessingSpec, SiteSplit, load_site
from fl.evaluate import auroc, record_loss
from fl.federated import local_update, personalised, predict, predict_logits, round_seed
from fl.flower import protocol
from fl.flower.isolation import check_site, confine_to_site
from fl.flower.policy import ERROR_CODE, PolicyRefusal, SitePolicy, log_exception, site_error
from fl.train import validation_mask


def site_ledger(msg: Message, context: Context, call_next) -> Message:
    """Record the bytes of every message this node receives and sends (node config `site-ledger`)."""
    reply = call_next(msg, context)
    path = context.node_config.get("site-ledger")
    if path:
        server_round = int(msg.content[protocol.CONFIG].get("server-round", 0)) if protocol.CONFIG in msg.content else 0
        with open(str(path), "a") as handle:
            for direction, message in (("server->site", msg), ("site->server", reply)):
                handle.write(json.dumps({"round": server_round, "direction": direction,
                                         "message_type": msg.metadata.message_type,
                                         "bytes": message_to_proto(message).ByteSize()}) + "\n")
    return reply


def hospital_guard(msg: Message, context: Context, call_next) -> Message:
    """Reply to any failure with a fixed code; keep the details in the site's log (node config `site-log`)."""
    log = context.node_config.get("site-log")
    if not log:
        return call_next(msg, context)
    try:
        return call_next(msg, context)
    except Exception as error:  # every failure, so that no exception text leaves the site
        code, text = site_error(error)
        log_exception(str(log), code, msg.metadata.message_type, error)
        return Message(Error(code=ERROR_CODE, reason=text), reply_to=msg)


app = ClientApp(mods=[site_ledger, hospital_guard])


def site_directory(context: Context) -> Path:
    """Return this node's site folder, from node config (deployment) or partition id (simulation)."""
    if "site-dir" in context.node_config:
        directory = Path(str(context.node_config["site-dir"]))
        if "site" in context.node_config:
            check_site(directory, str(context.node_config["site"]))
        if context.node_config.get("confine", False):
            confine_to_site(directory)
        return directory
    dirs = str(context.run_config.get("site-dirs", "")).split(",")
    partition = int(context.node_config.get("partition-id", -1))
    if not 0 <= partition < len(dirs) or not dirs[partition]:
        raise ValueError(f"node has neither node config 'site-dir' nor a site for partition {partition} "
                         f"in run config 'site-dirs' ({dirs})")
    return Path(dirs[partition])


@dataclass(frozen=True, eq=False)
class LocalSplit:
    """One split of this node's own cohort, with its model matrix under the run's preprocessing spec.

    `local_split` keeps these in one per-process cache: a node reads its
    cohort once and transforms it once per spec (the spec is fixed in a run).
    """

    data: SiteSplit
    #: spec.key -> model matrix; only the latest spec's is kept.
    matrices: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def model_matrix(self, spec: PreprocessingSpec) -> np.ndarray:
        """Return the split's model matrix under `spec` (standardised features and missing indicators)."""
        if spec.key not in self.matrices:
            self.matrices.clear()
            self.matrices[spec.key] = spec.transform(self.data.features)
        return self.matrices[spec.key]


def site_output(context: Context, site: str) -> Path:
    """Return the folder where this node keeps what stays at the site (its personalised models).

    From node configuration `site-output` (a deployment, or the direct engine), else from the run
    configuration's `site-outputs` list indexed by partition id (Flower's simulation).
    """
    if "site-output" in context.node_config:
        return Path(str(context.node_config["site-output"]))
    outputs = str(context.run_config.get("site-outputs", "")).split(",")
    partition = int(context.node_config.get("partition-id", -1))
    if not 0 <= partition < len(outputs) or not outputs[partition]:
        raise ValueError(f"site {site!r} has no folder for what stays at the site (node config 'site-output')")
    return Path(outputs[partition])


def validation_rows(labels: np.ndarray, seed: int, site: str, fraction: float) -> np.ndarray:
    """Return the boolean mask of this site's training rows held out for federated validation.

    Drawn stratified from the site's own labels with a seed only the site's name and the run's seed
    fix (round 0 of `round_seed`: no training round has that number), so it is the same in every round.
    """
    return validation_mask(labels, fraction, round_seed(seed, site, 0))


@functools.lru_cache(maxsize=8)
def _read_split(directory: Path, split: str, modified_ns: int) -> LocalSplit:
    return LocalSplit(load_site(directory, split))


def local_split(context: Context, split: str) -> LocalSplit:
    """Return this node's split of its own cohort, read once per process (re-read if the cohort file changes)."""
    directory = site_directory(context)
    cohort = directory / COHORT_FILE
    modified = cohort.stat().st_mtime_ns if cohort.exists() else 0
    local = _read_split(directory.resolve(), split, modified) if modified else LocalSplit(load_site(directory, split))
    if len(local.data) == 0:
        raise ValueError(f"site {local.data.site!r} has no {split} rows in {directory}")
    return local


def _site_record(data: SiteSplit) -> ConfigRecord:
    return ConfigRecord({"site": data.site, **protocol.site_schema_fields(data.schema)})


@app.query("statistics")
def statistics(msg: Message, context: Context) -> Message:
    """Reply with the per-feature aggregates of the training split (counts, sums, sums of squares)."""
    data = local_split(context, "train").data
    stats = FeatureStatistics.of(data.features, data.schema)
    arrays = ArrayRecord([np.asarray(a, dtype=np.float64) for a in (stats.count, stats.total, stats.total_squares)])
    content = RecordDict({protocol.STATISTICS: arrays, protocol.SITE: _site_record(data),
                          protocol.METRICS: MetricRecord({"rows": int(stats.rows)})})
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this site's training split and return the new weights."""
    local = local_split(context, "train")
    data = local.data
    config = msg.content[protocol.CONFIG]
    spec, train_config, kind, hidden, seed = protocol.read_settings(config, data.schema)
    received = msg.content[protocol.ARRAYS].to_numpy_ndarrays()
    weights = _with_own_head(received, config, context)
    seed_of_round = round_seed(seed, data.site, int(config["server-round"]))
    dp = protocol.read_dp(config)
    policy = SitePolicy.from_node_config(context.node_config)
    policy.check_train(kind=kind, epochs=train_config.epochs, batch_size=train_config.batch_size, rows=len(data),
                       dp=dp, projected_epsilon=lambda: projected_epsilon(context, dp, len(data)))
    features, labels = local.model_matrix(spec), data.labels
    fraction = float(config.get(protocol.VALIDATION_FRACTION, 0.0))
    if fraction > 0:  # federated model selection: train on the rest, validate on the held-out rows
        keep = ~validation_rows(labels, seed, data.site, fraction)
        features, labels = features[keep], labels[keep]
    metrics = {}
    if dp is None:
        result = local_update(kind, hidden, weights, features, labels, train_config, seed_of_round)
    else:
        state_before = context.state[protocol.DP_ACCOUNTANT] if protocol.DP_ACCOUNTANT in context.state else None
        result, metrics["epsilon"] = _dp_update(weights, features, labels, dp, kind, context, seed_of_round)
        if policy.max_epsilon is not None and not metrics["epsilon"] <= policy.max_epsilon:
            # The projection and the accountant disagree: withhold the update and keep the old history.
            if state_before is None:
                del context.state[protocol.DP_ACCOUNTANT]
            else:
                context.state[protocol.DP_ACCOUNTANT] = state_before
            raise PolicyRefusal("FEDHF-POLICY-EPSILON", f"epsilon after the round {metrics['epsilon']:.3g}; "
                                f"maximum {policy.max_epsilon:g}; the update was withheld")
    head = int(config.get(protocol.PERSONAL_ARRAYS, 0))
    sent = result.weights
    if head:  # FedPer: the site keeps its own head; the server gets back the head it sent, unchanged
        context.state[protocol.OWN_HEAD] = ArrayRecord(result.weights[-head:])
        sent = result.weights[:-head] + received[-head:]
    content = RecordDict({
        protocol.ARRAYS: ArrayRecord(sent),
        protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: result.num_examples, protocol.CLIENT_WEIGHT: 1,
                                        "train-loss": result.train_loss, **metrics}),
        protocol.SITE: _site_record(data),
    })
    return Message(content, reply_to=msg)


def _accountant(context: Context):
    """Return this node's RDP accountant with the history kept in its Context state."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    if protocol.DP_ACCOUNTANT in context.state:
        saved = context.state[protocol.DP_ACCOUNTANT]
        accountant.history = [(float(z), float(q), int(n)) for z, q, n in
                              zip(saved["noise"], saved["sample-rate"], saved["steps"])]
    return accountant


def projected_epsilon(context: Context, dp, rows: int) -> float:
    """Return this site's epsilon at `dp.delta` after one more round of `dp`, before training it.

    `fl.privacy.dp.dp_local_update` batches by round(sample rate x rows); Opacus then samples each
    record with probability 1/batches for `batches` steps per epoch, which is what is added here.
    """
    batches = math.ceil(rows / max(1, int(round(dp.sample_rate * rows))))
    accountant = _accountant(context)
    accountant.history.append((float(dp.noise_multiplier), 1.0 / batches, batches * int(dp.local_epochs)))
    return float(accountant.get_epsilon(dp.delta))


def _dp_update(weights, features, labels, dp, kind: str, context: Context, seed: int):
    """Return (local DP-SGD result, this site's epsilon so far); the accountant lives in the node's state.

    The accountant is never reset between rounds: its history (noise,
    sample rate, steps) is kept in the node's Context state, which Flower
    carries from one message to the next, so the epsilon a site reports
    covers every round it has trained in.
    """
    from fl.privacy.dp import dp_local_update

    if kind != "logistic":
        raise ValueError(f"patient-level DP-SGD is implemented for the logistic model, not {kind!r}")
    accountant = _accountant(context)
    result = dp_local_update(weights, features, labels, dp, accountant, seed)
    context.state[protocol.DP_ACCOUNTANT] = ConfigRecord({"noise": [float(h[0]) for h in accountant.history],
                                                          "sample-rate": [float(h[1]) for h in accountant.history],
                                                          "steps": [int(h[2]) for h in accountant.history]})
    return result, float(accountant.get_epsilon(dp.delta))


def _with_own_head(weights: list[np.ndarray], config: ConfigRecord, context: Context) -> list[np.ndarray]:
    """Return the global weights with this site's own head in place of the global one (FedPer runs)."""
    head = int(config.get(protocol.PERSONAL_ARRAYS, 0))
    if not head or protocol.OWN_HEAD not in context.state:
        return weights
    return weights[:-head] + context.state[protocol.OWN_HEAD].to_numpy_ndarrays()


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model (FedPer: with the site's own head) on this site's test split, or on its
    validation rows in a model-selection run; reply with loss and AUROC (aggregates)."""
    config = msg.content[protocol.CONFIG]
    fraction = float(config.get(protocol.VALIDATION_FRACTION, 0.0))
    local = local_split(context, "train" if fraction > 0 else "test")
    data = local.data
    spec, _, kind, hidden, seed = protocol.read_settings(config, data.schema)
    SitePolicy.from_node_config(context.node_config).check_model(kind)
    weights = _with_own_head(msg.content[protocol.ARRAYS].to_numpy_ndarrays(), config, context)
    features, labels = local.model_matrix(spec), data.labels
    if fraction > 0:
        held = validation_rows(labels, seed, data.site, fraction)
        features, labels = features[held], labels[held]
    probabilities = predict(kind, hidden, weights, features)
    loss = float(np.mean(record_loss(predict_logits(kind, hidden, weights, features), labels)))
    content = RecordDict({
        protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: len(labels), protocol.CLIENT_WEIGHT: 1,
                                        "test-loss": loss, "auroc": float(auroc(labels, probabilities))}),
        protocol.SITE: _site_record(data),
    })
    return Message(content, reply_to=msg)


@app.query("personalise")
def personalise(msg: Message, context: Context) -> Message:
    """Personalise the final global model at this site and keep the results here; reply with counts only.

    Methods (config `personalise`): `finetune` (local training from the global model, stopped early
    on a validation split of the site's own training rows), `recalibrate` (intercept and slope of the
    global model's log-odds on the site's training rows) and `own-head` (FedPer: the global body
    with the head this site trained and kept). Each personalised model is written to the site's own
    folder (`site_output`); nothing of it is sent.
    """
    local = local_split(context, "train")
    data = local.data
    config = msg.content[protocol.CONFIG]
    spec, train_config, kind, hidden, seed = protocol.read_settings(config, data.schema)
    weights = _with_own_head(msg.content[protocol.ARRAYS].to_numpy_ndarrays(), config, context)
    head = context.state[protocol.OWN_HEAD].to_numpy_ndarrays() if protocol.OWN_HEAD in context.state else None
    methods = [str(m) for m in config[protocol.PERSONALISE]]
    finetune = dataclasses.replace(train_config, epochs=int(config["finetune-epochs"]),
                                   patience=int(config["finetune-patience"]))
    held = validation_rows(data.labels, seed, data.site, float(config["finetune-validation-fraction"]))
    models = personalised(methods, kind, hidden, weights, local.model_matrix(spec), data.labels, held, finetune,
                          round_seed(seed, data.site, 0), head)
    folder = site_output(context, data.site) / str(config["run"])
    folder.mkdir(parents=True, exist_ok=True)
    for method, arrays in models.items():
        np.savez(folder / f"{method}.npz", **arrays)
    content = RecordDict({protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: len(data),
                                                          "personalised": len(models)}),
                          protocol.SITE: _site_record(data)})
    return Message(content, reply_to=msg)
