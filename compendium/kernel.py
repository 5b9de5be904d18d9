"""The Jupyter kernel manager the stage runner starts notebooks with."""
from __future__ import annotations

from jupyter_client.manager import KernelManager


class QuietKernelManager(KernelManager):
    """The notebook kernel, without its start-up log (the "running over TCP without encryption" warning).

    The kernel listens on loopback only and lives for one stage; warnings raised by the
    notebook's own code still reach the executed notebook.
    """

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        return [*super().format_kernel_cmd(extra_arguments), "--IPKernelApp.log_level=ERROR"]
