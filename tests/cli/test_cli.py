import ast
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import typer.main
from helpers import cosim_main, one_line_error
from typer.testing import CliRunner

import cosim_dask
from cosim_dask import __version__
from cosim_dask.cli import app
from cosim_dask.cli.output import COMMANDS, FLAGS, SETTING_FLAGS, cli_text, flag
from cosim_dask.data.ingest import generate_store
from cosim_dask.errors import ANY, CosimError, Message
from cosim_dask.fit.loop import TrainConfig
from cosim_dask.fit.train import RunOptions, check_request

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
    # Typer writes a required positional in braces, by its metavar: {STORE}.
    usage = " ".join(f"{{{name}}}" for name in names)
    assert f"Usage: cosim {command} [OPTIONS] {usage}".strip() in result.stdout
    rows = [line.strip("│ *").split() for line in result.stdout.splitlines()]
    for name in names:  # the Arguments panel: "│ *    STORE      <str>  The pair store ..."
        assert [name] in [row[:1] for row in rows], result.stdout


@pytest.mark.parametrize("command", sorted(POSITIONALS))
def test_on_off_options_are_single_flags(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--no-" not in result.stdout


def test_train_help_offers_linger():
    result = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert "--linger" in result.stdout and "SECONDS" in result.stdout


def test_negative_flag_forms_are_gone():
    for option in ("--resume", "--overwrite", "--skip-invalid"):
        assert option in runner.invoke(app, ["train", "--help"]).stdout
        result = cosim_main("train", "s.zarr", "--out", "m.zarr", option.replace("--", "--no-"))
        assert result.exit_code == 2
        assert result.stderr.startswith(f"error: No such option: {option.replace('--', '--no-')}")


# --- only the CLI knows flag names ------------------------------------------------------

LIBRARY = Path(cosim_dask.__file__).parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")


def _messages(path: Path):
    """Every string constant of ``path`` that is not a docstring, with its line."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            yield node.lineno, node.value


def test_library_messages_name_parameters_not_flags():
    leaks = [f"{path.relative_to(LIBRARY)}:{line}: {text!r}"
             for path in sorted(LIBRARY.rglob("*.py"))
             # console.py is the CLI's entry point: it reads the command line before the
             # CLI's imports (to start the workers' fork server)
             if path.parent.name != "cli" and path.name != "console.py"
             for line, text in _messages(path) if FLAG.search(text)]
    assert not leaks, "\n".join(leaks)


def test_every_parameter_a_message_names_has_a_flag():
    named = set()
    for path in LIBRARY.rglob("*.py"):
        if path.name == "errors.py":  # defines Message, names no parameter
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            dicts = [k.value for k in node.keywords if k.arg == "params"]
            if getattr(node.func, "id", None) == "Message" and len(node.args) > 1:
                dicts.append(node.args[1])
            for d in dicts:
                assert isinstance(d, ast.Dict), ast.unparse(node)
                for k, v in zip(d.keys, d.values, strict=True):
                    if k is None:  # {**others, ...}: the others are named where they are made
                        continue
                    if isinstance(k, ast.Constant):
                        named.add((k.value, getattr(v, "value", None)))
                    else:  # the one computed name: TrainConfig's checks (CHECKED, below)
                        assert path.name == "config.py" and ast.unparse(k) == "name", path
    assert len(named) > 15
    for name, value in named:
        assert name in FLAGS or (name, value) in SETTING_FLAGS or name in COMMANDS, name


def test_every_setting_the_config_checks_is_named_by_its_flag_where_the_cli_has_one():
    from cosim_dask.fit.config import CHECKED

    train = typer.main.get_command(app).commands["train"]
    options = {opt for param in train.params for opt in param.opts}
    for name in CHECKED:
        option = "--" + name.replace("_", "-")
        assert (FLAGS.get(name) == option) == (option in options), name
    result = cosim_main("train", "s.zarr", "--out", "m.zarr", "--lr", "0")
    assert result.exit_code == 2
    assert one_line_error(result.stderr) == (
        "error: --lr 0.0 must be > 0 (omit it for the solver's default)")
    with pytest.raises(CosimError, match=r"^rank=0 must be >= 1$"):
        TrainConfig(rank=0).check()
    with pytest.raises(CosimError, match=r"^lr=-0\.5 must be > 0"):  # a grid's NumPy value
        TrainConfig(lr=np.float64(-0.5)).check()


def test_an_error_names_the_parameter_in_python_and_the_flag_in_the_cli(tmp_path):
    store, out = tmp_path / "s.zarr", tmp_path / "m.zarr"
    generate_store(store, pairs=100, dim=3, seed=0)
    with pytest.raises(CosimError) as info:
        check_request(str(store), str(out), TrainConfig(), RunOptions(), resume=True,
                      overwrite=True)
    assert "resume=True and overwrite=True contradict" in str(info.value)
    again = pickle.loads(pickle.dumps(info.value))  # as an error raised on a worker arrives
    assert str(again) == str(info.value) and cli_text(again) == cli_text(info.value)
    result = cosim_main("train", store, "--out", out, "--resume", "--overwrite")
    assert result.exit_code == 2
    one_line_error(result.stderr, "--resume and --overwrite contradict each other")
    assert not out.exists()


def test_flags_render_values_and_commands():
    assert flag("split", "all") == "--split all"
    assert flag("overwrite", True) == "--overwrite"
    assert flag("lr", ANY) == "--lr"
    assert flag("on_invalid", "skip") == "--skip-invalid"
    assert flag("train_store", {"store": "s", "out": "m", "resume": True}) \
        == "`cosim train s --out m --resume`"
    message = Message("pass {split} ({x}, {not_a_param})", {"split": "all", "x": ANY})
    assert str(message) == "pass split='all' (x, {not_a_param})"
