"""The aggregator's ServerApp: federated statistics, then a Flower strategy, with a ledger.

The ServerApp never opens site data. It reads the profile (training
settings) and writes its results to `output-dir`: `ledger.jsonl`,
`history.json` (per round and site: training loss, test loss, AUROC),
`checkpoints/round_NNN.npz` and `final_model.npz`.

Run configuration keys: `params-path` (profile YAML), `strategy` (fedavg,
fedprox, fedadam), `output-dir`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from compendium.params import Profile, load_params
from fl.data import FEATURE_NAMES, FeatureStatistics, PreprocessingSpec
from fl.federated import initial_weights
from fl.flower import protocol as p
from fl.flower.ledger import LedgerGrid
from fl.train import TrainConfig

LEDGER_FILE = "ledger.jsonl"
HISTORY_FILE = "history.json"
FINAL_MODEL_FILE = "final_model.npz"
CHECKPOINTS = "checkpoints"

app = ServerApp()


class FederationError(RuntimeError):
    """The federation cannot proceed (a site missing, empty or inconsistent)."""


@dataclass
class FederationResult:
    """The outcome of one federated run."""

    strategy: str
    weights: list[np.ndarray]
    spec: PreprocessingSpec
    history: list[dict]
    site_rows: dict[str, int]
    seconds_statistics: float
    seconds_training: float


def local_train_config(profile: Profile) -> TrainConfig:
    """Return the local training configuration every site runs each round."""
    f = profile.federated
    return TrainConfig(epochs=f.local_epochs, batch_size=f.batch_size, learning_rate=f.learning_rate,
                       weight_decay=f.weight_decay, optimizer=f.optimizer, patience=None)


def make_strategy(name: str, profile: Profile, n_sites: int):
    """Return the Flower strategy `name`, requiring every site in every round."""
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n_sites,
                  min_evaluate_nodes=n_sites, min_available_nodes=n_sites)
    f = profile.federated
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=f.proximal_mu)
    if name == "fedadam":
        return FedAdam(**common, eta=f.server_learning_rate, eta_l=f.learning_rate)
    raise FederationError(f"unknown strategy {name!r}; choose fedavg, fedprox or fedadam")


def wait_for_sites(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Return the node ids once `expected` nodes are connected; fail clearly after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} of {expected} sites connected within {timeout:.0f} s")
        time.sleep(0.2)
    return nodes


def federated_statistics(grid: LedgerGrid, nodes: list[int], timeout: float) -> tuple[PreprocessingSpec, dict[str, int]]:
    """Return the preprocessing spec from every site's aggregates, and each site's training rows."""
    messages = [Message(RecordDict({p.CONFIG: ConfigRecord({"request": "feature-statistics"})}),
                        dst_node_id=node, message_type=p.QUERY_STATISTICS, group_id="0") for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    errors = [r for r in replies if r.has_error()]
    if errors or len(replies) < len(nodes):
        reasons = "; ".join(r.error.reason for r in errors) or "no reply"
        raise FederationError(f"{len(nodes) - len(replies) + len(errors)} site(s) could not report statistics: "
                              f"{reasons}")
    total, rows = None, {}
    for reply in replies:
        site = str(reply.content[p.SITE]["site"])
        features = list(reply.content[p.SITE]["features"])
        if features != list(FEATURE_NAMES):
            missing = sorted(set(FEATURE_NAMES) - set(features))
            extra = sorted(set(features) - set(FEATURE_NAMES))
            raise FederationError(f"site {site!r} has different feature columns: missing {missing}, extra {extra}")
        count, sums, squares = reply.content[p.STATISTICS].to_numpy_ndarrays()
        site_rows = int(reply.content[p.METRICS]["rows"])
        if site_rows == 0:
            raise FederationError(f"site {site!r} has no training rows")
        stats = FeatureStatistics(count, sums, squares, site_rows)
        total = stats if total is None else total + stats
        rows[site] = site_rows
    return PreprocessingSpec.from_statistics(total), rows


def history_from_ledger(grid: LedgerGrid) -> list[dict]:
    """Return one row per (round, site) with training loss, test loss and test AUROC."""
    table: dict[tuple[int, str], dict] = {}
    for group, message_type, site, metrics in grid.replies:
        if message_type not in (MessageType.TRAIN, MessageType.EVALUATE):
            continue
        row = table.setdefault((int(group), site), {"round": int(group), "site": site})
        if message_type == MessageType.TRAIN:
            row["train_loss"] = metrics["train-loss"]
        else:
            row["test_loss"] = metrics["test-loss"]
            row["auroc"] = metrics["auroc"]
    return [table[key] for key in sorted(table)]


def run_federation(grid: Grid, profile: Profile, strategy_name: str, output_dir: Path) -> FederationResult:
    """Run federated statistics and `strategy_name` training over the grid's sites; write the artifacts."""
    import logging

    logging.getLogger("flwr").setLevel(WARNING)
    output_dir = Path(output_dir)
    (output_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    ledger_path = output_dir / LEDGER_FILE
    ledger_path.unlink(missing_ok=True)
    ledger = LedgerGrid(grid, ledger_path, run_label=strategy_name)
    f = profile.federated
    n_sites = len(profile.sites)
    started = time.perf_counter()
    nodes = wait_for_sites(ledger, n_sites, f.round_timeout_s)
    spec, rows = federated_statistics(ledger, nodes, f.round_timeout_s)
    statistics_seconds = time.perf_counter() - started

    hidden = tuple(profile.baselines.mlp_hidden)
    kind = profile.baselines.model
    weights0 = initial_weights(kind, spec.n_outputs, hidden, profile.seed)
    settings = p.settings_record(spec, local_train_config(profile), kind, hidden, profile.seed)

    def checkpoint(server_round: int, arrays: ArrayRecord):
        np.savez(output_dir / CHECKPOINTS / f"round_{server_round:03d}.npz", *arrays.to_numpy_ndarrays())
        return None

    strategy = make_strategy(strategy_name, profile, n_sites)
    started = time.perf_counter()
    result = strategy.start(grid=ledger, initial_arrays=ArrayRecord(weights0), num_rounds=f.rounds,
                            timeout=f.round_timeout_s, train_config=ConfigRecord(dict(settings)),
                            evaluate_config=ConfigRecord(dict(settings)), evaluate_fn=checkpoint)
    training_seconds = time.perf_counter() - started
    if result.arrays is None or len(result.train_metrics_clientapp) < f.rounds:
        raise FederationError(f"{strategy_name}: only {len(result.train_metrics_clientapp)} of {f.rounds} rounds "
                              "completed; see the ledger for the missing replies")
    weights = result.arrays.to_numpy_ndarrays()
    np.savez(output_dir / FINAL_MODEL_FILE, spec_mean=spec.mean, spec_std=spec.std,
             **{f"weight_{i}": w for i, w in enumerate(weights)})
    history = history_from_ledger(ledger)
    (output_dir / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n")
    return FederationResult(strategy_name, weights, spec, history, rows, statistics_seconds, training_seconds)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for Flower's engines: settings come from the run configuration."""
    config = context.run_config
    profile = load_params(str(config["params-path"]))
    run_federation(grid, profile, str(config["strategy"]), Path(str(config["output-dir"])))
