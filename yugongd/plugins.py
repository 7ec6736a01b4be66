"""Building the plugin manager of one gateway.

The defaults (:data:`yugongd.builtin.DEFAULT_PLUGINS`) are registered first, exactly as
a third-party plugin would be, each under a name that ``plugins.disable`` accepts; then
the ``yugongd`` entry-point group; then every ``*.py`` of the ``plugins.dirs`` folders
(registered under the file's stem). Disabled names are blocked before registration.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pluggy
from twisted.logger import Logger

from yugongd import hookspecs
from yugongd._markers import PROJECT

if TYPE_CHECKING:
    from yugongd.config import Config
    from yugongd.gateway import Gateway

log = Logger()


class PluginLoadError(Exception):
    """A plugin file could not be loaded: names the file and the problem."""


def load_plugin_file(path: Path) -> object:
    """Import one drop-in plugin file as a module of its own."""
    module_name = f"yugongd_dropin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginLoadError(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(module_name, None)
        raise PluginLoadError(f"{path}: {type(e).__name__}: {e}") from e
    return module


def make_plugin_manager(config: Config, gateway: Gateway) -> pluggy.PluginManager:
    """The plugin manager of ``gateway``: defaults, entry points, drop-in folders."""
    from yugongd.builtin import DEFAULT_PLUGINS

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in config.plugins.disable:
        pm.set_blocked(name)
    if config.state.startswith("redis://") and not pm.is_blocked("cluster"):
        from yugongd.builtin.cluster import ClusterPlugin
        from yugongd.redisstate import RedisState

        if isinstance(gateway.state, RedisState):
            # registered first: its trylast hooks run after the defaults' (pluggy is LIFO)
            pm.register(ClusterPlugin(gateway, gateway.state), name="cluster")
    for name, factory in DEFAULT_PLUGINS:
        if not pm.is_blocked(name):
            pm.register(factory(gateway), name=name)
    pm.load_setuptools_entrypoints(PROJECT)
    for folder in config.plugins.dirs:
        directory = Path(folder)
        if not directory.is_dir():
            raise PluginLoadError(f"plugins.dirs: {folder}: not a directory")
        for path in sorted(directory.glob("*.py")):
            if path.name.startswith("_") or pm.is_blocked(path.stem):
                continue
            pm.register(load_plugin_file(path), name=path.stem)
    pm.check_pending()
    names = [name for name, plugin in pm.list_name_plugin() if plugin is not None]
    log.info("plugins: {names}", names=", ".join(str(n) for n in names))
    return pm


def notify(hook: pluggy.HookCaller, **kwargs: object) -> None:
    """Call every implementation of a plain (not ``firstresult``) hook, in pluggy's order.

    Unlike ``pm.hook.name(...)``, one implementation that raises does not stop the
    others: the error is logged and the next one runs. The hooks that settle a request
    (usage, request finished) go through here, so that a faulty third-party plugin cannot
    keep the ledger row from being written or a credit reservation from being released.
    """
    impls = hook.get_hookimpls()
    if any(impl.hookwrapper or impl.wrapper for impl in impls):
        try:
            hook(**kwargs)
        except Exception:
            log.failure("hook {hook} raised", hook=hook.name)
        return
    for impl in reversed(impls):
        try:
            impl.function(*[kwargs[name] for name in impl.argnames])
        except Exception:
            log.failure(
                "plugin {plugin} raised in {hook}; the other plugins still ran",
                plugin=impl.plugin_name,
                hook=hook.name,
            )
