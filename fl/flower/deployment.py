"""Run the pilot's Flower app on the deployment engine: one SuperLink, one SuperNode per hospital.

`python -m fl.flower.deployment --profile smoke` (or `make federation`)
starts, as separate processes on 127.0.0.1,

- a SuperLink (the aggregation service) with TLS, SuperNode authentication
  and its state in a database file;
- one SuperNode per site, holding only its own site's folder (node config
  `site-dir`, `site`, `confine`) and the site's private key; its public key
  is registered with the SuperLink before it starts, and an unregistered
  node is refused;

then submits the run with `flwr run` (the very ServerApp and ClientApp of
stage 3), waits for it while watching every process, collects the result
into `build/<profile>/03_federated_training/deployment/` and stops every
process it started, by PID, also when the run fails. Flower's per-user
configuration home (`FLWR_HOME`) is a folder per process inside
`build/<profile>/federation/`, so the user's own Flower settings are never
read or changed and two profiles can run side by side.

By default each hospital is hardened (`Hardening`): its SuperNode runs in
Flower's process isolation mode and the hospital's own runner
(`fl.flower.runner`) starts its ClientApp processes, refusing any app
package whose hash is not on the hospital's allow-list (the compendium's own
package, hashed at start); the node configuration carries the hospital's
privacy floors (`fl.flower.policy`), a site-local log for error details and
the runner's own record of every message; and the ServerApp is given the
registered node map, so no other node may take part. `--plain` runs today's
Flower defaults instead (for the malicious-server comparison).

If a SuperNode or the SuperLink dies during the run, the run stops with a
message naming the process and the last checkpointed round; `--resume`
starts the federation again and continues from that checkpoint to the same
final model as an uninterrupted run. The ServerApp stops the same way when
a site does not answer within `federated.round_timeout_s` (it never
aggregates a partial round).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compendium.artifacts import package_versions, relative, replace_folder, write_json
from compendium.params import REPO_ROOT, ParamsError, build_name, load_params, profile_path
from fl.data import site_dir
from fl.federated import weights_difference
from fl.flower.credentials import Credentials, make_credentials, secrets_in
from fl.flower.integrity import format_node_map
from fl.flower.policy import SitePolicy
from fl.flower.runner import app_hash
from fl.flower.server_app import (CHECKPOINTS, FINAL_MODEL_FILE, HISTORY_FILE, LEDGER_FILE, latest_checkpoint,
                                  saved_weights)

#: Every process a federation starts carries this variable (inherited by Flower's own
#: child processes, even detached ones), so `stop` finds and ends all of them.
MARKER = "FEDHF_FEDERATION"
CONNECTION = "compendium"
DEPLOYMENT = Path("03_federated_training") / "deployment"
STATE = "federation"
SERVER_OUTPUT = "server"
SITE_LEDGERS = "site_ledgers"
#: role -> PID of every process started, for operators (and tests) who need to find one.
PIDS_FILE = "pids.json"
#: SuperExec asks its node for work this often (Flower's default is 1 s).
TASK_POLL_SECONDS = "0.2"
#: Exit code of a SuperNode whose key the SuperLink does not know (flwr.supercore.exit).
UNREGISTERED_NODE_EXIT = 305
SITE_LOGS = "site_logs"
SITE_RECORDS = "site_records"
#: The floors `make federation` gives each hospital: the pilot's own runs fit them (full-batch
#: training, a handful of epochs); a hospital sets its own in its node configuration.
DEFAULT_POLICY = SitePolicy(min_batch_size=32, max_local_epochs=20, allowed_models=("logistic", "mlp"))


@dataclass(frozen=True)
class Hardening:
    """What a hospital that need not trust the server runs (None / empty: Flower's defaults, as before)."""

    #: SHA-256 of each reviewed app package; the hospital's runner refuses every other package.
    pinned_fabs: tuple[str, ...] = ()
    policy: SitePolicy = DEFAULT_POLICY
    #: Give the ServerApp the registered node map (exactly these nodes may take part).
    node_map: bool = True

    def node_config(self) -> dict:
        return {**self.policy.as_node_config(), **({"pinned-fabs": ",".join(self.pinned_fabs)} if self.pinned_fabs
                                                   else {})}


def node_config_text(entries: dict) -> str:
    """Return a `--node-config` string (strings quoted, booleans lower-case, numbers bare)."""
    def value(v):
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, (int, float)):
            return repr(v)
        return '"' + str(v).replace('"', '') + '"'

    return " ".join(f"{key}={value(v)}" for key, v in entries.items())


