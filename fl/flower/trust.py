"""The malicious-server test: what an aggregator can make a hospital do, with Flower's defaults and hardened.

`python -m fl.flower.trust --profile smoke` (or `make trust`) starts two
federations on the deployment engine, one as `make federation` ran before
this hardening (plain: Flower's defaults, TLS and node authentication) and
one hardened (`fl.flower.deployment.Hardening`: each hospital pins the
reviewed package, sets its floors, the ServerApp gets the node map), and
makes the same attempts against both:

- control: the reviewed package, settings within the hospitals' floors;
- (a) batch size 1, asked by a modified ServerApp (`examples/malicious_server`);
- (a) a DP-SGD lot of two records, asked through the reviewed package's settings;
- (b) DP-SGD turned off, through the reviewed package's settings;
- (c) a modified ClientApp that reads the other site's cohort and reports it over a socket;
- (e) a third node with a registered key joins the federation.

(d), submitting a run from a hospital's host through the control plane, is
not tested: the closed control plane is not built (docs/deployment.md).

Each attempt's outcome (completed, or the refusal code and reason the server
saw) and its evidence (what the ledger shows was sent and returned, what the
listener received) are written to
`build/<profile>/03_federated_training/trust/malicious_server.json` and a
Markdown table beside it.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from compendium.artifacts import write_json
from compendium.params import REPO_ROOT, build_name, load_params, profile_path
from fl.data import load_site, site_dir
from fl.flower import deployment as dep
from fl.flower.credentials import make_node_key
from fl.flower.integrity import format_node_map
from fl.flower.policy import CODES, SitePolicy
from fl.flower.runner import app_hash
from fl.flower.server_app import LEDGER_FILE

TRUST = Path("03_federated_training") / "trust"
ADVERSARY = REPO_ROOT / "examples" / "malicious_server" / "adversary.py"
#: DP-SGD the hospitals accept in the hardened federation (control run): expected lot 20% of the rows.
DP_SETTINGS = {"dp-noise-multiplier": 1.0, "dp-max-grad-norm": 1.0, "dp-sample-rate": 0.2, "dp-delta": 1e-5,
               "dp-learning-rate": 0.5, "dp-local-epochs": 1}
#: The modified package makes both of its changes in one run: batch size 1 and the theft.
ADVERSARY_CONFIG = {"adversary-batch-size": 1, "adversary-steal": True}
HARDENED_POLICY = SitePolicy(min_batch_size=32, max_local_epochs=20, require_dp=True, max_epsilon=10.0,
                             allowed_models=("logistic", "mlp"))


@dataclass(frozen=True)
class Attempt:
    key: str
    label: str
    adversarial_package: bool
    run_config: dict
    #: What stops it in the hardened federation (a FEDHF code, or "node map").
    expected_refusal: str | None
    #: Attempts with the same run key are made in one run (one package, both changes on).
    run_key: str = ""
    #: Made against the hardened federation only (the control: Flower's defaults accept it, as
    #: test_the_deployment_run_equals_the_simulation shows).
    hardened_only: bool = False


def attempts(rows: int) -> list[Attempt]:
    """Return the attempts, in the order they are made (the third node last: it stays connected)."""
    tiny_lot = round(2 / rows, 6)  # two records per step
    return [
        Attempt("control", "reviewed package, DP-SGD within the floors", False, dict(DP_SETTINGS), None,
                hardened_only=True),
        Attempt("a_batch_1", "(a) batch size 1 by a modified ServerApp", True, ADVERSARY_CONFIG,
                "FEDHF-FAB-NOT-PINNED", run_key="adversarial_package"),
        Attempt("a_tiny_lot", "(a) DP-SGD lot of two records via the reviewed package", False,
                {**DP_SETTINGS, "dp-sample-rate": tiny_lot}, "FEDHF-POLICY-BATCH-SIZE"),
        Attempt("b_dp_off", "(b) DP-SGD turned off via the reviewed package", False, {}, "FEDHF-POLICY-DP-REQUIRED"),
        Attempt("c_steal", "(c) modified ClientApp reads the other site's cohort and opens a socket", True,
                ADVERSARY_CONFIG, "FEDHF-FAB-NOT-PINNED", run_key="adversarial_package"),
        Attempt("e_third_node", "(e) a third node with a registered key joins", False, dict(DP_SETTINGS),
                "node map"),
    ]


def adversarial_app(folder: Path) -> Path:
    """Write the malicious app package's folder: the pilot's code plus `adversary.py`, its own components."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    for package in ("fl", "data_synth", "compendium"):
        shutil.copytree(REPO_ROOT / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ADVERSARY, folder / "adversary.py")
    text = (REPO_ROOT / "pyproject.toml").read_text()
    text = text.replace('serverapp = "fl.flower.server_app:app"', 'serverapp = "adversary:server_app"')
    text = text.replace('clientapp = "fl.flower.client_app:app"', 'clientapp = "adversary:client_app"')
    text = text.replace('fab-include = [', 'fab-include = ["adversary.py", ')
    text = text.replace("[tool.flwr.app.config]\n", "[tool.flwr.app.config]\nadversary-batch-size = 0\n"
                                                      'adversary-steal = false\nadversary-socket = ""\n')
    (folder / "pyproject.toml").write_text(text)
    (folder / "README.md").write_text("Malicious app package for the compendium's malicious-server test.\n")
    return folder


