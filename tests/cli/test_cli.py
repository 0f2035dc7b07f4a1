import pytest
import typer.main
from typer.testing import CliRunner

from cosim_dask import __version__
from cosim_dask.cli.app import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == __version__


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "version" in result.stdout


#: Every command and its positionals, in order, by the metavar the help text refers to.
POSITIONALS = {
    "version": [], "transform": ["MODEL", "IN", "OUT"], "generate": ["STORE"],
    "ingest": ["STORE"], "info": ["STORE"], "train": ["STORE"], "evaluate": ["MODEL", "STORE"],
    "report": ["MODEL"],
}


def test_every_command_is_checked():
    assert set(typer.main.get_command(app).commands) == set(POSITIONALS)


@pytest.mark.parametrize("command", sorted(POSITIONALS))
def test_help_names_positionals_in_upper_case(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    names = POSITIONALS[command]
    assert f"Usage: cosim {command} [OPTIONS] {' '.join(names)}".strip() in result.stdout
    assert "{" not in result.stdout  # typer's own usage line writes {store}
    rows = [line.strip("│ *").split() for line in result.stdout.splitlines()]
    for name in names:  # the Arguments panel: "│ *    STORE      <str>  The pair store ..."
        assert [name] in [row[:1] for row in rows], result.stdout


@pytest.mark.parametrize("command", sorted(POSITIONALS))
def test_on_off_options_are_single_flags(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--no-" not in result.stdout


def test_negative_flag_forms_are_gone():
    for flag in ("--resume", "--overwrite", "--skip-invalid"):
        assert flag in runner.invoke(app, ["train", "--help"]).stdout
        result = runner.invoke(app, ["train", "s.zarr", "--out", "m.zarr",
                                     flag.replace("--", "--no-")])
        assert result.exit_code == 2
        assert result.stderr.startswith(f"error: No such option: {flag.replace('--', '--no-')}")
