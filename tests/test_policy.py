"""A hospital's floors, its fixed error codes, and the aggregator's checks on replies (in-process, real apps).

The pilot's real ClientApp and ServerApp run on the direct engine; each
hospital's node configuration carries its policy, as a SuperNode's would.
Every control is shown to fire by planting the fault it guards against.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict

from fl.flower import protocol
from fl.flower.engine import DirectGrid, direct_contexts, run_direct
from fl.flower.integrity import ReplyRejected, format_node_map, parse_node_map
from fl.flower.policy import PolicyRefusal, SitePolicy
from fl.flower.server_app import FederationError, LEDGER_FILE
from fl.privacy.dp import DPConfig

SITES = {"halland": 400, "sahlgrenska": 500}
SITES_SEED = 11
FEDERATED = {"rounds": 2, "local_epochs": 1}
DP = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, delta=1e-5, learning_rate=0.5,
              local_epochs=1)


def _grid(site_dirs, tmp_path, client_app=None, **policy) -> DirectGrid:
    """Return a direct grid whose nodes carry `policy` and a site-local log, as hardened SuperNodes do."""
    contexts = direct_contexts(site_dirs)
    for context, folder in zip(contexts.values(), site_dirs):
        context.node_config.update({"site": folder.name, "site-log": str(tmp_path / "logs" / f"{folder.name}.jsonl"),
                                    **policy})
    return DirectGrid(contexts, client_app=client_app)


def _ledger_errors(folder) -> list[str]:
    lines = [json.loads(line) for line in (folder / LEDGER_FILE).read_text().splitlines()]
    return [line["error"] for line in lines if line["error"]]


def test_a_run_within_the_floors_gives_the_same_model_as_without_them(profile, site_dirs, tmp_path):
    plain = run_direct(profile, "fedavg", site_dirs, tmp_path / "plain")
    floors = dict(SitePolicy(min_batch_size=32, max_local_epochs=5, allowed_models=("logistic",)).as_node_config())
    guarded = run_direct(profile, "fedavg", site_dirs, tmp_path / "guarded", grid=_grid(site_dirs, tmp_path, **floors))
    for a, b in zip(plain.weights, guarded.weights):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy, overrides, code", [
    ({"min-batch-size": 64}, {"batch_size": 8}, "FEDHF-POLICY-BATCH-SIZE"),
    ({"max-local-epochs": 1}, {"local_epochs": 3}, "FEDHF-POLICY-EPOCHS"),
    ({"require-dp": True}, {}, "FEDHF-POLICY-DP-REQUIRED"),
    ({"allowed-models": "mlp"}, {}, "FEDHF-POLICY-MODEL"),
])
def test_a_run_asking_for_less_than_a_floor_is_refused_with_its_code_in_the_ledger(profile, site_dirs, tmp_path,
                                                                                   policy, overrides, code):
    weak = profile.model_copy(update={"federated": profile.federated.model_copy(update=overrides)})
    with pytest.raises(FederationError, match=code):
        run_direct(weak, "fedavg", site_dirs, tmp_path / "run", grid=_grid(site_dirs, tmp_path, **policy))
    errors = _ledger_errors(tmp_path / "run")
    assert errors and all(e.startswith(code) for e in errors), errors
    assert not (tmp_path / "run" / "checkpoints" / "round_001.npz").exists()
    # Without the hospital's policy the same request is trained.
    run_direct(weak, "fedavg", site_dirs, tmp_path / "plain")


def test_the_epsilon_ceiling_refuses_the_round_that_would_cross_it(profile, site_dirs, tmp_path):
    from opacus.accountants import RDPAccountant

    # The projection equals what the accountant reports after training the round.
    ran = run_direct(profile, "fedavg", site_dirs, tmp_path / "dp", patient_dp=DP)
    first = {row["site"]: row["epsilon"] for row in ran.history if row["round"] == 1}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    from fl.flower.client_app import projected_epsilon
    from fl.data import load_site

    rows = len(load_site(site_dirs[0], "train"))
    assert projected_epsilon(context, DP, rows) == pytest.approx(first["halland"], rel=1e-9)
    assert RDPAccountant().history == []  # (the projection never touches a real accountant)

    # A ceiling between round 1's and round 2's epsilon: round 1 trains, round 2 is refused.
    second = {row["site"]: row["epsilon"] for row in ran.history if row["round"] == 2}
    ceiling = (max(first.values()) + min(second.values())) / 2
    with pytest.raises(FederationError, match="FEDHF-POLICY-EPSILON"):
        run_direct(profile, "fedavg", site_dirs, tmp_path / "capped", patient_dp=DP,
                   grid=_grid(site_dirs, tmp_path, **{"require-dp": True, "max-epsilon": ceiling}))
    assert (tmp_path / "capped" / "checkpoints" / "round_001.npz").exists()
    assert not (tmp_path / "capped" / "checkpoints" / "round_002.npz").exists()


def test_a_bad_policy_value_is_refused_with_a_config_code():
    with pytest.raises(PolicyRefusal, match="FEDHF-POLICY-CONFIG.*min-batch-size"):
        SitePolicy.from_node_config({"min-batch-size": "many"})
    with pytest.raises(PolicyRefusal, match="FEDHF-POLICY-CONFIG.*require-dp"):
        SitePolicy.from_node_config({"require-dp": "perhaps"})


def test_clientapp_errors_leave_the_site_as_fixed_codes_and_the_details_stay_in_its_log(profile, site_dirs,
                                                                                         tmp_path):
    from fl.flower import client_app

    secret = "row 1234 value 98.6 path /data/halland/cohort.parquet"

    def failing(msg: Message, context: Context) -> Message:
        raise ValueError(secret)

    app = client_app.ClientApp(mods=[client_app.site_ledger, client_app.hospital_guard])
    app.query("statistics")(failing)
    with pytest.raises(FederationError) as raised:
        run_direct(profile, "fedavg", site_dirs, tmp_path / "run", grid=_grid(site_dirs, tmp_path, client_app=app))
    assert "FEDHF-CLIENTAPP-ERROR" in str(raised.value) and secret not in str(raised.value)
    assert secret not in (tmp_path / "run" / LEDGER_FILE).read_text()
    log = [json.loads(line) for line in (tmp_path / "logs" / "halland.jsonl").read_text().splitlines()]
    assert log[-1]["code"] == "FEDHF-CLIENTAPP-ERROR" and secret in log[-1]["error"]


def test_the_node_map_admits_exactly_the_registered_nodes(profile, site_dirs, tmp_path):
    grid = _grid(site_dirs, tmp_path)
    node_map = parse_node_map(format_node_map({"halland": 100, "sahlgrenska": 101}))
    run_direct(profile, "fedavg", site_dirs, tmp_path / "ok")  # baseline
    from fl.flower import server_app
    from fl.flower.engine import use_server_identity

    use_server_identity()
    server_app.run_federation(grid, profile, "fedavg", tmp_path / "mapped", node_map=node_map)
    # A third node (a copy of Halland's node) joins: refused before any message is sent.
    third = dict(grid.contexts)
    third[102] = Context(run_id=1, node_id=102, node_config=dict(grid.contexts[100].node_config), state=RecordDict(),
                         run_config={})
    with pytest.raises(ReplyRejected, match=r"\[102\].*not in the registered node map"):
        server_app.run_federation(DirectGrid(third), profile, "fedavg", tmp_path / "third", node_map=node_map)
    # Without the map, the third node takes part and its update is averaged in.
    server_app.run_federation(DirectGrid(third), profile, "fedavg", tmp_path / "joined")
    lines = [json.loads(line) for line in (tmp_path / "joined" / LEDGER_FILE).read_text().splitlines()]
    trained = [line for line in lines if line["round"] == 1 and line["direction"] == "site->server"
               and line["message_type"] == "train"]
    assert len(trained) == 3
    # A node that reports another site's name than the one it is registered as.
    swapped = parse_node_map("halland=101,sahlgrenska=100")
    with pytest.raises(ReplyRejected, match="registered as site 'sahlgrenska' but its reply says 'halland'"):
        server_app.run_federation(grid, profile, "fedavg", tmp_path / "swapped", node_map=swapped)


def _tampering_app(tamper):
    """Return the pilot's ClientApp with `tamper(reply)` applied to each training reply (a hostile site)."""
    from fl.flower import client_app

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train" and not reply.has_error():
            tamper(reply)
        return reply

    app = client_app.ClientApp(mods=[mod])
    for name in ("statistics",):
        app.query(name)(getattr(client_app, name))
    app.train()(client_app.train)
    app.evaluate()(client_app.evaluate)
    return app


