"""Run the pilot's ServerApp and ClientApps on one machine.

Two engines run the very same `server_app.app` and `client_app.app`:

- `direct` (default): a `DirectGrid` delivers each message to the site's
  ClientApp in this process and hands the reply back, as Flower's
  simulation runtime does but without its polling loops and actor pool;
- `ray`: Flower's own simulation engine (`flwr.simulation.run_simulation`,
  Ray backend).

Flower 1.42's Ray simulation costs seconds to start and tenths of a second
per round on 2 cores, far above the plain loop for a model this small; the
benchmark (`make bench`, build/bench/flower.json) measures both engines
against the plain loop and is the reason `direct` is the default. The
deployment engine (SuperLink and SuperNodes) runs the same apps across
machines.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from compendium.params import Profile
from fl.flower import server_app
from fl.flower.client_app import app as default_client_app

SERVER_NODE_ID = 1
#: Flower's error code for an exception raised inside a ClientApp.
CLIENT_APP_RAISED_EXCEPTION = 1


class DirectGrid(Grid):
    """A Grid whose nodes are ClientApp contexts in this process; replies come back synchronously.

    `client_app` is the pilot's ClientApp unless another is given (the
    secure-aggregation run brings its own). With `serialise`, every message
    crosses as protobuf bytes and is rebuilt on the other side, as in
    Flower's engines: needed where a sender shares one content object among
    several messages and the receiver edits what it gets (Flower's SecAgg+
    workflow and `secaggplus_mod` do both).
    """

    def __init__(self, contexts: dict[int, Context], run_id: int = 1, client_app=None, serialise: bool = False):
        self.contexts = contexts
        self.run_id = run_id
        self.client_app = client_app if client_app is not None else default_client_app
        self.serialise = serialise
        self._replies: dict[str, Message] = {}
        self._lock = threading.Lock()

    def set_run(self, run) -> None:  # the run is fixed at construction
        pass

    @property
    def run(self) -> Run:
        return Run.create_empty(self.run_id)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self):
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            message.metadata.__dict__["_src_node_id"] = SERVER_NODE_ID
            message.metadata.__dict__["_run_id"] = self.run_id
            context = self.contexts[message.metadata.dst_node_id]
            if self.serialise:
                message = message_from_proto(message_to_proto(message))
            try:
                reply = self.client_app(message, context)
            except Exception as error:  # a site's failure becomes an error reply, as in Flower
                reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(error).__name__}: {error}"),
                                reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
            if self.serialise:
                reply = message_from_proto(message_to_proto(reply))
            with self._lock:
                self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._lock:
            return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def _run_config(profile_path: Path, strategy: str, output_dir: Path, site_dirs: list[Path]) -> dict:
    return {"params-path": str(profile_path), "strategy": strategy, "output-dir": str(output_dir),
            "site-dirs": ",".join(str(d) for d in site_dirs),
            "site-outputs": ",".join(str(site_output_dir(output_dir, d)) for d in site_dirs)}


def site_output_dir(output_dir: Path, site_dir: Path) -> Path:
    """Return where a simulated site keeps what never leaves it (personalised models): its own folder
    beside the run's output, named after the site's data folder."""
    return Path(output_dir).parent / "sites" / Path(site_dir).name


def direct_contexts(site_dirs: list[Path], output_dir: Path | None = None) -> dict[int, Context]:
    """Return one ClientApp context per site; each names only its own site folder (and output folder)."""
    def node_config(site_dir: Path) -> dict:
        config = {"site-dir": str(site_dir)}
        if output_dir is not None:
            config["site-output"] = str(site_output_dir(output_dir, site_dir))
        return config

    return {
        100 + index: Context(run_id=1, node_id=100 + index, node_config=node_config(site_dir),
                             state=RecordDict(), run_config={})
        for index, site_dir in enumerate(site_dirs)
    }


def use_server_identity() -> None:
    """Make messages created in this process come from the server of run 1, as in Flower's engines."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SERVER_NODE_ID


