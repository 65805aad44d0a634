"""Where the independent pieces of a long stage run: in this process, or as tasks on Ray.

An executor has one method, `map(fn, items, on_result)`: it calls `fn(*item)` for every item
and hands each result to `on_result(index, result)` in this process as soon as it is ready.
`chunked` (`core.chunks`) gives it the chunks not yet on disk and saves each one in
`on_result`, so whatever finished is on disk before anything else happens: a killed worker
loses only its unfinished chunk, and a rerun resumes from the files.

    serial   every item here, in order (the default)
    ray      one Ray task per item: a local Ray started here, or a cluster by its address

Chosen by name (`EXECUTORS`) and made current for a whole command with `using_executor`. The
long stages sit five or six calls below the command line (CLI → pipeline → stage → detector
→ engine → `chunked`); where they run changes no result, so it travels as this one context
instead of an argument added to every signature on the way. Only chunk runs with a folder (the
resumable long stages) use it; a `chunked` call without a folder is an inner loop of
something else and stays in-process.

Ray moves `fn` and the results between processes with its own (cloud)pickle, in memory only:
nothing pickled touches the disk. On a cluster every node needs `fmdefense[ray]` installed;
results come back through Ray, so no shared filesystem is needed.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from fmdefense.core.config import check_int
from fmdefense.core.errors import FMDefenseError, InputError
from fmdefense.core.progress import progress

log = logging.getLogger(__name__)
RAY_INSTALL = "pip install 'fmdefense[ray]'"
OnResult = Callable[[int, Any], None]


class ExecutorError(FMDefenseError):
    """Tasks were lost (a worker or node died); the finished ones are saved."""


class Executor(ABC):
    """Runs `fn(*item)` for each item; results go to `on_result` in the calling process."""

    name: str

    @abstractmethod
    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[tuple[Any, ...]],
        on_result: OnResult,
        *,
        desc: str = "tasks",
        unit: str = "task",
    ) -> None:
        """Call `on_result(i, fn(*items[i]))` for every i, each as soon as its result is ready;
        `desc` and `unit` name the stage and its items in the progress lines."""

    def close(self) -> None:
        """Release what this executor started (nothing by default)."""
        return None


class SerialExecutor(Executor):
    """Every item in this process, in order; an error stops the run at once."""

    name = "serial"

    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[tuple[Any, ...]],
        on_result: OnResult,
        *,
        desc: str = "tasks",
        unit: str = "task",
    ) -> None:
        for i in progress(range(len(items)), desc=desc, unit=unit):
            on_result(i, fn(*items[i]))


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """The body of every Ray task (module level, so workers import it by name)."""
    return fn(*args)


class RayExecutor(Executor):
    """One Ray task per item, on a local Ray (started here) or the cluster at `address`.

    `address`: None starts a local Ray on this machine (`num_cpus` workers, default all
    cores); "auto" joins a Ray started with `ray start --head` on this machine; "HOST:PORT"
    the cluster whose head is there. When Ray is already initialised it is used as is.
    A task whose worker dies is retried `max_retries` times; tasks still lost then raise an
    ExecutorError after every other task has finished and been handed over.
    """

    name = "ray"

    def __init__(
        self, address: str | None = None, *, num_cpus: int | None = None, max_retries: int = 2
    ) -> None:
        try:
            import ray
        except ImportError:
            raise InputError(
                f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}"
            ) from None
        if num_cpus is not None:
            check_int("num_cpus", num_cpus, low=1)
        check_int("max_retries", max_retries, low=0)
        self.ray, self.address, self.num_cpus = ray, address, num_cpus
        self.max_retries = max_retries
        self._started = False

    def _start(self) -> None:
        """Join or start Ray once (Ray already running in this process is used as is)."""
        if self.ray.is_initialized():
            return
        if self.address is None:
            # "local": a new Ray here, even when a `ray start` cluster (or a stale record of
            # one) exists on this machine; joining that is --ray-address auto. Its processes
            # talk over loopback only (no traffic on the machine's network address).
            self.ray.init(
                address="local",
                num_cpus=self.num_cpus,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
            )
        else:
            try:
                self.ray.init(address=self.address)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ExecutorError(
                    f"could not join the Ray cluster at {self.address!r} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0]}); check the address that "
                    "`ray start --head` printed, and for a cluster with token authentication "
                    "(Ray's default) set RAY_AUTH_MODE=token with its token in ~/.ray/auth_token "
                    "or RAY_AUTH_TOKEN"
                ) from exc
        self._started = True
        log.info("Ray: %s", self.ray.cluster_resources())

    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[tuple[Any, ...]],
        on_result: OnResult,
        *,
        desc: str = "tasks",
        unit: str = "task",
    ) -> None:
        if not items:
            return
        self._start()
        ray = self.ray
        task = ray.remote(num_cpus=1, max_retries=self.max_retries)(_call)
        fn_ref = ray.put(fn)  # shipped once, not once per task
        index = {task.remote(fn_ref, *item): i for i, item in enumerate(items)}
        pending, lost = list(index), []
        for _ in progress(range(len(items)), desc=f"{desc} (ray)", unit=unit):
            (ref,), pending = ray.wait(pending, num_returns=1)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # fn raised: the same error as serial
                self._drain(pending)
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                raise cause from None
            except ray.exceptions.RayError as exc:  # the worker or its node died
                log.warning("%s: task %d lost: %s", desc, index[ref], type(exc).__name__)
                lost.append(index[ref])
                continue
            on_result(index[ref], value)
        if lost:
            raise ExecutorError(
                f"{desc}: {len(lost)} of {len(items)} tasks were lost (workers died, items "
                f"{sorted(lost)}); every finished one is saved, so run the same command again "
                "to do the rest"
            )

    def _drain(self, pending: list[Any]) -> None:
        """Cancel what is still queued after a task raised."""
        for ref in pending:
            self.ray.cancel(ref)

    def close(self) -> None:
        """Shut down the Ray this executor started (a Ray started by someone else stays)."""
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = False


def _serial(address: str | None) -> Executor:
    if address is not None:
        raise InputError(f"a Ray address ({address!r}) needs the ray executor (--executor ray)")
    return SerialExecutor()


EXECUTORS: dict[str, Callable[[str | None], Executor]] = {  # name -> factory(address)
    "serial": _serial,
    "ray": RayExecutor,
}
_current: Executor = SerialExecutor()


def make_executor(name: str, *, address: str | None = None) -> Executor:
    """The executor registered as `name`; `address` is a Ray cluster's (ray only)."""
    if name not in EXECUTORS:
        raise InputError(f"executor must be one of {', '.join(EXECUTORS)}; got {name!r}")
    return EXECUTORS[name](address)


def current_executor() -> Executor:
    """The executor of the running command (serial unless `using_executor` set another)."""
    return _current


@contextmanager
def using_executor(executor: Executor) -> Iterator[Executor]:
    """Make `executor` current for the block, then restore the previous one and close it."""
    global _current
    previous, _current = _current, executor
    try:
        yield executor
    finally:
        _current = previous
        executor.close()
