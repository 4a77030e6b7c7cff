"""Notebook kernels started one stage ahead, so each stage finds `nd_utils` already imported.

A fresh kernel spends 7-8 s of one core importing `nd_utils` (torch, torchvision through
torch._dynamo, matplotlib, pandas) before its first real cell; nine stages pay it nine times. The
runner starts stage N+1's kernel when stage N starts and has it import nd_utils's modules, so that
overlaps stage N's work (stage 04's language model leaves a core idle for a minute and a half).
The warm-up runs with `silent=True, store_history=False`: it shows in no notebook and leaves the
execution counts as a fresh kernel would. Nothing else is run ahead: parameters, seeds and every
stage call still execute in the notebook itself, so outputs are those of a cold kernel.

These kernels talk over IPC (Unix sockets in a private temporary folder) rather than TCP on
localhost: no port is opened, and ipykernel's warning about unencrypted TCP does not apply.

Example:
    >>> warm = start_warm_kernel("python3", cwd="notebooks")             # doctest: +SKIP
    >>> if warm is not None and warm.ready():                           # doctest: +SKIP
    ...     papermill.execute_notebook(src, out, **warm.papermill_kwargs())
    >>> warm.close()                                                    # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

# `import nd_utils` is lazy, so the warm-up imports the submodules behind the public names
WARM_UP_CODE = ("import nd_utils.kernels as _ndk\n_ndk.import_public_modules()\ndel _ndk")


# what nbclient passes to an ipykernel it starts itself: no history database on disk
KERNEL_ARGUMENTS = ["--HistoryManager.hist_file=:memory:"]


def import_public_modules() -> None:
    """Import the submodule of every public name of `nd_utils` and `nd_utils.viz` (torch,
    pandas, matplotlib, ...)."""
    import importlib

    import nd_utils
    import nd_utils.viz

    modules = set(nd_utils._PUBLIC.values()) | {f"viz.{m}" for m in nd_utils.viz._EXPORTS.values()}
    for module in sorted(modules):
        importlib.import_module(f"nd_utils.{module}")


def notebook_kernel_name(path: "str | Path", name: "str | None" = None) -> str:
    """The kernel a notebook asks for (`metadata.kernelspec.name`), as papermill resolves it."""
    if name:
        return name
    spec = json.loads(Path(path).read_text()).get("metadata", {}).get("kernelspec", {})
    return spec.get("name") or "python3"


class WarmKernel:
    """A started kernel that was sent `code` and is handed to papermill as its kernel manager.

    papermill (nbclient) does not shut down a kernel it did not start: `close()` does, and must
    be called once the notebook ran (or was skipped).
    """

    def __init__(self, kernel_name: str, cwd: "str | Path", code: "str | None" = None):
        from jupyter_client.blocking import BlockingKernelClient
        from jupyter_client.manager import AsyncKernelManager
        from jupyter_core.utils import run_sync

        self.kernel_name = kernel_name
        # short path: a Unix socket path must stay under ~100 characters
        self._sockets = Path(tempfile.mkdtemp(prefix="ndk-", dir="/tmp" if os.path.isdir(
            "/tmp") else None))
        self.km = AsyncKernelManager(kernel_name=kernel_name, transport="ipc",
                                     ip=str(self._sockets / "k"))
        try:
            run_sync(self.km.start_kernel)(cwd=str(cwd), extra_arguments=list(KERNEL_ARGUMENTS))
        except BaseException:
            shutil.rmtree(self._sockets, ignore_errors=True)
            raise
        # A client of our own: the request waits in zmq's queue until the kernel is up, and the
        # kernel then serves the notebook's requests after it, in order.
        self._client = BlockingKernelClient()
        self._client.load_connection_info(self.km.get_connection_info())
        self._client.start_channels()
        self._msg_id = self._client.execute(code or WARM_UP_CODE, silent=True,
                                            store_history=False)

    def ready(self, timeout: float = 120.0) -> bool:
        """Wait until the warm-up code has run; True when it ran without error.

        Waiting for its reply also fixes the order: the notebook's requests come after it.
        """
        import queue

        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                reply = self._client.get_shell_msg(timeout=left)
            except queue.Empty:
                break
            if reply.get("parent_header", {}).get("msg_id") == self._msg_id:
                return reply["content"].get("status") == "ok"
        return False

    def papermill_kwargs(self) -> dict:
        """Arguments for `papermill.execute_notebook` that make it use this kernel."""
        return {"km": self.km, "kernel_name": self.kernel_name}

    def close(self, now: bool = False) -> None:
        """Stop our client and shut the kernel down (`now`: without waiting for it)."""
        from jupyter_core.utils import run_sync

        try:
            self._client.stop_channels()
            if run_sync(self.km.is_alive)():
                run_sync(self.km.shutdown_kernel)(now=now)
        finally:
            shutil.rmtree(self._sockets, ignore_errors=True)


def start_warm_kernel(kernel_name: str, cwd: "str | Path", log=None,
                      code: "str | None" = None) -> "WarmKernel | None":
    """A `WarmKernel`, or None (and a log line) when it cannot start: the stage then starts its
    own kernel as papermill always did, so a warm-up problem never fails a run."""
    try:
        return WarmKernel(kernel_name, cwd, code)
    except Exception as exc:  # noqa: BLE001 - any start-up failure falls back to a cold kernel
        if log is not None:
            log(f"note: could not start the next stage's kernel ahead ({type(exc).__name__}: "
                f"{exc}); it will start when its stage does", flush=True)
        return None
