"""The aggregator's checks on who answers and what they send, before anything is aggregated.

`CheckedGrid` wraps the Grid the ServerApp is given (outside the ledger, so
a reply it rejects is still in the ledger). With the registered node map
(run configuration `site-nodes`, "halland=123,sahlgrenska=456", written by
whoever registered the hospitals' keys) it requires exactly that set of
nodes: a node not in the map stops the run, and a reply whose self-reported
site differs from the node's registered site is rejected. Every reply is
validated before the strategy sees it:

- training replies carry arrays of exactly the shapes that were sent, of a
  float dtype (float32 or float64), all finite, and a `num-examples` equal to the training rows the
  same node reported in the statistics round;
- statistics replies carry three float64 vectors, one value per feature;
- metrics are finite numbers, and no reply exceeds `max_reply_bytes`.

A failed check raises `FederationError` naming the site, the round and the
check, never a value. These checks protect the aggregation from a wrong or
hostile node; they do not protect a hospital from the aggregator (that is
`fl.flower.policy` and `fl.flower.runner`).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType
from flwr.common.serde import message_to_proto

from fl.flower import protocol
from fl.flower.ledger import ForwardingGrid

#: Weight dtypes a training reply may carry.
WEIGHT_DTYPES = ("float32", "float64")
#: A reply may exceed the arrays it returns by this much (metrics, site record, framing).
REPLY_OVERHEAD_BYTES = 64 * 1024


class ReplyRejected(RuntimeError):
    """A node's reply or presence failed a check (the ServerApp turns this into a FederationError)."""


def parse_node_map(text: str) -> dict[int, str]:
    """Return {node id: site} from "site=node_id,site=node_id" (empty text: no map)."""
    mapping: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        site, _, node = item.partition("=")
        try:
            node_id = int(node)
        except ValueError:
            raise ReplyRejected(f"run config site-nodes: {item!r} is not site=node_id") from None
        if node_id in mapping or site in mapping.values():
            raise ReplyRejected(f"run config site-nodes names node {node_id} or site {site!r} twice")
        mapping[node_id] = site.strip()
    return mapping


def format_node_map(node_ids: dict[str, int]) -> str:
    """Return the run-config value for {site: node id}."""
    return ",".join(f"{site}={node}" for site, node in node_ids.items())