class DeploymentError(RuntimeError):
    """The deployment could not start, or its run did not complete."""


@dataclass
class Service:
    """One process the federation started."""

    role: str
    process: subprocess.Popen
    log: Path
    started: float
    ready_seconds: float | None = None
    #: Where this process's output starts in its log (a resumed run appends to the same logs).
    log_offset: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_code(self) -> int | None:
        return self.process.poll()

    def output(self) -> str:
        """Return what this process has written to its log so far."""
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as handle:
            handle.seek(self.log_offset)
            return handle.read().decode(errors="replace")

    def log_tail(self, lines: int = 6) -> str:
        return "\n".join(f"    {line}" for line in self.output().splitlines()[-lines:])


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _bin(name: str) -> str:
    """Return the path of a Flower command installed next to this Python."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise DeploymentError(f"{name} not found next to {sys.executable}; run `make venv` to install Flower")
    return str(path)


@dataclass
class LocalFederation:
    """A SuperLink and SuperNodes on this machine, each process with its own Flower home and log.

    Use as a context manager: leaving it stops every process it started.
    """

    state_dir: Path
    sites: dict[str, Path]
    #: Under a launcher that itself carries the marker (the tests), the token is nested under it.
    token: str = field(default_factory=lambda: os.environ.get(MARKER, "") + uuid.uuid4().hex)
    services: dict[str, Service] = field(default_factory=dict)

    def __post_init__(self):
        self.state_dir = Path(self.state_dir).resolve()
        self.logs = self.state_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.credentials: Credentials = make_credentials(self.state_dir / "credentials", list(self.sites))
        self.port = free_port()
        self.node_ids: dict[str, int] = {}

    # --- processes ------------------------------------------------------
    def home(self, role: str) -> Path:
        folder = self.state_dir / "flwr_home" / role
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def environment(self, role: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("FLWR_", "RAY_"))}
        env.update({
            "FLWR_HOME": str(self.home(role)), MARKER: self.token,
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": TASK_POLL_SECONDS,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONHASHSEED": "0", "PYTHONUNBUFFERED": "1",
        })
        return env

    def start(self, role: str, argv: list[str], home: str | None = None) -> Service:
        """Start one process in its own session (Flower home `home`, default: its role), output to logs/<role>.log."""
        log = self.logs / f"{role}.log"
        offset = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as handle:
            process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=self.environment(home or role), cwd=self.state_dir,
                                       start_new_session=True)
        service = Service(role, process, log, time.perf_counter(), log_offset=offset)
        self.services[role] = service
        write_json(self.state_dir / PIDS_FILE, {r: s.pid for r, s in self.services.items()})
        return service

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a `flwr` CLI command against this federation's SuperLink."""
        return subprocess.run([_bin("flwr"), *args], capture_output=True, text=True, timeout=timeout,
                              env=self.environment("cli"), cwd=self.state_dir)

    # --- the aggregation service --------------------------------------
    def start_superlink(self, timeout: float = 60) -> Service:
        """Start the SuperLink (TLS, node authentication, state on disk) and wait until it listens."""
        credentials = self.credentials
        # Fresh state every time (keys are registered again): a node killed without signing off stays
        # "online" in the old state until its heartbeats expire, and is refused re-activation until
        # then. What a resumed run needs is the ServerApp's checkpoints, not the SuperLink's state.
        for database in self.state_dir.glob("superlink.db*"):
            database.unlink()
        service = self.start("superlink", [
            _bin("flower-superlink"), "--ssl-ca-certfile", str(credentials.ca_certificate),
            "--ssl-certfile", str(credentials.server_certificate), "--ssl-keyfile", str(credentials.server_key),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--database", str(self.state_dir / "superlink.db"), "--host", "127.0.0.1", "--port", str(self.port)])
        self._wait(service, lambda: _listening(self.port), timeout, "listen on its port")
        (self.home("cli") / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{credentials.ca_certificate}"\n')
        return service

    def register(self, site: str) -> int:
        """Register a site's public key with the SuperLink; return its node id."""
        result = self.flwr("supernode", "register", str(self.credentials.node_public_key(site)), CONNECTION,
                           "--name", site, "--format", "json")
        answer = _json_of(result.stdout)
        if answer.get("success"):
            self.node_ids[site] = int(answer["node-id"])
            return self.node_ids[site]
        raise DeploymentError(f"could not register site {site!r}'s key with the SuperLink: "
                              f"{answer.get('error-message', result.stdout + result.stderr).strip()}")

    # --- the hospitals --------------------------------------------------
    def start_supernode(self, site: str, folder: Path, role: str | None = None, private_key: Path | None = None,
                        max_retries: int | None = None, ledger: Path | None = None,
                        hardening: Hardening | None = None) -> Service:
        """Start a SuperNode for `site` that holds only `folder` (and, by default, the site's own key).

        With `hardening`, the node runs in process isolation and the hospital's runner
        (`fl.flower.runner`, role `runner-<site>`) is started beside it: it alone may take the
        node's tasks (a shared secret), and it runs only pinned packages.
        """
        role = role or f"supernode-{site}"
        entries = {"site": site, "site-dir": str(Path(folder).resolve()), "confine": True}
        if ledger is not None:
            entries["site-ledger"] = str(ledger)
        runtime_port = free_port()
        argv = [_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", str(self.credentials.ca_certificate),
                "--auth-supernode-private-key", str(private_key or self.credentials.node_private_key(site)),
                "--port", str(runtime_port)]
        secret = None
        if hardening is not None:
            own = role.removeprefix("supernode-")
            entries.update({"site-log": str(self.state_dir / SITE_LOGS / f"{own}.jsonl"),
                            "site-record": str(self.state_dir / SITE_RECORDS / f"{own}.jsonl"),
                            **hardening.node_config()})
            for folder_name in (SITE_LOGS, SITE_RECORDS):
                (self.state_dir / folder_name).mkdir(parents=True, exist_ok=True)
            secret = self.credentials.folder / f"{own}.runner-secret"
            if not secret.exists():
                _write_secret(secret)
            argv += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
        argv += ["--node-config", node_config_text(entries)]
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries)]
        service = self.start(role, argv)
        if secret is not None:
            self.start(role.replace("supernode-", "runner-", 1), [
                sys.executable, "-m", "fl.flower.runner", "superexec", "--insecure",
                "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--superexec-auth-secret-file", str(secret)])
        return service

    def wait_connected(self, roles: list[str], timeout: float = 60) -> None:
        """Wait until each SuperNode has joined (its log shows its node id)."""
        for role in roles:
            service = self.services[role]
            self._wait(service, lambda s=service: "SuperNode ID" in s.output(), timeout,
                       "join the SuperLink")

    def _wait(self, service: Service, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if service.exit_code() is not None:
                raise DeploymentError(f"{service.role} exited with code {service.exit_code()} before it could "
                                      f"{what}; its log ({relative(service.log)}) ends:\n{service.log_tail()}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"{service.role} did not {what} within {timeout:.0f} s; "
                                      f"see {relative(service.log)}")
            time.sleep(0.1)
        service.ready_seconds = time.perf_counter() - service.started

    # --- the run --------------------------------------------------------
    def submit(self, run_config: dict[str, str | bool]) -> tuple[int, Service]:
        """Submit the app with `flwr run` (streaming the run's log); return the run id and the streaming process."""
        pairs = " ".join(f"{k}={str(v).lower()}" if isinstance(v, bool) else f'{k}="{v}"'
                         for k, v in run_config.items())
        service = self.start("run", [_bin("flwr"), "run", str(REPO_ROOT), CONNECTION, "--run-config", pairs,
                                     "--stream"], home="cli")
        deadline = time.monotonic() + 120
        while not (match := re.search(r"Successfully started run (\d+)", service.output())):
            if service.exit_code() is not None or time.monotonic() > deadline:
                raise DeploymentError(f"`flwr run` could not start the run; its output ends:\n{service.log_tail()}")
            time.sleep(0.2)
        return int(match.group(1)), service

    def status(self, run_id: int) -> tuple[str, str]:
        """Return the run's status ("finished:completed", ...) and details, as the SuperLink reports them."""
        result = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=60)
        runs = _json_of(result.stdout).get("runs", [])
        if not runs:
            return "unknown", (result.stdout + result.stderr).strip()[-500:]
        return str(runs[0].get("status")), str(runs[0].get("status-details", ""))

    def wait(self, run_id: int, stream: Service, timeout: float, watched: list[str]) -> tuple[str, str]:
        """Wait for the run to end while watching `watched` processes; return (status, details).

        A watched process that exits ends the wait at once with status
        "fault" and a message naming it (the run is stopped if the SuperLink
        still answers).
        """
        deadline = time.monotonic() + timeout
        while stream.exit_code() is None:
            if fault := self._fault(run_id, watched):
                return fault
            if time.monotonic() > deadline:
                self.flwr("stop", str(run_id), CONNECTION, timeout=60)
                return "timeout", f"the run did not finish within {timeout:.0f} s"
            time.sleep(0.5)
        # The stream also ends when the SuperLink dies, possibly between two
        # looks above: a dead watched process is the cause, not the run.
        time.sleep(1)
        return self._fault(run_id, watched) or self.status(run_id)

    def _fault(self, run_id: int, watched: list[str]) -> tuple[str, str] | None:
        """Return ("fault", message) for the first watched process that has exited, else None."""
        for role in watched:
            code = self.services[role].exit_code()
            if code is not None:
                if self.services["superlink"].exit_code() is None:
                    self.flwr("stop", str(run_id), CONNECTION, timeout=60)
                return "fault", f"{role} (pid {self.services[role].pid}) exited with code {code} during the run"
        return None

    # --- cleaning up ----------------------------------------------------
    def stop(self, grace: float = 10) -> list[int]:
        """Stop every process this federation started, and their children; return the PIDs ended."""
        pids = {s.pid for s in self.services.values() if s.exit_code() is None} | set(self.marked_processes())
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids | set(self.marked_processes())):
            for service in self.services.values():
                service.process.poll()  # reap our own children
            time.sleep(0.1)
        for pid in pids | set(self.marked_processes()):
            _signal(pid, signal.SIGKILL)
        for service in self.services.values():
            try:
                service.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        return sorted(pids)

    def marked_processes(self) -> list[int]:
        """Return the PIDs of live processes carrying this federation's marker (Flower's children included)."""
        return processes_with_marker(self.token)

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _write_secret(path: Path) -> None:
    """Write 32 random bytes readable by their owner only (the SuperNode-runner shared secret)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(os.urandom(32))


def processes_with_marker(prefix: str) -> list[int]:
    """Return live PIDs whose environment carries MARKER=<a token starting with `prefix`>."""
    needle = f"{MARKER}={prefix}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if any(v.startswith(needle) for v in environ.split(b"\0")) and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _json_of(text: str) -> dict:
    """Return the JSON object a `flwr ... --format json` command printed (empty if none)."""
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


# --- the pilot's deployment run ------------------------------------------
@dataclass
class DeploymentResult:
    """What one deployment run produced, as recorded in deployment.json."""

    folder: Path
    summary: dict


def run_deployment(params_file: Path, build_dir: Path, strategy: str = "fedavg", resume: bool = False,
                   timeout: float | None = None, progress: bool = True,
                   data: Path | None = None, plain: bool = False) -> DeploymentResult:
    """Run the profile's federation (on provided `data` if given) on the deployment engine.

    Hardened unless `plain`: each hospital pins this repository's app package and applies
    `DEFAULT_POLICY`; the ServerApp gets the registered node map. The result is collected
    into <build>/03_federated_training/deployment/.
    """
    params_file, build_dir = Path(params_file).resolve(), Path(build_dir).resolve()
    data = Path(data).resolve() if data else None
    profile = load_params(params_file, data)
    sites = {site: site_dir(build_dir, site) for site in profile.sites}
    missing = [f"{site} ({folder})" for site, folder in sites.items() if not folder.is_dir()]
    if missing:
        raise DeploymentError(f"site folder(s) missing: {', '.join(missing)}; run stage 1 first "
                              f"(make stage1 PROFILE={profile.profile})")
    state = build_dir / STATE
    server, ledgers = state / SERVER_OUTPUT, state / SITE_LEDGERS
    done = latest_checkpoint(server) if resume else 0
    if not resume:  # a fresh run: no checkpoints, no ledgers, no logs
        for folder in (server, ledgers, state / "logs", state / SITE_LOGS, state / SITE_RECORDS):
            shutil.rmtree(folder, ignore_errors=True)
    ledgers.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)
    timeout = timeout or profile.federated.round_timeout_s * (profile.federated.rounds + 1)

    started = time.perf_counter()
    hardening = None if plain else Hardening(pinned_fabs=(app_hash(REPO_ROOT),))
    with LocalFederation(state, sites) as federation:
        say(f"federation: SuperLink with TLS and node authentication on 127.0.0.1:{federation.port}"
            + ("" if plain else f"; hospitals pin app package {hardening.pinned_fabs[0][:16]}... and apply "
                                f"their floors ({node_config_text(hardening.policy.as_node_config())})"))
        federation.start_superlink()
        for site in sites:
            federation.register(site)
        nodes = [federation.start_supernode(site, folder, ledger=ledgers / f"{site}.jsonl", hardening=hardening).role
                 for site, folder in sites.items()]
        federation.wait_connected(nodes)
        # The hospitals' runners have no readiness signal of their own (their SuperNode's join covers them).
        startup = {role: round(s.ready_seconds, 2) for role, s in federation.services.items()
                   if s.ready_seconds is not None}
        say(f"federation: {len(nodes)} SuperNodes joined ({', '.join(sites)}); "
            f"{'resuming after round ' + str(done) if done else 'starting'} {strategy}, "
            f"{profile.federated.rounds} rounds")
        run_config = {"params-path": str(params_file), "data": str(data or ""), "strategy": strategy,
                      "output-dir": str(server), "resume": resume}
        if hardening is not None and hardening.node_map:
            run_config["site-nodes"] = format_node_map(federation.node_ids)
        run_id, stream = federation.submit(run_config)
        watched = ["superlink", *nodes, *(r for r in federation.services if r.startswith("runner-"))]
        status, details = federation.wait(run_id, stream, timeout, watched)
        seconds = time.perf_counter() - started
        pids = sorted(s.pid for s in federation.services.values())
    if status != "finished:completed":
        completed = latest_checkpoint(server)
        raise DeploymentError(
            f"deployment run {run_id} ended as {status}: {details.strip() or 'no details'}. "
            f"{completed} of {profile.federated.rounds} rounds are checkpointed in {relative(server)}; "
            f"logs in {relative(state / 'logs')}. Fix the cause, then run again with --resume "
            f"(make federation RESUME=1) to continue from round {completed}.")
    summary = {
        "profile": profile.profile, "strategy": strategy, "run_id": run_id, "status": status,
        "engine": "Flower deployment engine (SuperLink + SuperNodes, processes on 127.0.0.1)",
        "flwr": package_versions(("flwr",))["flwr"], "tls": True, "node_authentication": True,
        "hardened": hardening is not None,
        "pinned_app_packages": list(hardening.pinned_fabs) if hardening else [],
        "site_policy": hardening.policy.as_node_config() if hardening else {},
        "sites": {site: {"node_id": federation.node_ids.get(site), "site_dir": relative(folder)}
                  for site, folder in sites.items()},
        "resumed_after_round": done, "rounds": profile.federated.rounds,
        "startup_seconds": startup, "run_seconds": round(seconds, 2),
        "round_seconds": round_seconds(server),
        "processes_started": len(pids),
        "bytes": ledger_bytes_check(server / LEDGER_FILE, ledgers),
    }
    simulated = build_dir / DEPLOYMENT.parent / strategy
    if (simulated / FINAL_MODEL_FILE).exists():  # stage 3's in-process run of the same strategy
        difference = weights_difference(final_weights(server), final_weights(simulated))
        summary["stage3_simulation"] = {"final_weights_max_abs_difference": difference,
                                        "same_model_within_1e-6": difference <= 1e-6}
    folder = collect(build_dir, state, summary)
    say(f"federation: run {run_id} completed in {seconds:.0f} s; results in {relative(folder)}")
    return DeploymentResult(folder, summary)


def round_seconds(server: Path) -> list[float]:
    """Return the wall time of each round, from the times its checkpoints were written."""
    stamps = sorted((int(path.stem.split("_")[1]), path.stat().st_mtime)
                    for path in (server / CHECKPOINTS).glob("round_*.npz"))
    return [round(b[1] - a[1], 3) for a, b in zip(stamps, stamps[1:]) if b[0] == a[0] + 1]


def ledger_bytes_check(server_ledger: Path, site_ledgers: Path) -> dict:
    """Return, per site and direction, the bytes the server's ledger recorded and the bytes the site's process sent."""
    server = [json.loads(line) for line in server_ledger.read_text().splitlines()]
    out = {}
    for path in sorted(site_ledgers.glob("*.jsonl")):
        site = path.stem
        own = [json.loads(line) for line in path.read_text().splitlines()]
        for direction in ("server->site", "site->server"):
            recorded = sum(line["bytes"] for line in server if line["site"] == site and line["direction"] == direction)
            measured = sum(line["bytes"] for line in own if line["direction"] == direction)
            messages = sum(1 for line in own if line["direction"] == direction)
            out.setdefault(site, {})[direction] = {
                "ledger_bytes": recorded, "site_process_bytes": measured, "messages": messages,
                "difference_bytes": recorded - measured,
                "relative_difference": round(abs(recorded - measured) / max(measured, 1), 4)}
    return out


def collect(build_dir: Path, state: Path, summary: dict) -> Path:
    """Copy the run's artifacts (no keys) into <build>/03_federated_training/deployment/, atomically."""
    target = build_dir / DEPLOYMENT
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    server = state / SERVER_OUTPUT
    staging.mkdir(parents=True)
    for name in (FINAL_MODEL_FILE, HISTORY_FILE, LEDGER_FILE):
        shutil.copy2(server / name, staging / name)
    shutil.copytree(server / CHECKPOINTS, staging / CHECKPOINTS)
    shutil.copytree(state / SITE_LEDGERS, staging / SITE_LEDGERS)
    for folder in (SITE_RECORDS,):  # the runners' own records (site_logs stay at the hospitals)
        if (state / folder).is_dir():
            shutil.copytree(state / folder, staging / folder)
    shutil.copytree(state / "logs", staging / "logs")
    shutil.copy2(state / "credentials" / "ca.crt", staging / "ca.crt")
    write_json(staging / "deployment.json", summary)
    leaked = secrets_in(staging)
    if leaked:  # never publish a key or the SuperLink's database, whatever was copied above
        shutil.rmtree(staging, ignore_errors=True)
        raise DeploymentError(f"refusing to publish {len(leaked)} file(s) holding a private key or a database: "
                              f"{', '.join(p.name for p in leaked)}")
    return replace_folder(staging, target)


