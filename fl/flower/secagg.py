"""The pilot's FedAvg rounds under Flower's secure aggregation (SecAgg+), and a record of what crossed.

Flower 1.42 has SecAgg+ only in its legacy API, so this module brings its
own pair of apps around the pilot's local training:

- server: a `ServerApp` whose `main` runs `DefaultWorkflow` with
  `SecAggPlusWorkflow` as its fit workflow, over a `LegacyContext` holding
  a legacy `FedAvg` (weighted by training rows, every site every round);
- site: a legacy `ClientApp` of a `NumPyClient` that trains exactly as the
  pilot's ClientApp does (`fl.federated.local_update` on the site's own
  training split, the pilot's settings record and round seeds), under
  `secaggplus_mod`.

The same two apps without the workflow and the mod are plain FedAvg, the
baseline the cost is measured against. Both run on the profile's engine:
`direct` (`engine.DirectGrid`, every message serialised and rebuilt as in
Flower's engines) or `ray` (`flwr.simulation.run_simulation`).

What the server sees is recorded by `InterceptingGrid`, which sits between
the workflow and the engine: every message's size, the global model each
round's training starts from, and each site's upload as the server
received it (plain: the site's model weights; SecAgg+: the masked integer
vector). Nothing is re-implemented: the masks are Flower's own.

Reproducibility: SecAgg+ masks come from fresh key pairs and
`os.urandom` each run, so the masked uploads differ from run to run; they
cancel exactly (integer sums modulo `modulus_range`). The only other
randomness is the mod's stochastic rounding, drawn from numpy's global
generator in the site's process: the site seeds it from (seed, site,
round) just before handing its weights to the mod, so the unmasked
aggregate is the same in every run.
"""
from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from compendium.params import Profile
from fl.data import PreprocessingSpec
from fl.federated import initial_weights, local_update, round_seed
from fl.flower import protocol
from fl.flower.client_app import local_split
from fl.flower.engine import (RAY_BACKEND_CONFIG, SERVER_NODE_ID, DirectGrid, direct_contexts, run_simulation,
                              use_server_identity)
from fl.flower.ledger import ForwardingGrid
from fl.flower.server_app import FederationError, local_train_config

MECHANISM = "Flower SecAgg+ (SecAggPlusWorkflow + secaggplus_mod)"
#: Stage name of a plain FedAvg training message (no SecAgg+ configs in it).
PLAIN_FIT = "fit"


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ parameters: quantisation (Flower's defaults but the clipping range) and key sharing.

    `num_shares` and `reconstruction_threshold` are fractions, as Flower
    reads floats: 1.0 shares every site's secrets with every other site and
    needs all their shares to unmask, which is also the pilot's policy (every
    round needs every site); with at most ten hospitals there is nothing to
    gain from SecAgg+'s sparser neighbourhoods.
    """

    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    num_shares: float = 1.0
    reconstruction_threshold: float = 1.0

    @property
    def quantisation_step(self) -> float:
        """Return the width of one quantisation level of a site's weighted weights."""
        return 2 * self.clipping_range / self.quantization_range


@dataclass(frozen=True)
class FederationPlan:
    """What the server starts from: the pilot's settings record, initial model, rounds and site sizes."""

    settings: dict
    initial: list[np.ndarray]
    rounds: int
    site_rows: dict[str, int]
    timeout: float

    @property
    def total_rows(self) -> int:
        return sum(self.site_rows.values())

    def fit_config(self, server_round: int) -> dict:
        """Return a legacy fit config: the round and the pilot's settings (legacy configs hold no lists: JSON)."""
        return {"server-round": server_round, "settings": json.dumps(self.settings)}


def federation_plan(profile: Profile, spec: PreprocessingSpec, site_rows: dict[str, int],
                    rounds: int) -> FederationPlan:
    """Return the plan of `rounds` FedAvg rounds with the profile's local training and the federated `spec`."""
    kind, hidden = profile.baselines.model, tuple(profile.baselines.mlp_hidden)
    settings = dict(protocol.settings_record(spec, local_train_config(profile), kind, hidden, profile.seed))
    return FederationPlan(settings, initial_weights(kind, spec.n_outputs, hidden, profile.seed), rounds,
                          dict(site_rows), profile.federated.round_timeout_s)


