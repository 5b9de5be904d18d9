"""The aggregator's ServerApp: federated statistics, then a Flower strategy, with a ledger.

The ServerApp never opens site data. It reads the profile (training
settings) and writes its results to `output-dir`: `ledger.jsonl`,
`history.json` (per round and site: training loss, test loss, AUROC),
`checkpoints/round_NNN.npz` and `final_model.npz`.

Run configuration keys: `params-path` (profile YAML), `data` (a dataset
YAML for provided data, empty for the synthetic sites), `strategy` (fedavg,
fedprox, fedadam), `output-dir`, `resume`, and for client-level DP around
FedAvg `client-dp-noise-multiplier` (> 0 turns it on) and
`client-dp-clipping-norm`; for patient-level DP-SGD at every site the
`dp-*` keys of `protocol.DP_KEYS`; `site-nodes` ("site=node_id,...", the
registered node map: exactly those nodes may take part, see
`fl.flower.integrity`).
"""
from __future__ import annotations

import dataclasses
import json
import secrets
import time
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedProx

from compendium.artifacts import save_arrays
from compendium.params import Profile, load_params
from fl.data import FeatureSchema, FeatureStatistics, PreprocessingSpec
from fl.federated import drift, head_arrays, initial_weights
from fl.flower import protocol
from fl.flower.integrity import CheckedGrid, parse_node_map
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
    federated = profile.federated
    return TrainConfig(epochs=federated.local_epochs, batch_size=federated.batch_size,
                       learning_rate=federated.learning_rate, weight_decay=federated.weight_decay,
                       optimizer=federated.optimizer, patience=None)


