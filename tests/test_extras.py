"""lnfree/extras.py: an entry point whose extra is missing stops with one line naming what to install. The extras
are read from an installed package's metadata: here from a fake distribution written into tmp_path."""

import pytest

from lnfree import cli, extras


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """`fakepkg`, installed (its metadata on sys.path), whose extras are laid out as lnfree's are: `train` includes
    `analysis`, and each names one installed distribution (packaging) and one that is not."""
    info = tmp_path / "fakepkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("\n".join([
        "Metadata-Version: 2.1", "Name: fakepkg", "Version: 0.1",
        "Requires-Dist: packaging",  # the core: never reported by an extra
        'Requires-Dist: not-installed-core-xyz; python_version >= "3"',  # the core's, under a marker of its own
        'Requires-Dist: packaging>=20; extra == "analysis"',
        'Requires-Dist: not-installed-analysis-xyz>=1; extra == "analysis"',
        'Requires-Dist: fakepkg[analysis]; extra == "train"',
        'Requires-Dist: not-installed-train-xyz; extra == "train"', ""]))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(extras, "PACKAGE", "fakepkg")


def test_an_extra_lists_its_own_requirements_and_those_of_the_extras_it_includes(fake_dist):
    assert [r.name for r in extras.requirements("analysis")] == ["packaging", "not-installed-analysis-xyz"]
    assert [r.name for r in extras.requirements("train")] == [
        "packaging", "not-installed-analysis-xyz", "not-installed-train-xyz"]
    assert extras.requirements("nosuchextra") == []


def test_missing_names_only_the_distributions_that_are_not_installed(fake_dist):
    assert extras.missing("analysis") == ["not-installed-analysis-xyz"]
    assert extras.missing("train") == ["not-installed-analysis-xyz", "not-installed-train-xyz"]


def test_require_stops_with_one_line_that_says_what_to_install(fake_dist, monkeypatch):
    with pytest.raises(SystemExit) as e:
        extras.require("train", "lnfree train")
    assert str(e.value) == ("lnfree train needs the train extra (missing: not-installed-analysis-xyz, "
                            "not-installed-train-xyz): pip install 'lnfree[train]'")
    monkeypatch.setattr(extras, "PACKAGE", "not-installed-package-xyz")
    assert extras.requirements("train") == []
    extras.require("train", "lnfree train")  # a source checkout, not installed: nothing to check against, runs on


def test_the_cli_checks_the_extra_of_a_group_or_of_the_command_itself(fake_dist):
    with pytest.raises(SystemExit, match=r"^lnfree analyze pretrained needs the train extra"):
        cli.main(["analyze", "pretrained", "--help"])  # the command's own entry wins over its group's
    with pytest.raises(SystemExit, match=r"^lnfree analyze dla needs the analysis extra"):
        cli.main(["analyze", "dla", "--help"])
    assert set(cli.NEEDS.values()) <= {"train", "analysis"}
    commands = {name for name in cli.COMMANDS} | {f"{g} {c}" for g, t in cli.COMMANDS.items() if isinstance(t, dict)
                                                  for c in t}
    assert set(cli.NEEDS) <= commands, set(cli.NEEDS) - commands  # every entry names a command or a group
