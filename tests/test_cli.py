"""The `lnfree` command (lnfree/cli.py): every subcommand runs a package module exactly as `python -m` does; and
`python -m lnfree.eval <dir>` (a bare path) answers with the form that works."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from lnfree import cli


def _all_commands():
    """[(the words naming it, Command)] for every runnable subcommand, groups expanded."""
    out = []
    for name, entry in cli.COMMANDS.items():
        if isinstance(entry, cli.Command):
            out.append(((name,), entry))
        else:
            out += [((name, sub), c) for sub, c in entry.items()]
    return out


ALL = _all_commands()


def test_the_console_script_is_the_cli():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lnfree": "lnfree.cli:main"}


def test_help_lists_every_command_and_every_group_lists_its_own(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n  {name} " in out for name in cli.COMMANDS)
    for group in [g for g, entry in cli.COMMANDS.items() if isinstance(entry, dict)]:  # analyze, bench, sweep
        assert cli.main([group, "-h"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: lnfree {group} <command>")
        assert all(f"\n  {sub} " in out for sub in cli.COMMANDS[group])


def test_no_command_or_an_unknown_one_exits_2_naming_the_commands(capsys):
    assert cli.main([]) == 2 and "no command given" in capsys.readouterr().err
    assert cli.main(["trian", "seed=1"]) == 2
    assert "unknown command 'trian'; the commands are train, eval" in capsys.readouterr().err
    assert cli.main(["bench", "gpx"]) == 2 and "the commands are cpu, gpu, profile" in capsys.readouterr().err


def test_every_command_is_a_module_that_runs_as_main():
    for words, c in ALL:
        spec = importlib.util.find_spec(c.module)
        assert spec is not None, words
        if spec.submodule_search_locations:  # a package runs its __main__.py
            assert importlib.util.find_spec(f"{c.module}.__main__") is not None, words
        else:
            assert 'if __name__ == "__main__":' in Path(spec.origin).read_text(), words


@pytest.mark.parametrize("words", [w for w, _ in ALL], ids=" ".join)
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # imported by an earlier test
def test_each_command_answers_help_with_its_own(words, capsys):
    before = list(sys.argv)
    with pytest.raises(SystemExit) as e:
        cli.main([*words, "--help"])
    assert e.value.code in (0, None) and sys.argv == before  # the command line is given back after the run
    out = capsys.readouterr().out
    assert "usage" in out.lower() or "powered by hydra" in out.lower(), out[:500]


def test_a_hydra_command_takes_the_rest_of_the_line_as_its_overrides(capsys):
    cli.main(["train", "--cfg", "job", "optim.lr=0.000123", "seed=7"])  # prints the composed config, runs nothing
    out = capsys.readouterr().out
    assert "lr: 0.000123" in out and "seed: 7" in out


@pytest.mark.slow
def test_lnfree_train_is_python_m_lnfree_train(tmp_path):
    line = ["--cfg", "job", "optim.lr=0.000123", "schedule=builtin"]
    via_cli = subprocess.run([sys.executable, "-m", "lnfree.cli", "train", *line], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300, check=True).stdout
    direct = subprocess.run([sys.executable, "-m", "lnfree.train", *line], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, check=True).stdout
    assert via_cli == direct and "lr: 0.000123" in direct


def test_eval_with_a_path_answers_with_the_form_that_works(tmp_path):
    from hydra import compose, initialize_config_dir

    from lnfree.analysis.compare import positional_hint

    hint = positional_hint(["outputs/my run"])
    assert "python -m lnfree.eval" in hint
    override = hint.split('python -m lnfree.eval "')[1].split('"')[0]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=[override])
    assert [m.path for m in cfg.models] == ["outputs/my run"]
    assert positional_hint(["--config-name", "eval_llama", "runs=x"]) is None