class CheckedGrid(ForwardingGrid):
    """A Grid that admits only registered nodes and hands on only replies that pass every check."""

    def __init__(self, grid, node_map: dict[int, str] | None = None, max_reply_bytes: int = 64 * 2**20):
        super().__init__(grid)
        self.node_map = dict(node_map or {})
        self.max_reply_bytes = max_reply_bytes
        self.training_rows: dict[int, int] = {}

    def get_node_ids(self) -> Iterable[int]:
        nodes = list(self._grid.get_node_ids())
        if self.node_map:
            extra = sorted(set(nodes) - set(self.node_map))
            if extra:
                raise ReplyRejected(f"node(s) {extra} are connected but not in the registered node map "
                                    f"({', '.join(sorted(self.node_map.values()))}); refusing to run with them")
        return nodes

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        outgoing = list(messages)
        sent = {m.metadata.dst_node_id: m for m in outgoing}
        if self.node_map:
            strangers = sorted(set(sent) - set(self.node_map))
            if strangers:
                raise ReplyRejected(f"refusing to send to node(s) {strangers}: not in the registered node map")
        replies = list(self._grid.send_and_receive(outgoing, timeout=timeout))
        for reply in replies:
            if not reply.has_error():
                self._check(reply, sent.get(reply.metadata.src_node_id))
        return replies

    def _check(self, reply: Message, request: Message | None) -> None:
        node = reply.metadata.src_node_id
        where = f"node {node}"
        if request is None:
            raise ReplyRejected(f"{where} replied without being asked")
        content = reply.content
        site = str(content[protocol.SITE]["site"]) if protocol.SITE in content else None
        if self.node_map:
            registered = self.node_map.get(node)
            if site != registered:
                raise ReplyRejected(f"{where} is registered as site {registered!r} but its reply says {site!r}")
        where = f"site {site!r} (node {node}), round {_round(request)}"
        size = message_to_proto(reply).ByteSize()
        if size > self.max_reply_bytes:
            raise ReplyRejected(f"{where}: reply of {size} bytes exceeds the cap of {self.max_reply_bytes}")
        if protocol.METRICS in content:
            # A site whose test (or validation) rows have one outcome class reports its AUROC as NaN: not
            # estimable, which the evaluation shows as such. Any other non-finite metric is refused.
            bad = [k for k, v in content[protocol.METRICS].items()
                   if not _finite(v) and not (k in NOT_ESTIMABLE_METRICS and isinstance(v, float) and v != v)]
            if bad:
                raise ReplyRejected(f"{where}: metric(s) {bad} are not finite numbers")
        kind = reply.metadata.message_type
        if kind == protocol.QUERY_STATISTICS:
            self._check_statistics(reply, where)
        elif kind == MessageType.TRAIN:
            self._check_training(reply, request, where, size)
        elif kind == protocol.QUERY_PERSONALISE and protocol.ARRAYS in content:
            raise ReplyRejected(f"{where}: a personalisation reply carries weights; personal models stay at the site")

    def _check_statistics(self, reply: Message, where: str) -> None:
        content = reply.content
        arrays = content[protocol.STATISTICS].to_numpy_ndarrays() if protocol.STATISTICS in content else []
        n_features = len(content[protocol.SITE]["features"])
        if len(arrays) != 3 or any(a.dtype != np.float64 or a.shape != (n_features,) for a in arrays):
            raise ReplyRejected(f"{where}: statistics must be three float64 vectors of {n_features} values")
        if not all(np.isfinite(a).all() for a in arrays):
            raise ReplyRejected(f"{where}: statistics contain non-finite values")
        rows = int(content[protocol.METRICS]["rows"])
        if rows < 0 or np.any(arrays[0] > rows) or np.any(arrays[0] < 0):
            raise ReplyRejected(f"{where}: feature counts are inconsistent with the {rows} rows reported")
        self.training_rows[reply.metadata.src_node_id] = rows

    def _check_training(self, reply: Message, request: Message, where: str, size: int) -> None:
        sent = request.content[protocol.ARRAYS]
        got = reply.content[protocol.ARRAYS] if protocol.ARRAYS in reply.content else None
        if not isinstance(got, ArrayRecord):
            raise ReplyRejected(f"{where}: training reply carries no weights")
        # Shapes exactly as sent; the dtype a float one (FedAdam's server step sends float64, sites reply float32).
        expected = [a.shape for a in sent.to_numpy_ndarrays()]
        weights = got.to_numpy_ndarrays()
        shapes = [a.shape for a in weights]
        if shapes != expected:
            raise ReplyRejected(f"{where}: weights have shapes {shapes}, expected {expected}")
        wrong = sorted({str(a.dtype) for a in weights} - set(WEIGHT_DTYPES))
        if wrong:
            raise ReplyRejected(f"{where}: weights have dtype(s) {wrong}; expected one of {list(WEIGHT_DTYPES)}")
        if not all(np.isfinite(a).all() for a in weights):
            raise ReplyRejected(f"{where}: weights contain non-finite values")
        if size > got.count_bytes() + REPLY_OVERHEAD_BYTES:
            raise ReplyRejected(f"{where}: reply of {size} bytes carries more than its weights")
        examples = int(reply.content[protocol.METRICS][protocol.NUM_EXAMPLES])
        rows = self.training_rows.get(reply.metadata.src_node_id)
        fraction = float(request.content[protocol.CONFIG].get(protocol.VALIDATION_FRACTION, 0.0))
        if rows is not None and fraction > 0:
            # Model selection: the site trains on its rows minus a stratified validation share (rounded per class).
            if abs((rows - examples) - fraction * rows) > 2:
                raise ReplyRejected(f"{where}: reports {examples} training examples; {rows} training rows less a "
                                    f"{fraction:g} validation share leave about {rows - fraction * rows:.0f}")
        elif rows is not None and examples != rows:
            raise ReplyRejected(f"{where}: reports {examples} training examples but {rows} training rows in the "
                                "statistics round")


#: Metrics that a site may report as NaN (not estimable on one outcome class).
NOT_ESTIMABLE_METRICS = ("auroc",)


def _finite(value) -> bool:
    values = value if isinstance(value, list) else [value]
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _round(message: Message) -> int:
    content = message.content if message.has_content() else None
    if content is not None and protocol.CONFIG in content and "server-round" in content[protocol.CONFIG]:
        return int(content[protocol.CONFIG]["server-round"])
    return int(message.metadata.group_id or 0)
