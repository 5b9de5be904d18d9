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

from compendium.artifacts import save_arrays
from compendium.params import Profile, load_params
from fl.data import FeatureSchema, FeatureStatistics, PreprocessingSpec
from fl.federated import initial_weights
from fl.flower import protocol as p
from fl.flower.ledger import LedgerGrid
from fl.train import TrainConfig

LEDGER_FILE = "ledger.jsonl"
HISTORY_FILE = "history.json"
HISTORY_PARTS_FILE = "history.jsonl"  # appended each round, so a resumed run keeps earlier rounds
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


class _Resumable:
    """Mixin numbering rounds from `round_offset` + 1, so a resumed run continues the count.

    Clients seed their local training by the round number, and FedAdam's bias
    correction uses it: a resumed run must see the same numbers as an
    uninterrupted one to reach the same model.
    """

    round_offset = 0
    #: Server-side optimiser state saved in checkpoints (FedAdam's moments).
    STATE = ("m_t", "v_t")

    def configure_train(self, server_round, arrays, config, grid):
        return super().configure_train(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return super().aggregate_train(server_round + self.round_offset, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return super().aggregate_evaluate(server_round + self.round_offset, replies)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Return the server optimiser's state as named arrays (empty for FedAvg and FedProx)."""
        out = {}
        for name in self.STATE:
            for key, value in (getattr(self, name, None) or {}).items():
                out[f"state__{name}__{key}"] = np.asarray(value)
        return out

    def load_state(self, saved) -> None:
        """Restore state saved by `state_arrays`."""
        for name in self.STATE:
            keys = [k for k in saved.files if k.startswith(f"state__{name}__")]
            if keys:
                setattr(self, name, {k.split("__", 2)[2]: saved[k] for k in keys})


class ResumableFedAvg(_Resumable, FedAvg):
    """FedAvg that can continue from a checkpoint."""


class ResumableFedProx(_Resumable, FedProx):
    """FedProx that can continue from a checkpoint."""


class ResumableFedAdam(_Resumable, FedAdam):
    """FedAdam that can continue from a checkpoint (its moments are checkpointed)."""


def make_strategy(name: str, profile: Profile, n_sites: int):
    """Return the Flower strategy `name`, requiring every site in every round."""
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n_sites,
                  min_evaluate_nodes=n_sites, min_available_nodes=n_sites)
    f = profile.federated
    if name == "fedavg":
        return ResumableFedAvg(**common)
    if name == "fedprox":
        return ResumableFedProx(**common, proximal_mu=f.proximal_mu)
    if name == "fedadam":
        return ResumableFedAdam(**common, eta=f.server_learning_rate, eta_l=f.learning_rate)
    raise FederationError(f"unknown strategy {name!r}; choose fedavg, fedprox or fedadam")


def latest_checkpoint(output_dir: Path) -> int:
    """Return the last completed round with a checkpoint (0 if none)."""
    rounds = [int(p.stem.split("_")[1]) for p in (Path(output_dir) / CHECKPOINTS).glob("round_*.npz")]
    return max(rounds, default=0)


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
    total, rows, agreed = None, {}, None
    for reply in replies:
        site = str(reply.content[p.SITE]["site"])
        schema = p.schema_of(reply.content[p.SITE])
        agreed = agreed or (site, schema)
        if schema != agreed[1]:
            missing = sorted(set(agreed[1][0]) - set(schema[0]))
            extra = sorted(set(schema[0]) - set(agreed[1][0]))
            raise FederationError(f"site {site!r} has different feature columns from {agreed[0]!r}: missing "
                                  f"{missing}, extra {extra} (or other transforms); every site needs the same list")
        count, sums, squares = reply.content[p.STATISTICS].to_numpy_ndarrays()
        site_rows = int(reply.content[p.METRICS]["rows"])
        if site_rows == 0:
            raise FederationError(f"site {site!r} has no training rows")
        stats = FeatureStatistics(count, sums, squares, site_rows)
        total = stats if total is None else total + stats
        rows[site] = site_rows
    features, logs, indicators = agreed[1]
    # Kinds and subgroups stay at the sites; the spec needs names and transforms only.
    schema = FeatureSchema(features, ("numeric",) * len(features), logs, indicators)
    try:
        return PreprocessingSpec.from_statistics(total, schema), rows
    except ValueError as error:
        raise FederationError(str(error)) from None


def history_rows(grid: LedgerGrid, server_round: int) -> list[dict]:
    """Return one row per site for a round: training loss, test loss and test AUROC."""
    table: dict[str, dict] = {}
    for group, message_type, site, metrics in grid.replies:
        if group != server_round or message_type not in (MessageType.TRAIN, MessageType.EVALUATE):
            continue
        row = table.setdefault(site, {"round": server_round, "site": site})
        if message_type == MessageType.TRAIN:
            row["train_loss"] = metrics["train-loss"]
        else:
            row["test_loss"] = metrics["test-loss"]
            row["auroc"] = metrics["auroc"]
    return [table[site] for site in sorted(table)]


def run_federation(grid: Grid, profile: Profile, strategy_name: str, output_dir: Path,
                   resume: bool = False) -> FederationResult:
    """Run federated statistics and `strategy_name` training over the grid's sites; write the artifacts.

    With `resume`, training continues from the last round checkpoint in
    `output_dir` (weights and server optimiser state) and reaches the same
    final model as an uninterrupted run.
    """
    import logging

    logging.getLogger("flwr").setLevel(WARNING)
    output_dir = Path(output_dir)
    (output_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    ledger_path = output_dir / LEDGER_FILE
    history_path = output_dir / HISTORY_PARTS_FILE
    done = latest_checkpoint(output_dir) if resume else 0
    if not resume:
        for stale in (ledger_path, history_path, *(output_dir / CHECKPOINTS).glob("round_*.npz")):
            stale.unlink(missing_ok=True)
    ledger = LedgerGrid(grid, ledger_path, run_label=strategy_name)
    f = profile.federated
    n_sites = len(profile.sites)
    started = time.perf_counter()
    nodes = wait_for_sites(ledger, n_sites, f.round_timeout_s)
    spec, rows = federated_statistics(ledger, nodes, f.round_timeout_s)
    statistics_seconds = time.perf_counter() - started

    hidden = tuple(profile.baselines.mlp_hidden)
    kind = profile.baselines.model
    settings = p.settings_record(spec, local_train_config(profile), kind, hidden, profile.seed)
    strategy = make_strategy(strategy_name, profile, n_sites)
    if done:
        saved = np.load(output_dir / CHECKPOINTS / f"round_{done:03d}.npz")
        start = [saved[f"weight_{i}"] for i in range(sum(k.startswith("weight_") for k in saved.files))]
        strategy.load_state(saved)
        strategy.round_offset = done
    else:
        start = initial_weights(kind, spec.n_outputs, hidden, profile.seed)

    def checkpoint(server_round: int, arrays: ArrayRecord):
        absolute = server_round + strategy.round_offset
        if server_round == 0 and done:
            return None  # the resumed-from checkpoint is already on disk
        save_arrays(output_dir / CHECKPOINTS / f"round_{absolute:03d}.npz",
                    **{f"weight_{i}": w for i, w in enumerate(arrays.to_numpy_ndarrays())}, **strategy.state_arrays())
        with open(history_path, "a") as handle:
            for row in history_rows(ledger, absolute):
                handle.write(json.dumps(row) + "\n")
        return None

    started = time.perf_counter()
    result = strategy.start(grid=ledger, initial_arrays=ArrayRecord(start), num_rounds=f.rounds - done,
                            timeout=f.round_timeout_s, train_config=ConfigRecord(dict(settings)),
                            evaluate_config=ConfigRecord(dict(settings)), evaluate_fn=checkpoint)
    training_seconds = time.perf_counter() - started
    completed = latest_checkpoint(output_dir)
    if result.arrays is None or completed < f.rounds or len(result.train_metrics_clientapp) < f.rounds - done:
        raise FederationError(f"{strategy_name}: {completed} of {f.rounds} rounds completed; see the ledger for "
                              "the missing replies, then run again with resume to continue from the checkpoint")
    weights = result.arrays.to_numpy_ndarrays()
    save_arrays(output_dir / FINAL_MODEL_FILE, spec_mean=spec.mean, spec_std=spec.std,
                **{f"weight_{i}": w for i, w in enumerate(weights)})
    history = [json.loads(line) for line in history_path.read_text().splitlines()]
    (output_dir / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n")
    return FederationResult(strategy_name, weights, spec, history, rows, statistics_seconds, training_seconds)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for Flower's engines: settings come from the run configuration."""
    config = context.run_config
    profile = load_params(str(config["params-path"]))
    run_federation(grid, profile, str(config["strategy"]), Path(str(config["output-dir"])),
                   resume=bool(config.get("resume", False)))