def run_direct(profile: Profile, strategy: str, site_dirs: list[Path], output_dir: Path,
               resume: bool = False, grid: Grid | None = None,
               client_dp: server_app.ClientLevelDP | None = None, patient_dp=None,
               validation_fraction: float = 0.0,
               personalisation: server_app.Personalisation | None = None,
               preprocessing=None) -> server_app.FederationResult:
    """Run the Flower apps in this process (optionally on a given grid, e.g. one that fails on purpose).

    Each site keeps its personalised models in `site_output_dir(output_dir, site folder)`.
    `preprocessing`: a fixed spec (DP runs' public scaling) that replaces the federated statistics round.
    """
    use_server_identity()
    grid = grid or DirectGrid(direct_contexts(site_dirs, output_dir))
    return server_app.run_federation(grid, profile, strategy, output_dir, resume=resume, client_dp=client_dp,
                                     patient_dp=patient_dp, validation_fraction=validation_fraction,
                                     personalisation=personalisation, preprocessing=preprocessing)


#: Flower's Ray engine: one CPU per site, quiet, and no Ray dashboard (fewer processes to start, so a
#: loaded 2-core machine stays inside Ray's fixed 30 s wait for its node to come up).
RAY_BACKEND_CONFIG = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                      "init_args": {"logging_level": "error", "log_to_driver": False, "include_dashboard": False}}


class _WithoutRunSimulationDeprecation(logging.Filter):
    """Drops Flower's "`run_simulation` is deprecated" banner, printed at every call.

    The compendium calls `run_simulation` on purpose: it is Flower's in-process entry to its
    Ray engine, which tests and benchmarks compare with the direct engine and `flwr run`
    (the recommended path) on the deployment engine. Every other Flower warning passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def _start_ray(init_args: dict) -> None:
    """Start Ray as Flower's Ray backend would, retrying once if the node misses Ray's start-up wait.

    Ray waits a fixed 30 s for its node to register; on a loaded 2-core machine that wait can
    expire before any work starts (seen twice in clean-clone test runs). Flower's backend uses a
    Ray that is already running and shuts it down when the simulation ends.
    """
    import os
    import sys

    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)  # as Flower's backend: Ray's workers need the driver's path
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    for attempt in (1, 2):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
            return
        except Exception as error:  # Ray raises a bare Exception for this
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(error):
                raise


def run_simulation(**arguments) -> None:
    """Call Flower's `run_simulation` (its Ray engine) with Flower's logs at WARNING and no deprecation banner."""
    from flwr.simulation import run_simulation as flower_run_simulation

    flower_logger = logging.getLogger("flwr")
    flower_logger.setLevel(logging.WARNING)
    quiet = _WithoutRunSimulationDeprecation()
    flower_logger.addFilter(quiet)
    if "backend_config" in arguments:  # Flower adds keys to the dict it is given: never to RAY_BACKEND_CONFIG
        arguments["backend_config"] = copy.deepcopy(arguments["backend_config"])
    _start_ray(arguments.get("backend_config", {}).get("init_args", {}))
    try:
        flower_run_simulation(**arguments)
    finally:
        flower_logger.removeFilter(quiet)


def run_ray(profile_path: Path, strategy: str, site_dirs: list[Path], output_dir: Path,
            personalisation: server_app.Personalisation | None = None, profile: Profile | None = None) -> None:
    """Run the Flower apps in Flower's Ray simulation engine (one CPU per site)."""
    from flwr.app import Context as FlowerContext
    from flwr.serverapp import ServerApp

    from compendium.params import load_params

    profile = profile or load_params(profile_path)
    config = _run_config(profile_path, strategy, output_dir, site_dirs)

    # run_simulation passes no run config to the apps: hand it over through the apps' contexts.
    wrapped_server = ServerApp()

    @wrapped_server.main()
    def _main(grid: Grid, context: FlowerContext) -> None:
        server_app.run_federation(grid, profile, strategy, output_dir, personalisation=personalisation)

    from flwr.clientapp import ClientApp

    wrapped_client = ClientApp()
    for kind in ("train", "evaluate"):
        getattr(wrapped_client, kind)()(_with_run_config(default_client_app, config))
    for query in ("statistics", "personalise"):
        wrapped_client.query(query)(_with_run_config(default_client_app, config))
    run_simulation(server_app=wrapped_server, client_app=wrapped_client, num_supernodes=len(site_dirs),
                   backend_config=RAY_BACKEND_CONFIG)


def _with_run_config(app, config: dict):
    """Return a handler that calls `app` with `config` added to the (read-only) run config."""
    def handler(message: Message, context: Context) -> Message:
        merged = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                         state=context.state, run_config={**context.run_config, **config})
        return app(message, merged)
    return handler


def timed(function, *args, **kwargs):
    """Return (result, seconds) of a call."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started
