"""The Flower deployment engine: real SuperLink and SuperNode processes on 127.0.0.1.

Each test starts processes through `python -m fl.flower.deployment` (as
`make federation` does) or `LocalFederation`, and an autouse fixture proves
that none of them is left running afterwards, pass or fail.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from compendium.params import PARAMS_DIR, REPO_ROOT, load_params
from fl.flower import deployment as dep
from fl.flower.engine import run_direct
from fl.flower.credentials import make_node_key
from fl.flower.isolation import SiteIsolationError, check_site
from fl.flower.protocol import dp_entries
from fl.flower.server_app import CHECKPOINTS
from synthetic_sites import build_sites

# One worker runs them one after another: each starts several processes on a 2-core machine.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("deployment")]


@pytest.fixture(autouse=True)
def nothing_left_running(monkeypatch):
    """Fail (and clean up) if any process this test's federations started outlives the test.

    Every process started from here inherits a marker unique to the test, so
    the check never touches another test's (or a user's) federation.
    """
    marker = f"test-{uuid.uuid4().hex[:12]}-"
    monkeypatch.setenv(dep.MARKER, marker)
    yield marker
    leftovers = dep.processes_with_marker(marker)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left running after the test: {leftovers}"


def _profile_file(folder: Path, **federated) -> Path:
    """Write the smoke profile, with `federated` overrides, as folder/smoke.yaml."""
    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["federated"] = {**data.get("federated", {}), **federated}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "smoke.yaml").write_text(yaml.safe_dump(data))
    return folder / "smoke.yaml"


def _sites(build: Path, profile) -> dict[str, Path]:
    sizes = {site: p.patients for site, p in profile.site_profiles().items()}
    return build_sites(build, sizes, seed=profile.seed)


@contextlib.contextmanager
def _launched(params: Path, build: Path, *extra: str, home: Path):
    """Run the deployment CLI with HOME pointing at an empty folder (nothing may be written there)."""
    env = {**os.environ, "HOME": str(home)}
    env.pop("FLWR_HOME", None)
    launcher = subprocess.Popen([sys.executable, "-m", "fl.flower.deployment", "--params", str(params),
                                 "--build-dir", str(build), *extra], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield launcher
    finally:
        if launcher.poll() is None:  # the test failed while it ran: stop it (it stops its processes)
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(60)


def _wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if process is not None and process.poll() is not None:
            raise AssertionError(f"launcher exited ({process.returncode}) before {what}: {process.stderr.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


def _assert_same_model(folder: Path, reference_weights: list[np.ndarray], tolerance: float = 1e-6):
    weights = dep.final_weights(folder)
    assert len(weights) == len(reference_weights)
    for got, expected in zip(weights, reference_weights):
        np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)


def test_the_deployment_run_equals_the_simulation_and_refuses_an_unregistered_node(tmp_path, nothing_left_running):
    """Smoke profile end to end on SuperLink + 2 SuperNodes with TLS; an intruder is turned away meanwhile."""
    params = _profile_file(tmp_path / "params")
    profile = load_params(params)
    build, home = tmp_path / "build", tmp_path / "home"
    home.mkdir()
    sites = _sites(build, profile)
    state = build / dep.STATE
    with _launched(params, build, home=home) as launcher:
        _wait_for(lambda: "Successfully started run" in (state / "logs" / "run.log").read_text()
                  if (state / "logs" / "run.log").exists() else False, 120, "the run to start", launcher)
        connection = tomllib.loads((state / "flwr_home" / "cli" / "config.toml").read_text())
        address = connection["superlink"][dep.CONNECTION]["address"]
        # A SuperNode whose key was never registered tries to join the running federation.
        make_node_key(tmp_path / "intruder.key", tmp_path / "intruder.pub")
        # (Output to a file: Flower's detached helper process would hold a pipe open.)
        intruder_log = tmp_path / "intruder.log"
        with open(intruder_log, "w") as log:
            intruder = subprocess.Popen(
                [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", address,
                 "--root-certificates", str(state / "credentials" / "ca.crt"),
                 "--auth-supernode-private-key", str(tmp_path / "intruder.key"), "--max-retries", "2",
                 "--node-config", f'site="halland" site-dir="{sites["halland"]}" confine=true', "--port",
                 str(dep.free_port())],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "FLWR_HOME": str(tmp_path / "intruder_home"),
                     dep.MARKER: f"{nothing_left_running}intruder",
                     "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        intruder_exit = intruder.wait(timeout=120)
        for pid in dep.processes_with_marker(f"{nothing_left_running}intruder"):  # its SuperExec helper
            os.kill(pid, signal.SIGKILL)
        out, err = launcher.communicate(timeout=900)
    assert intruder_exit != 0
    assert "Exit Code: 305" in intruder_log.read_text()  # Flower: the SuperNode could not activate
    assert launcher.returncode == 0, err
    folder = build / dep.DEPLOYMENT
    summary = json.loads((folder / "deployment.json").read_text())
    assert summary["status"] == "finished:completed" and summary["tls"] and summary["node_authentication"]
    assert len(summary["round_seconds"]) == profile.federated.rounds

    # The same app, parameters and data in the in-process simulation: the same model and history.
    simulated = run_direct(profile, "fedavg", list(sites.values()), tmp_path / "simulation")
    _assert_same_model(folder, simulated.weights)
    assert json.loads((folder / "history.json").read_text()) == simulated.history

    # The server's ledger and each site's own record of what its process sent agree, message by message,
    # up to the message id Flower assigns in transit (64 hex characters plus protobuf framing).
    for site, directions in summary["bytes"].items():
        for direction, counts in directions.items():
            assert counts["messages"] == 1 + 2 * profile.federated.rounds
            assert abs(counts["difference_bytes"]) <= 70 * counts["messages"], (site, direction, counts)
            assert counts["ledger_bytes"] > 0 and counts["site_process_bytes"] > 0

    # Flower's configuration stayed inside the build folder: nothing in the user's home.
    assert not (home / ".flwr").exists()
    assert (state / "flwr_home" / "cli" / "config.toml").exists()
    # No private key is published with the results.
    assert not list(folder.rglob("*.key"))


def test_a_node_given_the_other_sites_folder_refuses_to_serve_it(tmp_path):
    """Wrong node config: halland's SuperNode pointed at sahlgrenska's folder. The run stops, naming the cause."""
    params = _profile_file(tmp_path / "params", rounds=2, round_timeout_s=60)
    profile = load_params(params)
    build = tmp_path / "build"
    sites = _sites(build, profile)
    with pytest.raises(SiteIsolationError, match="configured as site 'halland'"):
        check_site(sites["sahlgrenska"], "halland")

    state = build / dep.STATE
    with dep.LocalFederation(state, sites) as federation:
        federation.start_superlink()
        for site in sites:
            federation.register(site)
        wrong = federation.start_supernode("halland", sites["sahlgrenska"])  # the other site's path
        right = federation.start_supernode("sahlgrenska", sites["sahlgrenska"])
        federation.wait_connected([wrong.role, right.role])
        run_id, stream = federation.submit({"params-path": str(params), "strategy": "fedavg",
                                            "output-dir": str(tmp_path / "server"), "resume": False})
        status, details = federation.wait(run_id, stream, 300, ["superlink", wrong.role, right.role])
    assert status == "finished:failed", (status, details)
    assert "configured as site 'halland'" in details
    assert not (tmp_path / "server" / CHECKPOINTS / "round_001.npz").exists()


def test_confinement_refuses_reads_of_another_sites_folder(tmp_path):
    """In a confined node process, the other site's files cannot be opened or listed, its own can."""
    sites = build_sites(tmp_path, {"halland": 200, "sahlgrenska": 200}, seed=3)
    script = (
        "import os, sys\n"
        "from fl.data import load_site\n"
        "from fl.flower.isolation import confine_to_site, SiteIsolationError\n"
        f"own, other = {str(sites['halland'])!r}, {str(sites['sahlgrenska'])!r}\n"
        "confine_to_site(own)\n"
        "print('own rows', len(load_site(own, 'all')))\n"
        "for attempt in (lambda: load_site(other, 'all'), lambda: os.listdir(other),\n"
        "                lambda: open(os.path.join(other, 'cohort.parquet'), 'rb')):\n"
        "    try:\n"
        "        attempt(); print('READ')\n"
        "    except SiteIsolationError as error:\n"
        "        print('refused', error)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "own rows" in result.stdout and "READ" not in result.stdout
    assert sum(line.startswith("refused") for line in result.stdout.splitlines()) == 3
    assert "may read only" in result.stdout


@pytest.mark.parametrize("victim", ["supernode-halland", "superlink"])
def test_a_process_killed_mid_run_stops_the_run_and_resume_reaches_the_same_model(tmp_path, victim):
    params = _profile_file(tmp_path / "params", rounds=3, local_epochs=2)
    profile = load_params(params)
    build, home = tmp_path / "build", tmp_path / "home"
    home.mkdir()
    sites = _sites(build, profile)
    state = build / dep.STATE
    checkpoints = state / dep.SERVER_OUTPUT / CHECKPOINTS

    with _launched(params, build, home=home) as launcher:
        _wait_for(lambda: (checkpoints / "round_001.npz").exists(), 600, "round 1's checkpoint", launcher)
        pid = json.loads((state / dep.PIDS_FILE).read_text())[victim]
        os.kill(pid, signal.SIGKILL)
        out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 2
    assert f"{victim} (pid {pid}) exited with code -9 during the run" in err
    assert "--resume" in err and "rounds are checkpointed" in err
    assert not (build / dep.DEPLOYMENT).exists()  # nothing collected from a failed run

    with _launched(params, build, "--resume", home=home) as resumed:
        out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err
    summary = json.loads((build / dep.DEPLOYMENT / "deployment.json").read_text())
    assert summary["resumed_after_round"] >= 1
    uninterrupted = run_direct(profile, "fedavg", list(sites.values()), tmp_path / "uninterrupted")
    _assert_same_model(build / dep.DEPLOYMENT, uninterrupted.weights)
    assert json.loads((build / dep.DEPLOYMENT / "history.json").read_text()) == uninterrupted.history


def test_patient_level_dp_sgd_runs_in_the_deployment_with_the_accountant_kept_across_processes(tmp_path):
    """Each message is a new ClientApp process: the accountant must survive in the node's Context state."""
    from fl.privacy.dp import DPConfig

    params = _profile_file(tmp_path / "params", rounds=2)
    profile = load_params(params)
    sites = _sites(tmp_path / "build", profile)
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, delta=1e-5, learning_rate=0.5,
                  local_epochs=1)
    with dep.LocalFederation(tmp_path / "build" / dep.STATE, sites) as federation:
        federation.start_superlink()
        for site in sites:
            federation.register(site)
        nodes = [federation.start_supernode(site, folder).role for site, folder in sites.items()]
        federation.wait_connected(nodes)
        run_id, stream = federation.submit({"params-path": str(params), "strategy": "fedavg",
                                            "output-dir": str(tmp_path / "server"), "resume": False,
                                            **dp_entries(dp)})
        status = federation.wait(run_id, stream, 600, ["superlink", *nodes])
    assert status[0] == "finished:completed", status
    simulated = run_direct(profile, "fedavg", list(sites.values()), tmp_path / "simulation", patient_dp=dp)
    _assert_same_model(tmp_path / "server", simulated.weights)
    history = json.loads((tmp_path / "server" / "history.json").read_text())
    assert history == simulated.history
    epsilon = {(row["site"], row["round"]): row["epsilon"] for row in history}
    assert all(epsilon[(site, 2)] > epsilon[(site, 1)] for site in sites)



