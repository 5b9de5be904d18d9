"""The message ledger: every message that crosses a site boundary, described but never copied.

`LedgerGrid` wraps the Grid a ServerApp is given. For each message sent to
or received from a site it appends one JSON line to `ledger.jsonl`: run,
round, direction, site, message type, and for every record its keys with
array shapes, dtypes and bytes (config and metric values are described by
type, and only site names, feature names and settings are shown). It also
keeps each site's reply metrics for the per-round history, and hands the
replies to the strategy in site-name order so aggregation is deterministic.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid

from fl.flower import protocol

#: Config keys whose values the ledger shows (settings, not data).
SHOWN_CONFIG_KEYS = ("site", "features", "model", "hidden", "local-epochs", "batch-size", "learning-rate",
                     "weight-decay", "optimizer", "seed", "server-round", "proximal-mu", *protocol.DP_KEYS,
                     protocol.VALIDATION_FRACTION, protocol.PERSONAL_ARRAYS, protocol.PERSONALISE, "run",
                     "finetune-epochs", "finetune-patience", "finetune-validation-fraction")


def describe_message(message: Message) -> dict:
    """Return the shape-level description of a message's content (no array values)."""
    records = []
    if message.has_content():
        for key, record in message.content.items():
            if isinstance(record, ArrayRecord):
                entries = [{"name": name, "shape": list(array.shape), "dtype": array.dtype,
                            "bytes": len(array.data)} for name, array in record.items()]
                records.append({"key": key, "kind": "arrays", "entries": entries, "bytes": record.count_bytes()})
            elif isinstance(record, ConfigRecord):
                entries = []
                for name, value in record.items():
                    entry = {"name": name, "type": type(value).__name__}
                    if isinstance(value, list):
                        entry["length"] = len(value)
                    if name in SHOWN_CONFIG_KEYS:
                        entry["value"] = value
                    entries.append(entry)
                records.append({"key": key, "kind": "config", "entries": entries, "bytes": record.count_bytes()})
            elif isinstance(record, MetricRecord):
                entries = [{"name": name, "type": type(value).__name__} for name, value in record.items()]
                records.append({"key": key, "kind": "metrics", "entries": entries, "bytes": record.count_bytes()})
    return {
        "message_type": message.metadata.message_type,
        "records": records,
        "error": message.error.reason if message.has_error() else None,
        "bytes": message_to_proto(message).ByteSize(),
    }


class ForwardingGrid(Grid):
    """A Grid that hands everything to another Grid; subclasses override what they watch (send_and_receive)."""

    def __init__(self, grid: Grid):
        self._grid = grid

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class LedgerGrid(ForwardingGrid):
    """A Grid that records every message it carries, then delegates to the real Grid."""

    def __init__(self, grid: Grid, path: Path, run_label: str):
        super().__init__(grid)
        self.path = Path(path)
        self.run_label = run_label
        self.site_of_node: dict[int, str] = {}
        self.replies: list[tuple[int, str, str, dict]] = []  # (round, message type, site, metrics)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        outgoing = list(messages)
        descriptions = [describe_message(m) for m in outgoing]
        replies = list(self._grid.send_and_receive(outgoing, timeout=timeout))
        # Message ids are assigned when pushed; the round travels in the config ("server-round").
        round_of = {m.metadata.message_id: _round(m) for m in outgoing}
        for reply in replies:
            if reply.has_content() and protocol.SITE in reply.content:
                self.site_of_node[reply.metadata.src_node_id] = str(reply.content[protocol.SITE]["site"])
        site = lambda node: self.site_of_node.get(node, "unanswered")  # noqa: E731
        lines = [{"run": self.run_label, "round": _round(m), "direction": "server->site",
                  "site": site(m.metadata.dst_node_id), **d} for m, d in zip(outgoing, descriptions)]
        replies.sort(key=lambda r: site(r.metadata.src_node_id))
        for reply in replies:
            server_round = round_of.get(reply.metadata.reply_to_message_id, -1)
            lines.append({"run": self.run_label, "round": server_round, "direction": "site->server",
                          "site": site(reply.metadata.src_node_id), **describe_message(reply)})
            if reply.has_content() and protocol.METRICS in reply.content:
                self.replies.append((server_round, reply.metadata.message_type, site(reply.metadata.src_node_id),
                                     dict(reply.content[protocol.METRICS])))
        lines.sort(key=lambda line: (line["direction"] != "server->site", line["site"]))
        with open(self.path, "a") as handle:
            for line in lines:
                handle.write(json.dumps(line, sort_keys=True) + "\n")
        return replies


def _round(message: Message) -> int:
    """Return the federated round a message belongs to (0: the statistics round)."""
    content = message.content if message.has_content() else None
    if content is not None and protocol.CONFIG in content and "server-round" in content[protocol.CONFIG]:
        return int(content[protocol.CONFIG]["server-round"])
    return int(message.metadata.group_id or 0)