class Listener:
    """A TCP listener on 127.0.0.1 that keeps what connecting ClientApps send (the attacker's collector)."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.server.settimeout(0.5)
        self.received: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.server.accept()
            except OSError:
                continue
            with connection:
                connection.settimeout(5)
                try:
                    self.received.append(connection.recv(4096).decode(errors="replace").strip())
                except OSError:
                    self.received.append("")

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.server.close()


def _submit(federation: dep.LocalFederation, app: Path, run_config: dict, role: str) -> tuple[int, dep.Service]:
    pairs = " ".join(f"{k}={str(v).lower()}" if isinstance(v, bool) else
                     (f"{k}={v}" if isinstance(v, (int, float)) else f'{k}="{v}"') for k, v in run_config.items())
    service = federation.start(role, [dep._bin("flwr"), "run", str(app), dep.CONNECTION, "--run-config", pairs,
                                      "--stream"], home="cli")
    deadline = time.monotonic() + 120
    while not (match := re.search(r"Successfully started run (\d+)", service.output())):
        if service.exit_code() is not None or time.monotonic() > deadline:
            raise dep.DeploymentError(f"`flwr run` could not start the run; its output ends:\n{service.log_tail()}")
        time.sleep(0.2)
    return int(match.group(1)), service


def _evidence(output: Path) -> dict:
    """Return what the ledger shows was asked and answered in round 1."""
    ledger = output / LEDGER_FILE
    lines = [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.exists() else []
    train_out = [line for line in lines if line["direction"] == "server->site" and line["message_type"] == "train"]
    train_back = [line for line in lines if line["direction"] == "site->server" and line["message_type"] == "train"]
    config = {entry["name"]: entry.get("value") for line in train_out[:1] for record in line["records"]
              if record["key"] == "config" for entry in record["entries"]}
    metric_names = sorted({entry["name"] for line in train_back for record in line["records"]
                           if record["key"] == "metrics" for entry in record["entries"]})
    return {"batch_size_asked": config.get("batch-size"), "dp_noise_asked": config.get("dp-noise-multiplier"),
            "dp_sample_rate_asked": config.get("dp-sample-rate"),
            "nodes_asked_to_train": len(train_out),
            "training_replies_with_weights": sum(1 for line in train_back if not line["error"]),
            "refusals_in_ledger": sorted({line["error"][:160] for line in lines if line.get("error")}),
            "reply_metrics": metric_names}


def _outcome(status: str, details: str, expected: str | None) -> dict:
    code = next((c for c in CODES if c in details), None)
    if code is None and "not in the registered node map" in details:
        code = "node map"
    return {"status": status, "completed": status == "finished:completed", "refused_by": code,
            "reason_seen_by_server": details.strip()[:400], "expected_refusal": expected}


def run_column(column: str, sites: dict[str, Path], state: Path, params: Path, rows: int,
               timeout: float = 600) -> dict:
    """Make every attempt against one federation (`column` "plain" or "hardened"); return key -> outcome."""
    hardened = column == "hardened"
    shutil.rmtree(state, ignore_errors=True)
    malicious = adversarial_app(state / "adversarial_app")
    hardening = dep.Hardening(pinned_fabs=(app_hash(REPO_ROOT),), policy=HARDENED_POLICY) if hardened else None
    listener = Listener()
    results, made = {}, {}
    try:
        with dep.LocalFederation(state, sites) as federation:
            federation.start_superlink()
            for site in sites:
                federation.register(site)
            nodes = [federation.start_supernode(site, folder, hardening=hardening).role
                     for site, folder in sites.items()]
            federation.wait_connected(nodes)
            watched = ["superlink", *nodes, *(r for r in federation.services if r.startswith("runner-"))]
            node_map = format_node_map(dict(federation.node_ids))
            # Every attempt but the third node's is submitted at once: Flower runs them side by side,
            # which cuts the wall time on a small machine (each run mostly waits on Flower's polling).
            pending = []
            for attempt in attempts(rows):
                if attempt.hardened_only and not hardened:
                    continue
                if attempt.run_key and any(a.run_key == attempt.run_key for a, _ in pending):
                    continue
                if attempt.key == "e_third_node":
                    continue
                pending.append((attempt, _start(federation, attempt, state, params, malicious, listener,
                                                node_map if hardened else None)))
            for attempt, run in pending:
                made[attempt.run_key or attempt.key] = _finish(federation, attempt, run, watched, timeout)
            evidence_socket = list(listener.received)
            third = next(a for a in attempts(rows) if a.key == "e_third_node")
            _add_third_node(federation, sites, state)
            made[third.key] = _finish(federation, third, _start(federation, third, state, params, malicious,
                                                                 listener, node_map if hardened else None),
                                      watched, timeout)
            for attempt in attempts(rows):
                if attempt.hardened_only and not hardened:
                    continue
                result = made[attempt.run_key or attempt.key]
                sockets = evidence_socket if attempt.adversarial_package else []
                results[attempt.key] = {**result, "attempt": attempt.label, "expected_refusal": attempt.expected_refusal,
                                        "evidence": {**result["evidence"], "socket_messages_received": sockets}}
    finally:
        listener.close()
    return results


def _start(federation, attempt: Attempt, state: Path, params: Path, malicious: Path, listener: Listener,
           node_map: str | None) -> dict:
    output = state / "runs" / (attempt.run_key or attempt.key)
    config = {"params-path": str(params), "strategy": "fedavg", "output-dir": str(output), "resume": False,
              **attempt.run_config}
    if attempt.adversarial_package:
        config["adversary-socket"] = listener.address
    if node_map:
        config["site-nodes"] = node_map
    run_id, stream = _submit(federation, malicious if attempt.adversarial_package else REPO_ROOT, config,
                             f"run-{attempt.run_key or attempt.key}")
    return {"run_id": run_id, "stream": stream, "output": output, "started": time.perf_counter()}


def _finish(federation, attempt: Attempt, run: dict, watched: list[str], timeout: float) -> dict:
    status, details = federation.wait(run["run_id"], run["stream"], timeout, watched)
    return {**_outcome(status, details, attempt.expected_refusal),
            "seconds_since_submitted": round(time.perf_counter() - run["started"], 1),
            "evidence": _evidence(run["output"])}


def _add_third_node(federation: dep.LocalFederation, sites: dict[str, Path], state: Path) -> None:
    """Register a third key and start a node with it, serving a copy of the first site's cohort."""
    first = next(iter(sites))
    copy = state / "third_node" / first
    copy.mkdir(parents=True, exist_ok=True)
    for item in sites[first].iterdir():
        if item.is_file():
            shutil.copy2(item, copy / item.name)
    key = federation.credentials.folder / "third.key"
    make_node_key(key, key.with_suffix(".pub"))
    answer = dep._json_of(federation.flwr("supernode", "register", str(key.with_suffix(".pub")), dep.CONNECTION,
                                          "--name", "third", "--format", "json").stdout)
    if not answer.get("success"):
        raise dep.DeploymentError(f"could not register the third node's key: {answer}")
    node = federation.start_supernode(first, copy, role="supernode-third", private_key=key)
    federation.wait_connected([node.role])