@pytest.mark.timeout(1800)  # two federations, nine runs of Flower's deployment engine
def test_a_malicious_server_succeeds_against_flower_defaults_and_is_refused_by_the_hardened_hospitals(tmp_path):
    """Each attempt of the malicious-server test, against both federations (fl/flower/trust.py)."""
    from fl.flower import trust

    params = _profile_file(tmp_path / "params")
    build = tmp_path / "build"
    sites = build_sites(build, {"halland": 500, "sahlgrenska": 700}, seed=7)
    table = trust.evaluate_trust(params, build, progress=False)
    plain, hardened = table["columns"]["plain"], table["columns"]["hardened"]
    assert set(hardened) == {a.key for a in trust.attempts(100)} == set(plain) | {"control"}

    # Flower's defaults: every attempt goes through, and the ledger shows what the hospitals did.
    for key, result in plain.items():
        assert result["completed"], (key, result)
    assert plain["a_batch_1"]["evidence"]["batch_size_asked"] == 1
    assert plain["a_batch_1"]["evidence"]["training_replies_with_weights"] == 2
    assert plain["b_dp_off"]["evidence"]["dp_noise_asked"] is None  # no DP-SGD settings were sent
    stolen = plain["c_steal"]["evidence"]
    assert "stolen-bytes" in stolen["reply_metrics"]
    assert sorted(line.split()[0] for line in stolen["socket_messages_received"]) == sorted(sites)
    assert all(int(line.split()[1]) > 0 for line in stolen["socket_messages_received"])
    assert plain["e_third_node"]["evidence"]["training_replies_with_weights"] == 3

    # Hardened: the control run completes; every attack is refused for its stated reason, before training.
    assert hardened["control"]["completed"], hardened["control"]
    for key, result in hardened.items():
        if key == "control":
            continue
        assert not result["completed"] and result["refused_by"] == result["expected_refusal"], (key, result)
        assert result["evidence"]["training_replies_with_weights"] == 0, (key, result)
    assert hardened["c_steal"]["evidence"]["socket_messages_received"] == []
    assert "FEDHF-POLICY-DP-REQUIRED" in " ".join(hardened["b_dp_off"]["evidence"]["refusals_in_ledger"])
    # The hospitals' runners kept their own record of the refused package.
    records = [json.loads(line) for site in sites for line in
               (build / dep.STATE / "trust-hardened" / dep.SITE_RECORDS / f"{site}.jsonl").read_text().splitlines()]
    assert any(r["outcome"] == "FEDHF-FAB-NOT-PINNED" and not r["pinned"] for r in records)
    assert (build / trust.TRUST / "malicious_server.md").read_text().count("refused") >= 5