@dataclass
class RunRecord:
    """What the server sent and received in one run (SecAgg+ or plain), per round."""

    secure: bool
    sent: dict[int, list[np.ndarray]] = field(default_factory=dict)  # the global model each round trains from
    aggregates: dict[int, list[np.ndarray]] = field(default_factory=dict)  # the global model after each round
    uploads: dict[int, dict[str, list[np.ndarray]]] = field(default_factory=dict)  # what the server received
    messages: list[dict] = field(default_factory=list)  # round, direction, node, stage, bytes
    site_of_node: dict[int, str] = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)  # SecAgg+ setup as sent to the sites
    round_started: dict[int, float] = field(default_factory=dict)
    finished: float = 0.0
    errors: list[str] = field(default_factory=list)

    def seconds_per_round(self) -> dict[int, float]:
        """Return each round's wall time, from its first message to the next round's (or the run's end)."""
        starts = sorted(self.round_started.items())
        ends = [start for _, start in starts[1:]] + [self.finished]
        return {r: end - start for (r, start), end in zip(starts, ends)}

    def bytes_per_round(self) -> dict[int, dict[str, int]]:
        """Return per round the bytes each way: {round: {"server->site": n, "site->server": n}}."""
        out: dict[int, dict[str, int]] = {}
        for message in self.messages:
            row = out.setdefault(message["round"], {"server->site": 0, "site->server": 0})
            row[message["direction"]] += message["bytes"]
        return out


class _SiteOrderedFedAvg(FedAvg):
    """Legacy FedAvg that sums sites in name order (as the pilot does), fails on a missing site, records results."""

    def __init__(self, record: RunRecord, n_sites: int, **kwargs):
        super().__init__(**kwargs)
        self.record, self.n_sites = record, n_sites

    def configure_fit(self, server_round, parameters, client_manager):
        self.record.sent[server_round] = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        if failures or len(results) < self.n_sites:
            raise FederationError(f"secure aggregation round {server_round}: {len(results)} of {self.n_sites} "
                                  f"sites replied ({len(failures)} failures: {failures})")
        results = sorted(results, key=lambda result: str(result[1].metrics["site"]))
        aggregated, metrics = super().aggregate_fit(server_round, results, failures)
        self.record.aggregates[server_round] = parameters_to_ndarrays(aggregated)
        return aggregated, metrics


def _stage(message: Message) -> str:
    if message.has_content() and RECORD_KEY_CONFIGS in message.content.config_records:
        return str(message.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, ""))
    return PLAIN_FIT


class InterceptingGrid(ForwardingGrid):
    """A Grid that records, for the server's eyes, every message a workflow sends and receives."""

    def __init__(self, grid: Grid, record: RunRecord):
        super().__init__(grid)
        self.record = record

    def send_and_receive(self, messages, *, timeout=None):
        outgoing = list(messages)
        record = self.record
        server_round = int(outgoing[0].metadata.group_id or 0) if outgoing else 0
        record.round_started.setdefault(server_round, time.perf_counter())
        stages = {}
        for message in outgoing:
            stage = stages[message.metadata.dst_node_id] = _stage(message)
            record.messages.append({"round": server_round, "direction": "server->site", "stage": stage,
                                    "node": message.metadata.dst_node_id,
                                    "bytes": message_to_proto(message).ByteSize()})
            if stage == Stage.SETUP and not record.protocol:
                configs = message.content.config_records[RECORD_KEY_CONFIGS]
                record.protocol = {"num_shares": int(configs[Key.SHARE_NUMBER]),
                                   "reconstruction_threshold": int(configs[Key.THRESHOLD]),
                                   "max_weight": float(configs[Key.MAX_WEIGHT])}
        replies = list(self._grid.send_and_receive(outgoing, timeout=timeout))
        for reply in replies:
            node = reply.metadata.src_node_id
            stage = stages.get(node, "")
            record.messages.append({"round": server_round, "direction": "site->server", "stage": stage,
                                    "node": node, "bytes": message_to_proto(reply).ByteSize()})
            if reply.has_error():
                record.errors.append(f"round {server_round}, stage {stage}: {reply.error.reason}")
            elif stage in (PLAIN_FIT, Stage.COLLECT_MASKED_VECTORS):
                fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
                site = record.site_of_node[node] = str(fitres.metrics["site"])
                if stage == PLAIN_FIT:
                    upload = parameters_to_ndarrays(fitres.parameters)
                else:  # the mod replaced the weights by the masked vector: [masked weight factor, masked weights...]
                    masked = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
                    upload = [bytes_to_ndarray(b) for b in masked]
                record.uploads.setdefault(server_round, {})[site] = upload
        return replies


