"""Where per-unit work runs: in this process (`local`, the default) or as Ray tasks (`ray`).

A stage splits its work into units that do not depend on each other (a neuron's language-model
calls, a batch of captions, a concept's images, a chunk of probe images) and hands them to
`executor.map(fn, units)`, which returns the results in the order of `units`. Both executors
run the same `fn` on the same units, so a stage's output does not depend on where it ran: the
stage assembles the results itself, in order, and publishes one artifact as before. Units write
into the shared content-addressed store and JSONL caches (both safe across processes), so a
rerun after a failure finds every finished unit's work cached.

`executor.name` in the config chooses one (it is never part of a cache key); `--executor ray`
on the command line sets it. Ray starts (`ray.init`) once per process: a local instance with
`executor.num_cpus` CPUs when `executor.address` is null (or the `RAY_ADDRESS` the runner
exported), or joins a running cluster at `auto` / `host:port` / `ray://host:10001`.

Example:
    >>> ex = load_executor("local")
    >>> ex.map(abs, [-2, 3], desc="abs", progress=False)
    [2, 3]
    >>> ex = executor_from_config(load_config("offline", ["executor.name=ray"]))  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from .registry import Registry
from .errors import NdUtilsError

_MODELS: dict = {}   # per process: models loaded by units, so a worker loads each one once


class ExecutorError(NdUtilsError, RuntimeError):
    """A unit failed on a worker (or a worker died); finished units stay cached for a rerun."""


def worker_model(kind: str, cfg, load: Callable[[], Any]) -> Any:
    """The model `kind` for `cfg`, loaded once per process (Ray reuses its worker processes).

    Keyed by `kind` and the config's fingerprint, so two configs never share a model.
    """
    key = (kind, cfg.fingerprint())
    if key not in _MODELS:
        _MODELS[key] = load()
    return _MODELS[key]


@contextlib.contextmanager
def cpu_threads(threads: "int | None"):
    """Run the body with `threads` intra-op CPU threads (None: leave torch's setting)."""
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(old)


class LocalExecutor:
    """Runs every unit here, in order (no Ray needed); `local_kwargs` reach `fn` as they are.

    `threads`: intra-op CPU threads of this process (None: torch's default, all cores); set
    for the whole process, because the work around the units (a stage's set-up: the pool
    features of `retrieve`, say) runs here too and must run as it would on a worker.
    """

    name = "local"
    workers = 1

    def __init__(self, threads: "int | None" = None):
        self.threads = threads
        if threads:
            import torch

            torch.set_num_threads(int(threads))

    def map(self, fn: Callable, units: Sequence, *, desc: str = "units", progress: bool = True,
            local_kwargs: "dict | None" = None, gpus: float = 0) -> list:
        kwargs = dict(local_kwargs or {})
        return [fn(u, **kwargs) for u in tqdm(units, desc=desc, disable=not progress)]

    def describe(self) -> dict:
        return {"name": self.name, "workers": self.workers, "threads": self.threads}


def require_ray_token() -> bool:
    """Before this process starts a local Ray instance: token authentication for it.

    The locked Ray's GCS, raylet and worker gRPC servers listen on every interface of the
    machine (no setting confines them to loopback), so without authentication anyone who can
    reach the machine could submit code that runs as the user. Unless the user chose a mode
    (`RAY_AUTH_MODE`), this sets `RAY_AUTH_MODE=token` and a fresh random `RAY_AUTH_TOKEN`
    (256 bits) in this process's environment, which the stages' kernels and Ray's workers
    inherit and nobody else has. Returns whether it set them.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return False
    import secrets

    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    return True


def _reload_ray_auth_config() -> None:
    """Make an already imported Ray read `RAY_AUTH_MODE`/`RAY_AUTH_TOKEN` again (it reads its
    configuration once; these are Ray's own internals, so a Ray without them is left as is)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):
        pass


def warn_if_unauthenticated(address: str) -> "str | None":
    """Warn (and return the message) when joining a Ray cluster at a non-loopback `address`
    without token authentication (`RAY_AUTH_MODE=token`); None otherwise."""
    import ipaddress
    import warnings

    if os.environ.get("RAY_AUTH_MODE") == "token":
        return None
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", ""):
        return None
    if host != "auto":
        try:
            if ipaddress.ip_address(host).is_loopback:
                return None
        except ValueError:  # a host name: not known to be this machine
            pass
    message = (f"joining Ray at {address} without token authentication: anyone who can reach "
               f"the cluster's ports can run code there as its user. Start the cluster with "
               f"RAY_AUTH_MODE=token and a token (ray get-auth-token --generate), and export "
               f"the same RAY_AUTH_MODE and token here (README, 'Beyond one machine: Ray')")
    warnings.warn(message, stacklevel=3)
    return message


class RayExecutor:
    """Runs each unit as a Ray task (`threads` CPUs and `gpus_per_task` GPUs each) in order.

    `fn` must be a module-level function: on a worker it loads its models by config
    (`worker_model`), never receiving the driver's. Failed tasks are retried `max_retries`
    times (a killed worker's task too); a unit that still fails raises ExecutorError.
    """

    name = "ray"

    def __init__(self, address: "str | None" = None, num_cpus: "int | None" = None,
                 gpus_per_task: "float | str" = "auto", max_retries: int = 2,
                 runtime_env: "dict | None" = None, threads: "int | None" = None):
        address = address or os.environ.get("RAY_ADDRESS") or None
        started = sys.modules.get("ray")
        # the token goes into the environment before Ray reads its configuration
        fresh = not address and not (started is not None and started.is_initialized())
        token_set = require_ray_token() if fresh else False
        try:
            import ray
        except ImportError as exc:
            raise ExecutorError(
                "executor.name is ray but Ray is not installed: pip install 'ray>=2.9' (or "
                "pip install -e '.[cluster]'), or run in-process with executor.name=local") from exc
        self._ray = ray
        if token_set and started is not None:  # Ray was imported (its config read) before
            _reload_ray_auth_config()
        if not ray.is_initialized():
            if address:
                warn_if_unauthenticated(address)
            try:
                ray.init(address=address, num_cpus=None if address else num_cpus,
                         runtime_env=runtime_env, include_dashboard=False,
                         log_to_driver=False, logging_level="ERROR", configure_logging=True)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ExecutorError(
                    f"could not start or join Ray at address {address or '(new local instance)'}"
                    f": {exc}. Start a cluster first (ray start --head) and pass its address, "
                    f"e.g. --address auto or --address HOST:6379") from exc
        self.address, self._remote = address, None
        self.threads = int(threads or 1)  # CPUs a task reserves, and its torch threads
        if threads:  # the driver's own work (a stage's set-up) runs as the tasks do
            import torch

            torch.set_num_threads(int(threads))
        self.max_retries = int(max_retries)
        gpus = ray.cluster_resources().get("GPU", 0)
        self.gpus_per_task = (1.0 if gpus else 0.0) if gpus_per_task == "auto" \
            else float(gpus_per_task)

    @property
    def workers(self) -> int:
        """Tasks that can run at once: the cluster's GPUs when tasks take one, else its CPUs."""
        res = self._ray.cluster_resources()
        if self.gpus_per_task:
            return max(1, int(res.get("GPU", 0) / self.gpus_per_task))
        return max(1, int(res.get("CPU", 1) / self.threads))

    def describe(self) -> dict:
        res = self._ray.cluster_resources()
        return {"name": self.name, "address": self.address, "workers": self.workers,
                "cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0),
                "gpus_per_task": self.gpus_per_task, "threads": self.threads}

    def map(self, fn: Callable, units: Sequence, *, desc: str = "units", progress: bool = True,
            local_kwargs: "dict | None" = None, gpus: "float | None" = None) -> list:
        """`[fn(u) for u in units]` as Ray tasks; a bar counts finished tasks of every worker.

        `gpus`: GPUs per task (default: `gpus_per_task`; 0 for CPU-only work). GPU tasks keep
        their worker process (`max_calls=0`), so its loaded models serve the next unit.
        """
        ray = self._ray
        units = list(units)
        if not units:
            return []
        gpus = self.gpus_per_task if gpus is None else float(gpus)
        if self._remote is None:  # max_calls=0: a GPU task's worker is kept, with its models
            self._remote = ray.remote(max_calls=0)(_run_unit)
        remote = self._remote.options(num_cpus=self.threads, num_gpus=gpus, name=desc,
                                      max_retries=self.max_retries, retry_exceptions=False)
        t0 = time.time()
        refs = [remote.remote(fn, u, self.threads) for u in units]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list = [None] * len(units)
        pids: set = set()
        pending = list(refs)
        with tqdm(total=len(units), desc=f"{desc} [ray, {self.workers} workers]",
                  disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ref = done[0]
                try:
                    pid, value = ray.get(ref)
                except Exception as exc:  # a unit's error, or its worker died too often
                    for other in pending:
                        ray.cancel(other)
                    unit = units[index[ref]]
                    raise ExecutorError(
                        f"{desc}: unit {_short(unit)} failed on Ray: {_cause(exc)}. The units "
                        f"that finished are cached: rerun the same command to resume") from None
                results[index[ref]] = value
                pids.add(pid)
                bar.update(1)
        if progress:
            print(f"{desc}: {len(units)} units on {len(pids)} Ray worker process(es) in "
                  f"{time.time() - t0:.1f} s", flush=True)
        return results


def _run_unit(fn: Callable, unit: Any, threads: int) -> tuple[int, Any]:
    """A task's body: the unit's result, with the worker's pid (progress shows the spread)."""
    with cpu_threads(threads):
        return os.getpid(), fn(unit)


def _short(unit: Any) -> str:
    text = repr(unit)
    return text if len(text) <= 80 else text[:77] + "..."


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else cause}"


EXECUTORS = Registry("executor", "use local or ray")
EXECUTORS.register("local", LocalExecutor)
EXECUTORS.register("ray", RayExecutor)


def list_executors() -> list[str]:
    """Names accepted by `executor.name` / `--executor`."""
    return EXECUTORS.names()


def load_executor(name: str = "local", **options):
    """An executor by name (`local`, `ray`), with its options (`address`, `num_cpus`, ...)."""
    return EXECUTORS.load(name, **options)


@functools.lru_cache(maxsize=None)
def _cached_executor(name: str, options: tuple):
    return load_executor(name, **dict(options))


def executor_from_config(cfg) -> "LocalExecutor | RayExecutor":
    """The executor `executor.*` names (one per process and settings; `local` when absent)."""
    name = cfg.get("executor.name") or "local"
    threads = cfg.get("executor.threads")
    if name == "local":
        return _cached_executor("local", (("threads", threads),))
    options = {"threads": threads,
               "address": cfg.get("executor.address"), "num_cpus": cfg.get("executor.num_cpus"),
               "gpus_per_task": cfg.get("executor.gpus_per_task", "auto"),
               "max_retries": cfg.get("executor.max_retries", 2)}
    return _cached_executor(name, tuple(sorted(options.items())))