def final_weights(folder: Path) -> list[np.ndarray]:
    """Return the final model's weight arrays saved in a run folder."""
    return saved_weights(np.load(Path(folder) / FINAL_MODEL_FILE))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fl.flower.deployment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default", help="params/<profile>.yaml (default: default)")
    parser.add_argument("--params", type=Path, help="a profile file elsewhere (overrides --profile)")
    parser.add_argument("--build-root", type=Path, default=REPO_ROOT / "build")
    parser.add_argument("--data", type=Path, help="a dataset YAML: run on provided data (docs/bring_your_own_data.md)")
    parser.add_argument("--build-dir", type=Path, help="the profile's build folder (default: BUILD_ROOT/PROFILE, "
                                                       "or BUILD_ROOT/PROFILE-DATASET with --data)")
    parser.add_argument("--strategy", default="fedavg", choices=["fedavg", "fedprox", "fedadam"])
    parser.add_argument("--resume", action="store_true", help="continue from the last round checkpoint")
    parser.add_argument("--timeout", type=float, help="give up after this many seconds")
    parser.add_argument("--plain", action="store_true", help="Flower's defaults: no pinned package, no hospital "
                                                             "floors, no node map (for comparison)")
    args = parser.parse_args(argv)
    try:
        params_file = args.params or profile_path(args.profile)
        build_dir = args.build_dir or args.build_root / build_name(load_params(params_file).profile, args.data)
        run_deployment(params_file, build_dir, args.strategy, args.resume, args.timeout, data=args.data,
                       plain=args.plain)
        return 0
    except (ParamsError, DeploymentError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up on `kill` too
    sys.exit(main())