class SiteClient(NumPyClient):
    """A hospital's legacy client: the pilot's local training on its own training split, nothing else."""

    def __init__(self, context: Context):
        self.context = context

    def fit(self, parameters, config):
        local = local_split(self.context, "train")
        data = local.data
        settings = json.loads(str(config["settings"]))
        spec, train_config, kind, hidden, seed = protocol.read_settings(settings, data.schema)
        server_round = int(config["server-round"])
        result = local_update(kind, hidden, parameters, local.model_matrix(spec), data.labels, train_config,
                              round_seed(seed, data.site, server_round))
        # secaggplus_mod quantises these weights with stochastic rounding drawn from numpy's global generator:
        # seeded here, the unmasked aggregate is reproducible (the masks are not, and need not be).
        np.random.seed(quantisation_seed(seed, data.site, server_round))
        return result.weights, result.num_examples, {"site": data.site, "train-loss": result.train_loss}


def quantisation_seed(seed: int, site: str, server_round: int) -> int:
    """Return the seed of a site's stochastic rounding in one round (independent of its training seed)."""
    return int(np.random.SeedSequence([seed, 12, zlib.crc32(site.encode()), server_round]).generate_state(1)[0])


def client_app(secure: bool, site_dirs: list[Path]) -> ClientApp:
    """Return the sites' legacy ClientApp (under `secaggplus_mod` when `secure`).

    A node's folder comes from its node config (`site-dir`, direct engine)
    or from `site-dirs` by partition id (Ray), as for the pilot's ClientApp.
    """
    site_dirs_config = {"site-dirs": ",".join(str(d) for d in site_dirs)}

    def client_fn(context: Context):
        merged = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                         state=context.state, run_config={**context.run_config, **site_dirs_config})
        return SiteClient(merged).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else [])


def server_app(plan: FederationPlan, record: RunRecord, secagg: SecAggSettings | None) -> ServerApp:
    """Return the ServerApp: DefaultWorkflow over legacy FedAvg, with SecAggPlusWorkflow unless `secagg` is None."""
    app = ServerApp()
    n_sites = len(plan.site_rows)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = _SiteOrderedFedAvg(
            record, n_sites, fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n_sites,
            min_available_clients=n_sites, initial_parameters=ndarrays_to_parameters(plan.initial),
            on_fit_config_fn=plan.fit_config, fit_metrics_aggregation_fn=lambda metrics: {})
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=plan.rounds), strategy=strategy)
        fit_workflow = None
        if secagg is not None:
            # Weights are n_i / max_weight with max_weight the federation's training rows: each site's weighted
            # weights stay within the clipping range if its weights do, and the weights sum to one.
            fit_workflow = SecAggPlusWorkflow(
                num_shares=secagg.num_shares, reconstruction_threshold=secagg.reconstruction_threshold,
                max_weight=float(plan.total_rows), clipping_range=secagg.clipping_range,
                quantization_range=secagg.quantization_range, modulus_range=secagg.modulus_range,
                timeout=plan.timeout)
        DefaultWorkflow(fit_workflow=fit_workflow)(InterceptingGrid(grid, record), legacy)
        record.finished = time.perf_counter()

    return app


def run(plan: FederationPlan, site_dirs: list[Path], secagg: SecAggSettings | None,
        engine: str = "direct") -> RunRecord:
    """Return the record of `plan.rounds` FedAvg rounds over the sites, with SecAgg+ unless `secagg` is None."""
    if not 2 <= len(site_dirs) == len(plan.site_rows):
        raise FederationError(f"secure aggregation needs at least two sites, one folder each; got {len(site_dirs)} "
                              f"folders for sites {sorted(plan.site_rows)}")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    record = RunRecord(secure=secagg is not None)
    server, client = server_app(plan, record, secagg), client_app(secagg is not None, site_dirs)
    if engine == "direct":
        use_server_identity()
        grid = DirectGrid(direct_contexts(site_dirs), client_app=client, serialise=True)
        server(grid, Context(run_id=1, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(), run_config={}))
    elif engine == "ray":
        run_simulation(server_app=server, client_app=client, num_supernodes=len(site_dirs),
                       backend_config=RAY_BACKEND_CONFIG)
    else:
        raise ValueError(f"unknown engine {engine!r}; choose direct or ray")
    missing = [r for r in range(1, plan.rounds + 1) if r not in record.aggregates]
    if missing:
        detail = "; ".join(record.errors) or "no reply recorded"
        raise FederationError(f"{'SecAgg+' if record.secure else 'plain'} FedAvg: rounds {missing} were not "
                              f"aggregated ({detail})")
    return record