def _replace_weights(reply, transform):
    weights = reply.content[protocol.ARRAYS].to_numpy_ndarrays()
    reply.content[protocol.ARRAYS] = ArrayRecord(transform(weights))


@pytest.mark.parametrize("tamper, match", [
    (lambda r: _replace_weights(r, lambda w: [w[0].astype(np.int64), *w[1:]]), "dtype"),
    (lambda r: _replace_weights(r, lambda w: [np.concatenate([w[0], w[0]], axis=-1), *w[1:]]), "shapes"),
    (lambda r: _replace_weights(r, lambda w: [np.full_like(w[0], np.nan), *w[1:]]), "non-finite"),
    (lambda r: r.content[protocol.METRICS].__setitem__(protocol.NUM_EXAMPLES, 10**6), "training examples"),
    (lambda r: r.content.__setitem__("extra", ArrayRecord([np.zeros(200_000, np.float32)])), "more than its weights"),
])
def test_a_tampered_training_reply_is_rejected_before_aggregation(profile, site_dirs, tmp_path, tamper, match):
    grid = DirectGrid(direct_contexts(site_dirs), client_app=_tampering_app(tamper))
    with pytest.raises(ReplyRejected, match=match):
        run_direct(profile, "fedavg", site_dirs, tmp_path / "run", grid=grid)
    assert not (tmp_path / "run" / "checkpoints" / "round_001.npz").exists()
    # The untampered app passes the same checks.
    run_direct(profile, "fedavg", site_dirs, tmp_path / "clean")
