"""The nemocc.* settings (issue 25): every key of the packaged nemocc.yaml is in the README's
configuration table with its default, and a value set in Dask config is the one the code reads."""

import re
from pathlib import Path

import dask.config
import pytest
import yaml

from nemocc_dask.config import DEFAULTS, setting

README = Path(__file__).resolve().parents[1] / "README.md"


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_setting_is_in_the_readme_table_with_its_default():
    text = README.read_text()
    table = dict(re.findall(r"^\| `([a-z0-9.-]+)` \| `([^`]*)` \|", text, re.M))
    for key, value in _leaves(yaml.safe_load(DEFAULTS.read_text())["nemocc"]).items():
        assert key in table, f"nemocc.{key} is not in the README's configuration table"
        assert yaml.safe_load(table[key]) == value, (key, table[key], value)


def test_a_value_set_in_dask_config_is_read():
    assert setting("lock.stale-after-seconds") == 60
    with dask.config.set({"nemocc.lock.stale-after-seconds": 5}):
        assert setting("lock.stale-after-seconds") == 5
    with pytest.raises(KeyError):
        setting("no-such-setting")


def test_the_package_reads_its_settings_through_one_function():
    """Issue 25: ``nemocc.*`` keys are read in one module (``config.setting``), not by
    ``dask.config.get`` spread over the package."""
    import re
    from pathlib import Path

    import nemocc_dask

    root = Path(nemocc_dask.__file__).parent
    direct = [f"{p.relative_to(root)}:{n}" for p in root.rglob("*.py") if p.name != "config.py"
              for n, line in enumerate(p.read_text().splitlines(), 1)
              if re.search(r"""dask\.config\.get\(\s*f?["']nemocc""", line)]
    assert not direct, direct
