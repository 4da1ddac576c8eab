"""Worker plugins: the ``plugin-add`` / ``plugin-remove`` ops with dask's WorkerPlugin
semantics, and ``upload_file``.

A plugin arrives pickled: from ``Client.register_plugin`` by way of the scheduler's
broadcast, or, for plugins registered before this worker joined, in the scheduler's
reply to its registration (``worker-plugins``), which the worker sets up before it
serves the scheduler stream, as dask's worker does. A plugin is a
``distributed.WorkerPlugin``, so adding one activates the dask-worker surface; its
``setup(worker)`` and ``teardown(worker)`` (sync or async) get the facade that
``distributed.get_worker()`` returns. ``transition(key, start, finish)`` is called
after every change of a task's state, with the state machine's names, which are
dask's; only plugins that override it are called, and with none the state machine
holds no hook at all. Plugins are torn down when removed and when the worker closes.

``upload_file`` (what ``Client.upload_file``'s ``UploadFile`` plugin calls) writes
into a directory of this worker's own, on ``sys.path`` from the first upload until
the worker closes, and imports what the file holds when asked to.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import pkgutil
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from clusterlaunch.comm.timeouts import wait_for
from clusterlaunch.protocol import Undecodable, pickling
from clusterlaunch.protocol.remote_errors import error_message

if TYPE_CHECKING:
    from dask.typing import Key

    from clusterlaunch.worker.tasks import State
    from clusterlaunch.worker.worker import Worker

logger = logging.getLogger("clusterlaunch.worker")

#: Seconds close gives each plugin's teardown.
TEARDOWN_TIMEOUT = 10.0
#: Where the base class's no-op hooks live: a plugin that inherits its ``transition``
#: from here does not watch transitions.
_BASE_PLUGIN_MODULE = "distributed.diagnostics.plugin"
#: Extensions of uploaded files whose modules are imported (dask's list).
_ARCHIVES = (".egg", ".zip", ".pyz")
#: The worker plugin every scheduler registers for P2P shuffles (its shuffle
#: extension's), as its pickle names it. P2P needs dask's own workers (its tasks fail
#: here saying so), so it is not set up: that would import distributed on every worker.
_P2P_PLUGIN = ("shuffle", b"distributed.shuffle._worker_plugin")


class WorkerPlugins:
    """The worker plugins of one worker, by name (``dask_worker.plugins``)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        #: name -> plugin; the worker's ``plugins`` is this dict.
        self.by_name: dict[str, Any] = {}
        self._transition_hooks: list[tuple[str, Callable[..., Any]]] = []
        self._upload_directory: str | None = None

    def __repr__(self) -> str:
        return f"<WorkerPlugins of {self.worker.address}: {sorted(self.by_name)}>"

    # ------------------------------------------------------------------- the ops

    async def add(
        self, plugin: Any, name: str | None = None, catch_errors: bool = True, **_: Any
    ) -> dict:
        """The ``plugin-add`` op: unpickle ``plugin``, replace any plugin of that name,
        and set it up; a failure is the error message the client raises."""
        address = self.worker.address
        if _is_p2p_plugin(plugin, name):
            logger.info("%s: P2P shuffles run on stock workers only: no shuffle plugin", address)
            return {"status": "OK"}
        try:
            facade = self.worker.dask_surface()
            plugin = _unpickled(plugin)
            if name is None:
                name = plugin_name(plugin)
        except Exception as e:
            logger.warning("%s: could not load a worker plugin: %r", address, e)
            if not catch_errors:
                raise
            return error_message(e)
        if name in self.by_name:
            await self.remove(name)
        self.by_name[name] = plugin
        self._watch_transitions()
        logger.info("%s: starting worker plugin %s", address, name)
        setup = getattr(plugin, "setup", None)
        if setup is not None:
            try:
                result = setup(worker=facade)
                if inspect.isawaitable(result):
                    await result
            except Exception as e:
                logger.exception("%s: worker plugin %s failed to set up", address, name)
                if not catch_errors:
                    raise
                return error_message(e)
        return {"status": "OK"}

    async def remove(self, name: str, **_: Any) -> dict:
        """The ``plugin-remove`` op: forget the plugin and tear it down."""
        logger.info("%s: removing worker plugin %s", self.worker.address, name)
        try:
            plugin = self.by_name.pop(name)
            self._watch_transitions()
            teardown = getattr(plugin, "teardown", None)
            if teardown is not None:
                result = teardown(worker=self.worker.dask_surface())
                if inspect.isawaitable(result):
                    await result
        except Exception as e:
            logger.exception("%s: worker plugin %s failed to tear down", self.worker.address, name)
            return error_message(e)
        return {"status": "OK"}

    async def add_registered(self, plugins: Mapping[str, Any]) -> None:
        """Set up the plugins the scheduler's registration reply carries; a failure is
        logged (the worker runs on), as with dask's worker."""
        for name, plugin in plugins.items():
            await self.add(plugin, name=name)

    async def close(self) -> None:
        """Tear every plugin down (each within a bound), then drop the uploads."""
        for name in list(self.by_name):
            try:
                await wait_for(self.remove(name), TEARDOWN_TIMEOUT)
            except asyncio.TimeoutError:
                logger.warning(
                    "%s: worker plugin %s took over %g s to tear down; closing on",
                    self.worker.address,
                    name,
                    TEARDOWN_TIMEOUT,
                )
        if self._upload_directory is not None:
            with contextlib.suppress(ValueError):
                sys.path.remove(self._upload_directory)
            shutil.rmtree(self._upload_directory, ignore_errors=True)
            self._upload_directory = None

    def upload_file(self, filename: str, data: str | bytes, load: bool = True, **_: Any) -> dict:
        """Write ``data`` as ``filename`` into this worker's upload directory and, with
        ``load``, import (or reload) the modules it holds: a ``.py`` file's module, or
        every top-level module of an ``.egg`` / ``.zip`` / ``.pyz``."""
        if os.path.basename(filename) != filename or filename in ("", ".", ".."):
            raise ValueError(f"upload_file takes a plain file name, not {filename!r}")
        if isinstance(data, str):
            data = data.encode()
        path = os.path.join(self.upload_directory(), filename)
        with open(path, "wb") as f:
            f.write(data)
        if load:
            import_file(path)
        return {"status": "OK", "nbytes": len(data)}

    def upload_directory(self) -> str:
        """This worker's directory of uploaded files, made (and put first on
        ``sys.path``) on first use."""
        if self._upload_directory is None:
            os.makedirs(self.worker.local_directory, exist_ok=True)
            directory = tempfile.mkdtemp(
                prefix="clusterlaunch-uploads-", dir=self.worker.local_directory
            )
            sys.path.insert(0, directory)
            self._upload_directory = directory
        return self._upload_directory

    # ------------------------------------------------------------- transitions

    def transition_hook(self) -> Callable[[Key, State, State], None] | None:
        """What the state machine calls on each transition: None without watchers."""
        return self._notify_transition if self._transition_hooks else None

    def _watch_transitions(self) -> None:
        self._transition_hooks = [
            (name, plugin.transition)
            for name, plugin in self.by_name.items()
            if _overrides_transition(plugin)
        ]
        self.worker.state.on_transition = self.transition_hook()

    def _notify_transition(self, key: Key, start: State, finish: State) -> None:
        for name, transition in self._transition_hooks:
            try:
                transition(key, start, finish)
            except Exception:
                logger.info("%s: worker plugin %s failed", self.worker.address, name, exc_info=True)


