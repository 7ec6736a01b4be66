"""Plugin loading: defaults by name, plugins.disable, drop-in folders, entry points."""

from __future__ import annotations

import sys
from pathlib import Path

import pluggy
import pytest
from twisted.internet.task import Clock

from yugongd.config import Config, PluginsConfig
from yugongd.gateway import Gateway
from yugongd.plugins import PluginLoadError
from yugongd.state import MemoryState

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {"accounts", "pool", "failover", "accounting"}


def names(gw: Gateway) -> set[str]:
    return {name for name, plugin in gw.pm.list_name_plugin() if plugin is not None}


def gateway(**plugins) -> Gateway:
    return Gateway(
        Config(source="<test>", plugins=PluginsConfig(**plugins)), Clock(), MemoryState()
    )


def test_defaults_are_registered_by_name():
    assert DEFAULTS <= names(gateway())


def test_disable_blocks_a_default_plugin():
    gw = gateway(disable=("pool",))
    assert "pool" not in names(gw)
    assert gw.pm.is_blocked("pool")


def test_drop_in_folder_plugins_are_loaded_under_their_file_name():
    gw = gateway(dirs=(str(ROOT / "plugins"),))
    assert "max_tokens_cap" in names(gw)


def test_a_broken_drop_in_names_the_file(tmp_path):
    (tmp_path / "broken.py").write_text("import nonexistent_module_xyz\n")
    with pytest.raises(PluginLoadError) as e:
        gateway(dirs=(str(tmp_path),))
    assert "broken.py" in str(e.value) and "ModuleNotFoundError" in str(e.value)


def test_a_misspelt_hook_is_an_error(tmp_path):
    (tmp_path / "typo.py").write_text(
        "from yugongd import hookimpl\n\n@hookimpl\ndef yugongd_selectkey(call, candidates):\n    return None\n"
    )
    with pytest.raises(pluggy.PluginValidationError):
        gateway(dirs=(str(tmp_path),))


def test_entry_point_plugins_are_loaded(tmp_path, monkeypatch):
    """A package declaring the ``yugongd`` entry-point group is registered."""
    (tmp_path / "acme_yugongd.py").write_text(
        "from yugongd import hookimpl\n\n"
        "@hookimpl\n"
        "def yugongd_request_finished(call, outcome):\n"
        "    pass\n"
    )
    info = tmp_path / "acme_yugongd-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-yugongd\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[yugongd]\nacme = acme_yugongd\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "acme" in names(gateway())
        assert "acme" not in names(gateway(disable=("acme",)))
    finally:
        sys.modules.pop("acme_yugongd", None)


def test_twistd_lists_the_plugin():
    import subprocess

    from conftest import TWISTD

    out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "yugongd" in out
