"""The one venv story: what the code tells a user to run exists in the Makefile (BUILD.md documents the same)."""

import re

import pytest

from conftest import ROOT
from neox_jax import targets


def makefile_targets() -> set[str]:
    """Target names of the Makefile, pattern rules expanded for the venvs they build (.venv-%/...)."""
    text = (ROOT / "Makefile").read_text()
    return {name for line in re.findall(r"^([^\s#=:][^=:]*):(?!=)", text, re.M) for name in line.split()}


@pytest.mark.parametrize("platform, venv", [("tpu", "tpu"), ("gpu", "cuda")])
def test_missing_plugin_hint_names_a_make_target(platform, venv):
    hint = targets.plugin_hint(platform)
    (command,) = re.findall(r"`make ([\w-]+)`", hint)
    assert command in makefile_targets() and command == f"venv-{venv}"
    assert f".venv-{venv}/bin/python" in hint and "pip install" not in hint
    # the target builds the venv the hint names, with the setup.cfg extra of that name
    assert re.search(rf"^{command}: \.venv-{venv}/\.installed$", (ROOT / "Makefile").read_text(), re.M)
    assert f"\n{venv} =" in (ROOT / "setup.cfg").read_text()