def plugin_name(plugin: Any) -> str:
    """The plugin's ``name``, or as dask names a plugin without one: its type's name
    and a random suffix."""
    name = getattr(plugin, "name", None)
    if name is not None:
        return str(name)
    return f"{type(plugin).__name__}-{uuid.uuid4()}"


def import_file(path: str) -> list:
    """Import, or reload, the modules the file at ``path`` holds (it is in a directory
    on ``sys.path``); returns them."""
    filename = os.path.basename(path)
    stem, extension = os.path.splitext(filename)
    if extension == ".py":
        # A module rewritten within the same second would otherwise load its stale .pyc.
        with contextlib.suppress(OSError):
            os.remove(importlib.util.cache_from_source(path))
        names = [stem]
    elif extension in _ARCHIVES:
        if path not in sys.path:
            sys.path.insert(0, path)
        names = [module.name for module in pkgutil.iter_modules([path])]
    else:
        names = []
    if not names:
        logger.warning("found nothing to import in the uploaded %s", filename)
        return []
    importlib.invalidate_caches()
    loaded = []
    for name in names:
        logger.info("loading module %s from the uploaded %s", name, filename)
        if name in sys.modules:
            loaded.append(importlib.reload(sys.modules[name]))
        else:
            loaded.append(importlib.import_module(name))
    return loaded


def _unpickled(plugin: Any) -> Any:
    if isinstance(plugin, Undecodable):
        raise plugin.error
    if isinstance(plugin, (bytes, bytearray, memoryview)):
        return pickling.loads(memoryview(plugin))
    return plugin


def _is_p2p_plugin(plugin: Any, name: str | None) -> bool:
    plugin_name, module = _P2P_PLUGIN
    return (
        name == plugin_name
        and isinstance(plugin, (bytes, bytearray, memoryview))
        and module in bytes(plugin)
    )


def _overrides_transition(plugin: Any) -> bool:
    for cls in type(plugin).__mro__:
        if "transition" in vars(cls):
            return cls.__module__ != _BASE_PLUGIN_MODULE
    return False