class _Resumable:
    """Mixin numbering rounds from `round_offset` + 1, so a resumed run continues the count.

    Clients seed their local training by the round number, and FedAdam's bias
    correction uses it: a resumed run must see the same numbers as an
    uninterrupted one to reach the same model.

    Every round needs every site: a round starts only when all `n_sites`
    nodes are connected (waiting at most `site_timeout` seconds, where
    Flower's sampling would wait forever) and is aggregated only when every
    site replied without error. Otherwise the run stops with a
    `FederationError` naming the round and the last checkpoint, and a run
    with `resume` continues from that checkpoint to the very model an
    uninterrupted run reaches. Aggregating whoever answered would silently
    give a different model.
    """

    round_offset = 0
    n_sites = 0
    site_timeout = 600.0
    #: Server-side optimiser state saved in checkpoints (FedAdam's moments).
    STATE = ("m_t", "v_t")

    def configure_train(self, server_round, arrays, config, grid):
        absolute = server_round + self.round_offset
        wait_for_sites(grid, self.n_sites, self.site_timeout, f"round {absolute}", last_checkpoint=absolute - 1)
        return super().configure_train(absolute, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        absolute = server_round + self.round_offset
        require_every_site(replies, self.n_sites, f"round {absolute} training", last_checkpoint=absolute - 1)
        arrays, metrics = super().aggregate_train(absolute, replies)
        if arrays is not None:  # how far each site's local model ended from the new global model
            new = arrays.to_numpy_ndarrays()
            self.drift[absolute] = {str(r.content[protocol.SITE]["site"]):
                                    drift(r.content[protocol.ARRAYS].to_numpy_ndarrays(), new) for r in replies}
        return arrays, metrics

    @property
    def drift(self) -> dict[int, dict[str, float]]:
        """Per round and site: L2 distance of the site's returned weights from the aggregate."""
        if "_drift" not in self.__dict__:
            self._drift = {}
        return self._drift

    def configure_evaluate(self, server_round, arrays, config, grid):
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        replies = list(replies)
        absolute = server_round + self.round_offset
        require_every_site(replies, self.n_sites, f"round {absolute} evaluation", last_checkpoint=absolute)
        return super().aggregate_evaluate(absolute, replies)

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


class ResumableFedPer(ResumableFedAvg):
    """FedPer (Arivazhagan et al. 2019): FedAvg of the model's body; each site keeps and trains its own head.

    The server-side aggregation is FedAvg's; what makes it FedPer is the
    training config's `personal-arrays` (the head's size), on which every
    site swaps its own head in before training and evaluation and sends the
    received head back unchanged, so the head never leaves the site.
    """


@dataclass(frozen=True)
class ClientLevelDP:
    """Client-level DP settings: each site's update clipped to `clipping_norm`, Gaussian noise on the average."""

    noise_multiplier: float
    clipping_norm: float
    #: "seeded": numpy's global generator seeded from (seed, round), reproducible; "os": seeded from the OS's
    #: cryptographic source (`secrets`) each round, so no one who knows the seed can re-draw the noise.
    noise_source: str = "seeded"


class SeededClientLevelDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's client-level DP wrapper (server-side fixed clipping) around unweighted FedAvg, made reproducible.

    Flower draws the noise from numpy's global generator; seeding it from
    (seed, round) before each aggregation makes a run, and a resumed run,
    reproducible. The wrapper forwards the checkpoint hooks to the strategy it
    wraps.
    """

    def __init__(self, strategy: "ResumableFedAvg", dp: ClientLevelDP, n_sites: int, seed: int):
        super().__init__(strategy, noise_multiplier=dp.noise_multiplier, clipping_norm=dp.clipping_norm,
                         num_sampled_clients=n_sites)
        self.seed, self.noise_source = seed, dp.noise_source

    def aggregate_train(self, server_round, replies):
        absolute = server_round + self.strategy.round_offset
        entropy = [self.seed, 8, absolute] if self.noise_source == "seeded" else secrets.randbits(128)
        np.random.seed(np.random.SeedSequence(entropy).generate_state(1)[0])
        return super().aggregate_train(server_round, replies)

    @property
    def round_offset(self) -> int:
        return self.strategy.round_offset

    @round_offset.setter
    def round_offset(self, value: int) -> None:
        self.strategy.round_offset = value

    @property
    def drift(self) -> dict[int, dict[str, float]]:
        return self.strategy.drift

    def state_arrays(self) -> dict[str, np.ndarray]:
        return self.strategy.state_arrays()

    def load_state(self, saved) -> None:
        self.strategy.load_state(saved)


def make_strategy(name: str, profile: Profile, n_sites: int, client_dp: ClientLevelDP | None = None):
    """Return the Flower strategy `name`, requiring every site in every round (optionally with client-level DP)."""
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n_sites,
                  min_evaluate_nodes=n_sites, min_available_nodes=n_sites)
    federated = profile.federated
    if client_dp is not None and name != "fedavg":
        raise FederationError(f"client-level DP wraps FedAvg only, not {name!r}")
    if name == "fedavg":
        # Under client-level DP every site weighs the same (the wrapper's sensitivity is C/n).
        weight_key = protocol.CLIENT_WEIGHT if client_dp else protocol.NUM_EXAMPLES
        strategy = ResumableFedAvg(**common, weighted_by_key=weight_key)
    elif name == "fedprox":
        strategy = ResumableFedProx(**common, proximal_mu=federated.proximal_mu)
    elif name == "fedadam":
        strategy = ResumableFedAdam(**common, eta=federated.server_learning_rate, eta_l=federated.learning_rate)
    elif name == "fedper":
        strategy = ResumableFedPer(**common, weighted_by_key=protocol.NUM_EXAMPLES)
    else:
        raise FederationError(f"unknown strategy {name!r}; choose fedavg, fedprox, fedadam or fedper")
    strategy.n_sites, strategy.site_timeout = n_sites, federated.round_timeout_s
    return SeededClientLevelDP(strategy, client_dp, n_sites, profile.seed) if client_dp else strategy


def saved_weights(saved) -> list[np.ndarray]:
    """Return the model's weight arrays from a loaded checkpoint or final-model file (weight_0, weight_1, ...)."""
    return [saved[f"weight_{i}"] for i in range(sum(k.startswith("weight_") for k in saved.files))]


def latest_checkpoint(output_dir: Path) -> int:
    """Return the last completed round with a checkpoint (0 if none)."""
    rounds = [int(path.stem.split("_")[1]) for path in (Path(output_dir) / CHECKPOINTS).glob("round_*.npz")]
    return max(rounds, default=0)


def _resume_hint(last_checkpoint: int | None) -> str:
    if last_checkpoint is None:
        return ""
    if last_checkpoint <= 0:
        return "; no round is checkpointed yet: start every site and run again"
    return (f"; round {last_checkpoint} is checkpointed: start every site and run again with resume "
            "to continue from it")


def wait_for_sites(grid: Grid, expected: int, timeout: float, stage: str = "federated statistics",
                   last_checkpoint: int | None = None) -> list[int]:
    """Return the node ids once `expected` nodes are connected; fail clearly after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise FederationError(f"{stage}: only {len(nodes)} of {expected} sites connected within "
                                  f"{timeout:.0f} s{_resume_hint(last_checkpoint)}")
        time.sleep(0.2)
    return nodes


def require_every_site(replies: list[Message], expected: int, stage: str, last_checkpoint: int | None) -> None:
    """Raise FederationError unless `expected` replies arrived, none of them an error."""
    errors = [r.error.reason for r in replies if r.has_error()]
    if len(replies) < expected or errors:
        detail = f" (errors: {'; '.join(errors)})" if errors else ""
        raise FederationError(f"{stage}: {len(replies) - len(errors)} of {expected} sites replied{detail}"
                              f"{_resume_hint(last_checkpoint)}")


def federated_statistics(grid: LedgerGrid, nodes: list[int], timeout: float) -> tuple[PreprocessingSpec, dict[str, int]]:
    """Return the preprocessing spec from every site's aggregates, and each site's training rows."""
    messages = [Message(RecordDict({protocol.CONFIG: ConfigRecord({"request": "feature-statistics"})}),
                        dst_node_id=node, message_type=protocol.QUERY_STATISTICS, group_id="0") for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    errors = [r for r in replies if r.has_error()]
    if errors or len(replies) < len(nodes):
        reasons = "; ".join(r.error.reason for r in errors) or "no reply"
        raise FederationError(f"{len(nodes) - len(replies) + len(errors)} site(s) could not report statistics: "
                              f"{reasons}")
    total, rows, agreed = None, {}, None
    for reply in replies:
        site = str(reply.content[protocol.SITE]["site"])
        schema = protocol.schema_of(reply.content[protocol.SITE])
        agreed = agreed or (site, schema)
        if schema != agreed[1]:
            missing = sorted(set(agreed[1][0]) - set(schema[0]))
            extra = sorted(set(schema[0]) - set(agreed[1][0]))
            raise FederationError(f"site {site!r} has different feature columns from {agreed[0]!r}: missing "
                                  f"{missing}, extra {extra} (or other transforms); every site needs the same list")
        count, sums, squares = reply.content[protocol.STATISTICS].to_numpy_ndarrays()
        site_rows = int(reply.content[protocol.METRICS]["rows"])
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


def history_rows(grid: LedgerGrid, server_round: int, drifts: dict[str, float] | None = None) -> list[dict]:
    """Return one row per site for a round: training loss, drift, test (or validation) loss and AUROC.

    In a model-selection run (`validation-fraction` > 0) the evaluation is on each site's held-out
    training rows: `test_loss` and `auroc` are then validation figures, and `examples` their count.
    """
    table: dict[str, dict] = {}
    for group, message_type, site, metrics in grid.replies:
        if group != server_round or message_type not in (MessageType.TRAIN, MessageType.EVALUATE):
            continue
        row = table.setdefault(site, {"round": server_round, "site": site})
        if message_type == MessageType.TRAIN:
            row["train_loss"] = metrics["train-loss"]
            if "epsilon" in metrics:  # the site's patient-level epsilon after this round (DP-SGD runs)
                row["epsilon"] = metrics["epsilon"]
            if drifts and site in drifts:
                row["drift"] = drifts[site]
        else:
            row["test_loss"] = metrics["test-loss"]
            row["auroc"] = metrics["auroc"]
            row["examples"] = metrics[protocol.NUM_EXAMPLES]
    return [table[site] for site in sorted(table)]


@dataclass(frozen=True)
class Personalisation:
    """What each site does with the final global model: `methods` (fl.federated.PERSONALISATION) and
    fine-tuning's settings (epochs, early-stopping patience, share of the site's training rows held out)."""

    methods: tuple[str, ...]
    finetune_epochs: int = 100
    patience: int = 20
    validation_fraction: float = 0.2


def personalise_at_sites(grid: LedgerGrid, nodes: list[int], weights: list[np.ndarray], settings: dict,
                         personalisation: Personalisation, run: str, timeout: float, server_round: int) -> None:
    """Ask every site to personalise the final model and keep the result at home; fail if one cannot.

    The messages carry round number `server_round` (one after the last training round) in the ledger.
    """
    config = {**settings, protocol.PERSONALISE: list(personalisation.methods), "run": run,
              "finetune-epochs": personalisation.finetune_epochs, "finetune-patience": personalisation.patience,
              "finetune-validation-fraction": personalisation.validation_fraction}
    messages = [Message(RecordDict({protocol.ARRAYS: ArrayRecord(weights), protocol.CONFIG: ConfigRecord(config)}),
                        dst_node_id=node, message_type=protocol.QUERY_PERSONALISE, group_id=str(server_round))
                for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    require_every_site(replies, len(nodes), "personalisation", last_checkpoint=None)


def run_federation(grid: Grid, profile: Profile, strategy_name: str, output_dir: Path,
                   resume: bool = False, client_dp: ClientLevelDP | None = None,
                   patient_dp=None, validation_fraction: float = 0.0,
                   personalisation: Personalisation | None = None,
                   preprocessing: PreprocessingSpec | None = None,
                   node_map: dict[int, str] | None = None) -> FederationResult:
    """Run federated statistics and `strategy_name` training over the grid's sites; write the artifacts.

    With a fixed `preprocessing` (a DP run's public scaling,
    `fl.privacy.public_scaling`) no statistics round is run: no site sends
    counts or sums, and the spec the sites receive depends on no data.

    With `resume`, training continues from the last round checkpoint in
    `output_dir` (weights and server optimiser state) and reaches the same
    final model as an uninterrupted run. With `validation_fraction` > 0
    (federated model selection) each site trains on the rest of its training
    split and the per-round evaluation is on the held-out share. With
    `personalisation`, every site then personalises the final model and
    keeps it (FedPer runs always add `own-head`). Every reply is checked
    before it is aggregated, and with `node_map` ({node id: site}) only those
    nodes may take part (`fl.flower.integrity.CheckedGrid`).
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
    checked = CheckedGrid(ledger, node_map)  # outside the ledger: a rejected reply is still recorded
    federated = profile.federated
    n_sites = len(profile.sites)
    started = time.perf_counter()
    nodes = wait_for_sites(checked, n_sites, federated.round_timeout_s)
    if preprocessing is None:
        spec, rows = federated_statistics(checked, nodes, federated.round_timeout_s)
    else:
        spec, rows = preprocessing, {}
    statistics_seconds = time.perf_counter() - started

    hidden = tuple(profile.baselines.mlp_hidden)
    kind = profile.baselines.model
    settings = dict(protocol.settings_record(spec, local_train_config(profile), kind, hidden, profile.seed))
    if patient_dp is not None:  # fl.privacy.dp.DPConfig: DP-SGD at every site, accountant kept by each site
        settings.update(protocol.dp_entries(patient_dp))
    if validation_fraction > 0:
        settings[protocol.VALIDATION_FRACTION] = float(validation_fraction)
    if strategy_name == "fedper":
        settings[protocol.PERSONAL_ARRAYS] = head_arrays(kind)
    strategy = make_strategy(strategy_name, profile, n_sites, client_dp)
    if done:
        saved = np.load(output_dir / CHECKPOINTS / f"round_{done:03d}.npz")
        start = saved_weights(saved)
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
            for row in history_rows(ledger, absolute, strategy.drift.get(absolute)):
                handle.write(json.dumps(row) + "\n")
        return None

    started = time.perf_counter()
    result = strategy.start(grid=checked, initial_arrays=ArrayRecord(start), num_rounds=federated.rounds - done,
                            timeout=federated.round_timeout_s, train_config=ConfigRecord(dict(settings)),
                            evaluate_config=ConfigRecord(dict(settings)), evaluate_fn=checkpoint)
    training_seconds = time.perf_counter() - started
    completed = latest_checkpoint(output_dir)
    rounds = federated.rounds
    if result.arrays is None or completed < rounds or len(result.train_metrics_clientapp) < rounds - done:
        raise FederationError(f"{strategy_name}: {completed} of {rounds} rounds completed; see the ledger for "
                              "the missing replies, then run again with resume to continue from the checkpoint")
    weights = result.arrays.to_numpy_ndarrays()
    if strategy_name == "fedper":
        personalisation = Personalisation(("own-head",)) if personalisation is None else dataclasses.replace(
            personalisation, methods=(*personalisation.methods, "own-head"))
    if personalisation is not None and personalisation.methods:
        nodes = wait_for_sites(checked, n_sites, federated.round_timeout_s, "personalisation")
        personalise_at_sites(checked, nodes, weights, settings, personalisation, strategy_name,
                             federated.round_timeout_s, federated.rounds + 1)
    save_arrays(output_dir / FINAL_MODEL_FILE, spec_mean=spec.mean, spec_std=spec.std,
                **{f"weight_{i}": w for i, w in enumerate(weights)})
    history = [json.loads(line) for line in history_path.read_text().splitlines()]
    (output_dir / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n")
    return FederationResult(strategy_name, weights, spec, history, rows, statistics_seconds, training_seconds)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for Flower's engines: settings come from the run configuration."""
    config = context.run_config
    profile = load_params(str(config["params-path"]), str(config.get("data", "")) or None)
    client_dp = None
    if float(config.get("client-dp-noise-multiplier", 0.0)) > 0:
        client_dp = ClientLevelDP(float(config["client-dp-noise-multiplier"]),
                                  float(config["client-dp-clipping-norm"]))
    run_federation(grid, profile, str(config["strategy"]), Path(str(config["output-dir"])),
                   resume=bool(config.get("resume", False)), client_dp=client_dp, patient_dp=protocol.read_dp(config),
                   node_map=parse_node_map(str(config.get("site-nodes", ""))))