def evaluate_trust(params_file: Path, build_dir: Path, progress: bool = True) -> dict:
    """Run both columns on the profile's sites (one round each); write and return the table."""
    params_file, build_dir = Path(params_file).resolve(), Path(build_dir).resolve()
    profile = load_params(params_file)
    sites = {site: site_dir(build_dir, site) for site in profile.sites}
    missing = [s for s, folder in sites.items() if not (folder / "cohort.parquet").exists()]
    if missing:
        raise dep.DeploymentError(f"site folder(s) of {', '.join(missing)} missing under {build_dir}; "
                                  f"run stage 1 first (make stage1 PROFILE={profile.profile})")
    rows = min(len(load_site(folder, "train")) for folder in sites.values())
    target = build_dir / TRUST
    target.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(params_file.read_text())
    data["federated"] = {**data.get("federated", {}), "rounds": 1}
    params = target / f"{profile.profile}.yaml"  # (a profile file is named after its profile)
    params.write_text(yaml.safe_dump(data))
    table = {"profile": profile.profile, "rounds_per_attempt": 1,
             "hardened_policy": HARDENED_POLICY.as_node_config(), "columns": {}}
    for column in ("plain", "hardened"):
        if progress:
            print(f"trust: {column} federation, {len(attempts(rows))} attempts ...", flush=True)
        table["columns"][column] = run_column(column, sites, build_dir / dep.STATE / f"trust-{column}", params, rows)
    write_json(target / "malicious_server.json", table)
    (target / "malicious_server.md").write_text(markdown(table))
    return table


def markdown(table: dict) -> str:
    """Return the outcome table as Markdown: one row per attempt, one column per federation."""
    def cell(result):
        if result["completed"]:
            return "completed"
        return f"refused: {result['refused_by'] or result['status']}"

    plain, hardened = table["columns"]["plain"], table["columns"]["hardened"]
    lines = ["| attempt | Flower defaults (plain) | hardened |", "|---|---|---|"]
    for key, result in hardened.items():
        shown = cell(plain[key]) if key in plain else "not run (accepted, as `make federation` shows)"
        lines.append(f"| {result['attempt']} | {shown} | {cell(result)} |")
    lines.append("| (d) run submitted from a hospital's host via the control plane | not tested | not tested "
                 "(closed control plane not built) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fl.flower.trust", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--build-root", type=Path, default=REPO_ROOT / "build")
    args = parser.parse_args(argv)
    params_file = profile_path(args.profile)
    try:
        table = evaluate_trust(params_file, args.build_root / build_name(load_params(params_file).profile, None))
    except dep.DeploymentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
