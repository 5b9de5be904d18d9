"""Keep a hospital's ClientApp process inside its own data folder.

In a deployment each SuperNode is started with the path of its own site's
folder (node configuration `site-dir`) and its site's name (`site`). Two
guards follow from that, both in the ClientApp process:

- `check_site`: the folder must be the named site's (a node given another
  site's path by a wrong configuration refuses to run);
- `confine_to_site`: a Python audit hook refuses, for the rest of the
  process, to open or list anything in the other site folders next to its
  own. `fl.data` opens cohort files through Python's `open`, so the hook
  sees every read of site data.

On two real machines the other hospital's folder is simply not there; on
one machine (tests, `make federation`) the hook is what keeps the sites
apart. The in-process engines (`direct`, Ray) run both sites in one
process and do not confine.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

#: Audit events that read a path's content or list a folder (first argument: the path).
GUARDED_EVENTS = frozenset({"open", "os.listdir", "os.scandir", "glob.glob", "shutil.copyfile"})

_confined_to: Path | None = None


class SiteIsolationError(PermissionError):
    """A node tried to read data that is not its own site's."""


def check_site(site_dir: Path, expected_site: str) -> None:
    """Raise SiteIsolationError unless `site_dir` is the folder of `expected_site`."""
    if Path(site_dir).name != expected_site:
        raise SiteIsolationError(
            f"this node is configured as site {expected_site!r} but its site-dir {site_dir} holds site "
            f"{Path(site_dir).name!r}; fix the SuperNode's --node-config (site-dir must be the node's own folder)")


def confined_to() -> Path | None:
    """Return the site folder this process is confined to (None if unconfined)."""
    return _confined_to


def confine_to_site(site_dir: Path) -> None:
    """Refuse, for the rest of this process, any read of the sibling site folders of `site_dir`."""
    global _confined_to
    site = Path(os.path.realpath(site_dir))
    if _confined_to is not None:
        if _confined_to != site:
            raise SiteIsolationError(f"process already confined to {_confined_to}; refused to serve {site}")
        return
    own, root = str(site), str(site.parent)

    def refuse_other_sites(event: str, args: tuple) -> None:
        if event not in GUARDED_EVENTS or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.realpath(os.fsdecode(args[0]))
        if path.startswith(root + os.sep) and not (path == own or path.startswith(own + os.sep)):
            raise SiteIsolationError(f"this node serves site {site.name!r} and may read only {own}; refused {path}")

    sys.addaudithook(refuse_other_sites)
    _confined_to = site
