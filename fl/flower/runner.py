"""The hospital's own runner: only app packages the hospital has reviewed run at its site.

Flower 1.42 runs a ClientApp as whatever app package (FAB) the submitter
built. With `flower-supernode --isolation process` the SuperNode starts no
ClientApp itself: the hospital starts the process that takes the node's
tasks. This module is that process:

    python -m fl.flower.runner superexec --runtime-api-address 127.0.0.1:9094 \
        --insecure --superexec-auth-secret-file runner.secret

It is Flower's own SuperExec (`flower-superexec`), except that each task
starts `python -m fl.flower.runner clientapp` in place of `flwr-clientapp`.
That is Flower's `flwr-clientapp` with two checks around it, both in the
hospital's process and both before any of the package's code is unpacked
or imported:

- the SHA-256 of the package bytes the SuperNode hands over (recomputed
  here, not taken from the message) must be on the hospital's allow-list,
  node configuration `pinned-fabs` ("hash,hash"; no list: nothing runs). A
  package not on it gets an error reply with code FEDHF-FAB-NOT-PINNED,
  which the server sees and its ledger records;
- every task is appended to the hospital's own record, node configuration
  `site-record` (JSON lines: run, message type, package hash, whether it
  was pinned, bytes received and sent, outcome), written by this runner and
  not by the server-shipped code.

What it guarantees: a package whose bytes differ from a reviewed one by a
single bit does not run at this site. What it does not: that the reviewed
package is harmless (that is the review), that the aggregator's ServerApp is
the same package (it runs on the aggregator's machine), or that nothing
else on the machine reaches the SuperNode's runtime API (hospitals protect
it with the SuperExec secret, which this runner and the SuperNode share,
and by running it on loopback). It hooks Flower 1.42's
`flwr.supernode.runtime.run_clientapp` and `subprocess_executor` by name;
the deployment tests fail if a Flower upgrade moves them.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import time
from pathlib import Path

#: Node-config keys this runner reads.
PINNED_KEY = "pinned-fabs"
RECORD_KEY = "site-record"
#: The same code and sentence as fl.flower.policy (kept literal here: see `_purge`).
NOT_PINNED = "FEDHF-FAB-NOT-PINNED"
NOT_PINNED_SENTENCE = "the run's app package is not on this hospital's list of reviewed packages"


class PackageNotPinned(PermissionError):
    """The run's app package is not on this hospital's allow-list."""


def fab_hash(content: bytes) -> str:
    """Return the SHA-256 of an app package's bytes (what Flower calls the FAB hash)."""
    return hashlib.sha256(content).hexdigest()


def app_hash(app_dir: Path) -> str:
    """Return the FAB hash `flwr run APP_DIR` would submit (Flower builds FABs byte-reproducibly)."""
    from flwr.cli.build import build_fab_from_disk

    return fab_hash(build_fab_from_disk(Path(app_dir)))


def pinned_hashes(node_config) -> set[str]:
    """Return the allow-list in a node configuration (empty when none is set)."""
    return {h.strip().lower() for h in str(node_config.get(PINNED_KEY, "")).split(",") if h.strip()}


def _record(node_config, entry: dict) -> None:
    path = node_config.get(RECORD_KEY)
    if path:
        with open(str(path), "a") as handle:
            handle.write(json.dumps({"time": round(time.time(), 3), **entry}) + "\n")


def _purge(app_dir: Path) -> None:
    """Forget modules this process imported that the package also ships, so the package's own code is loaded.

    Flower imports a ClientApp with `importlib` after putting the package first on `sys.path`; a
    module already imported (this runner lives in `fl`, which the pilot's package ships too) would
    otherwise be reused instead of the reviewed package's copy.
    """
    shipped = {p.name if p.is_dir() else p.stem for p in Path(app_dir).iterdir()}
    for name in [n for n in sys.modules if n.split(".")[0] in shipped]:
        del sys.modules[name]


def clientapp(argv: list[str]) -> None:
    """Run Flower's `flwr-clientapp` for one task, refusing packages not pinned in the node configuration."""
    import importlib

    from flwr.common.serde import message_to_proto

    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    pull, install, push = runtime.pull_task_input, runtime.install_from_fab, runtime.push_message
    task: dict = {}

    def pull_and_remember(client):
        message, context, run, fab = pull(client)
        task.update(context=context, run=run, entry={
            "run_id": run.run_id, "message_type": message.metadata.message_type,
            "bytes_received": message_to_proto(message).ByteSize()})
        return message, context, run, fab

    def install_if_pinned(content, *args, **kwargs):
        config = task["context"].node_config
        digest = fab_hash(content)
        allowed = digest in pinned_hashes(config)
        task["entry"].update(fab_sha256=digest, pinned=allowed)
        if not allowed:
            _record(config, {**task["entry"], "outcome": NOT_PINNED})
            raise PackageNotPinned(f"{NOT_PINNED}: {NOT_PINNED_SENTENCE} (package sha256 {digest[:16]}...)")
        installed = install(content, *args, **kwargs)
        _purge(installed)
        return installed

    def push_and_record(client, message, context):
        entry = {**task.get("entry", {}), "bytes_sent": message_to_proto(message).ByteSize(),
                 "outcome": message.error.reason[:120] if message.has_error() else "replied"}
        try:
            return push(client, message, context)
        finally:
            if entry.get("pinned"):  # (a refused package was recorded when it was refused)
                _record(context.node_config, entry)

    runtime.pull_task_input, runtime.install_from_fab, runtime.push_message = (
        pull_and_remember, install_if_pinned, push_and_record)
    sys.argv = ["flwr-clientapp", *argv]
    cli.flwr_clientapp()


def superexec(argv: list[str]) -> None:
    """Run Flower's `flower-superexec`, starting this module's `clientapp` for every ClientApp task."""
    import importlib

    from flwr.supercore.constant import TaskType

    flower_superexec = importlib.import_module("flwr.supercore.cli.flower_superexec").flower_superexec
    subprocess_executor = importlib.import_module("flwr.supercore.superexec.executor.subprocess_executor")

    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")) / "fedhf-runner"
    home.mkdir(parents=True, exist_ok=True)
    launcher = home / "clientapp"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fl.flower.runner clientapp "$@"\n')
    launcher.chmod(stat.S_IRWXU)
    subprocess_executor.TASK_TYPE_TO_COMMAND = {**subprocess_executor.TASK_TYPE_TO_COMMAND,
                                                TaskType.CLIENT_APP: str(launcher)}
    sys.argv = ["flower-superexec", *argv]
    flower_superexec()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("superexec", "clientapp", "hash"):
        print("usage: python -m fl.flower.runner {superexec|clientapp} [Flower's options] | hash APP_DIR",
              file=sys.stderr)
        sys.exit(2)
    if argv[0] == "hash":  # what a hospital pins after reviewing a release
        print(app_hash(Path(argv[1] if len(argv) > 1 else ".")))
        return
    (superexec if argv[0] == "superexec" else clientapp)(argv[1:])


if __name__ == "__main__":
    main()
