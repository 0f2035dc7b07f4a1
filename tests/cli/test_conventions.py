"""The conventions of a well-kept command line: --version/-V, -h, shell completion, --quiet and
--json on every command that prints results, flags shown as flags, commands in workflow
order, LocalCluster options refused beside a scheduler, swapped arguments named.

Commands run in-process (helpers.cosim_main: the console entry point, usage errors as one
line); the ones that need a cluster join the session's shared one with --scheduler."""

import json
import re

import numpy as np
import pytest
import typer.main
from helpers import cosim_main, one_line_error, tree_hash

from cosim_dask import __version__
from cosim_dask.cli import app
from cosim_dask.fit.model import load_model

WORKFLOW = ["generate", "ingest", "info", "train", "evaluate", "transform", "report"]


def ok(*args, env=None):
    result = cosim_main(*args, env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


# --- --version, -h, completion -------------------------------------------------------------


def test_version_flag():
    for args in (["--version"], ["-V"], ["version"]):  # the command stays, listed last
        assert ok(*args).stdout == f"{__version__}\n"


def test_h_is_help_and_commands_in_workflow_order():
    text = ok("-h").stdout
    assert text == ok("--help").stdout
    panel = text[text.index("Commands"):]
    listed = [m[1] for m in re.finditer(r"^│ (\w+) ", panel, re.M)]
    assert listed == WORKFLOW + ["version"]
    for option in ("--version", "-V", "--install-completion", "--show-completion"):
        assert option in text
    assert ok("train", "-h").stdout == ok("train", "--help").stdout


def test_command_summaries_wrap_as_one_paragraph():
    """The listing flows each docstring's first paragraph as one paragraph: no line ends
    where the docstring's own line ended ("... metric A* (kept in the" / "store), ...")."""
    text = cosim_main("--help", env={"COLUMNS": "250"}).stdout
    rows = {m[1]: m[2].strip() for m in re.finditer(r"^│ (\w+) +(.*?)│$", text, re.M)}
    assert rows["generate"] == ("Write synthetic pairs whose targets come from a hidden PSD "
                                "metric A* (kept in the store), streaming chunk by chunk.")
    assert rows["ingest"].endswith("into a pair store, streaming in bounded memory.")


def test_completion_answers_through_the_entry_point(tmp_path):
    # What the installed script does on <TAB>: call `cosim` back with _COSIM_COMPLETE set.
    env = {"_COSIM_COMPLETE": "complete_bash", "COMP_WORDS": "cosim tr", "COMP_CWORD": "1"}
    assert ok(env=env).stdout.split() == ["train", "transform"]
    env.update(COMP_WORDS="cosim train pairs.zarr --ov", COMP_CWORD="3")
    assert ok(env=env).stdout.split() == ["--overwrite"]
    # Typer's switch to name the shell instead of detecting it (this test runs under any).
    named = {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1", "HOME": str(tmp_path)}
    script = ok("--show-completion", "bash", env=named).stdout
    assert "_COSIM_COMPLETE=complete_bash" in script and "complete " in script
    ok("--install-completion", "bash", env=named)
    assert "_COSIM_COMPLETE" in (tmp_path / ".bash_completions" / "cosim.sh").read_text()
    assert "cosim.sh" in (tmp_path / ".bashrc").read_text()


# --- flags ----------------------------------------------------------------------------------

def test_every_help_has_h_and_shows_flags_without_a_value():
    """Each command's help, rendered once: -h works, and no flag shows a type column
    (`--overwrite <bool>` reads as if it took a value), Typer's own (--help, the completion
    flags) included."""
    root = typer.main.get_command(app)
    commands = {"": root, **{name: root.commands[name] for name in root.commands}}
    checked = 0
    for name, command in commands.items():
        text = ok(*([name] if name else []), "-h").stdout
        assert f"Usage: cosim {name} [OPTIONS]".replace("  ", " ") in text
        assert "<bool>" not in text, (name, text)
        flags = [max(param.opts, key=len) for param in command.params
                 if getattr(param, "is_flag", False)] + ["--help"]
        for option in flags:
            rows = [line for line in text.splitlines() if f"{option} " in line]
            assert rows and all("<bool>" not in row for row in rows), (name, rows)
            checked += 1
    assert checked >= 30  # --help, --overwrite, --json and --quiet of every command, ...


def test_a_flag_takes_no_value(tmp_path):
    result = cosim_main("generate", tmp_path / "s.zarr", "--pairs", 10, "--dim", 2,
                        "--overwrite", "true")
    assert result.exit_code == 2
    one_line_error(result.stderr, "unexpected extra argument", "true")


# --- --json and --quiet ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, cluster_address):
    """A small binary store, a model trained on it, and a .npy of vectors."""
    w = tmp_path_factory.mktemp("conventions")
    ok("generate", w / "s.zarr", "--pairs", 3000, "--dim", 6, "--rank", 2, "--targets",
       "binary", "--seed", 3, "--chunk-pairs", 1000)
    ok("train", w / "s.zarr", "--out", w / "m.zarr", "--steps", 4, "--scheduler",
       cluster_address)
    np.save(w / "v.npy", np.random.default_rng(0).standard_normal((20, 6)).astype("f4"))
    return w


def test_train_json_is_the_run_summary(world, cluster_address):
    result = ok("train", world / "s.zarr", "--out", world / "j-m.zarr", "--steps", 2,
                "--json", "--scheduler", cluster_address)
    summary = json.loads(result.stdout)  # stdout is the document, and only it
    attrs = load_model(world / "j-m.zarr").attrs
    assert summary["model"] == str(world / "j-m.zarr")
    assert summary["trained"] and summary["complete"]
    assert summary["steps"] == attrs["steps"] == len(attrs["history"]) - 1
    assert summary["stop_reason"] == attrs["stop_reason"]
    assert summary["passes"] == sum(h["evaluations"] for h in attrs["history"]) >= 1
    assert summary["final_loss"] == attrs["history"][-1]["loss"]
    assert summary["validation_figures"] == attrs["validation_figures"]
    assert "Dask dashboard" in result.stderr  # notes went to stderr


def test_train_json_of_a_resume_with_nothing_to_do(world, cluster_address):
    w = world
    result = ok("train", w / "s.zarr", "--out", w / "m.zarr", "--steps", 4, "--resume",
                "--json", "--scheduler", cluster_address)
    summary = json.loads(result.stdout)
    assert not summary["trained"] and summary["model"] == str(w / "m.zarr")
    assert "already complete" in summary["message"]


def test_evaluate_json_names_the_model_path(world, cluster_address):
    w = world
    result = ok("evaluate", w / "m.zarr", w / "s.zarr", "--split", "all", "--json",
                "--scheduler", cluster_address)
    report = json.loads(result.stdout)
    assert report["model"] == str(w / "m.zarr")  # the path, not a dump of the model
    assert report["store"] == str(w / "s.zarr") and report["learned"]["pairs"] == 3000
    assert len(result.stdout) < 4000


def test_quiet_prints_nothing_but_errors(world, cluster_address):
    w = world
    runs = [
        ("generate", w / "q.zarr", "--pairs", 500, "--dim", 3),
        ("ingest", w / "qi.zarr", "--x", w / "v.npy", "--y", w / "v.npy", "--target",
         w / "t.npy"),
        ("info", w / "s.zarr"),
        ("train", w / "s.zarr", "--out", w / "q-m.zarr", "--steps", 1, "--scheduler",
         cluster_address),
        ("evaluate", w / "m.zarr", w / "s.zarr", "--scheduler", cluster_address),
        ("transform", w / "m.zarr", w / "v.npy", w / "q.npy"),
        ("report", w / "m.zarr", "--out", w / "q.html"),
    ]
    np.save(w / "t.npy", np.ones(20, "f4"))
    for args in runs:
        result = ok(*args, "--quiet")
        assert (result.stdout, result.stderr) == ("", ""), args
    assert (w / "q.npy").exists() and (w / "q.html").exists() and (w / "q-m.zarr").exists()
    # Errors still speak.
    result = cosim_main("info", w / "nothing.zarr", "-q")
    assert result.exit_code == 2
    one_line_error(result.stderr, "nothing.zarr")


def test_json_everywhere_is_one_document(world):
    w = world
    np.save(w / "t.npy", np.ones(20, "f4"))
    docs = {
        "generate": ok("generate", w / "j.zarr", "--pairs", 500, "--dim", 3, "--json"),
        "ingest": ok("ingest", w / "ji.zarr", "--x", w / "v.npy", "--y", w / "v.npy",
                     "--target", w / "t.npy", "--json"),
        "info": ok("info", w / "j.zarr", "--json"),
        "transform": ok("transform", w / "m.zarr", w / "v.npy", w / "j.npy", "--json"),
        "report": ok("report", w / "m.zarr", "--out", w / "j.html", "--json"),
    }
    doc = {name: json.loads(result.stdout) for name, result in docs.items()}
    assert doc["generate"]["n"] == 500 and doc["generate"]["path"] == str(w / "j.zarr")
    assert doc["ingest"]["n"] == 20 and doc["ingest"]["targets"] == "binary"
    assert doc["info"]["n"] == 500
    assert doc["transform"]["rows"] == 20 and doc["transform"]["path"] == str(w / "j.npy")
    assert doc["report"]["report"] == str(w / "j.html")


# --- LocalCluster options beside a scheduler ------------------------------------------------


@pytest.mark.parametrize("command,option,value", [
    ("train", "--workers", "2"),  # the default value, but given: still refused
    ("train", "--threads-per-worker", "2"),
    ("train", "--memory-limit", "1GiB"),
    ("train", "--dashboard-address", "127.0.0.1:0"),
    ("evaluate", "--workers", "3"),
])
def test_local_cluster_options_with_a_scheduler_are_an_error(world, command, option, value):
    w = world
    args = (["train", w / "s.zarr", "--out", w / "x.zarr"] if command == "train" else
            ["evaluate", w / "m.zarr", w / "s.zarr"])
    before = tree_hash(w)
    # Port 1: nothing listens there; the check comes before any connection.
    result = cosim_main(*args, option, value, "--scheduler", "tcp://127.0.0.1:1")
    assert result.exit_code == 2
    one_line_error(result.stderr, f"{option} is for the LocalCluster",
                   "with --scheduler the cluster's own workers are used", f"drop {option}")
    assert tree_hash(w) == before


def test_local_cluster_options_with_a_scheduler_from_the_environment(world):
    w = world
    result = cosim_main("train", w / "s.zarr", "--out", w / "x.zarr", "--workers", 3,
                        env={"DASK_SCHEDULER_ADDRESS": "tcp://127.0.0.1:1"})
    assert result.exit_code == 2
    one_line_error(result.stderr, "--workers is for the LocalCluster",
                   "scheduler set in the environment (tcp://127.0.0.1:1)", "drop --workers")
    assert not (w / "x.zarr").exists()


# --- swapped arguments ----------------------------------------------------------------------


@pytest.mark.parametrize("args,kind,order", [
    (["evaluate", "{s}", "{m}"], "a pair store", "cosim evaluate MODEL STORE"),
    (["transform", "{s}", "{m}", "{w}/t.zarr"], "a pair store", "cosim transform MODEL IN OUT"),
    (["transform", "{v}", "{m}", "{w}/t.npy"], "a .npy file", "cosim transform MODEL IN OUT"),
])
def test_swapped_arguments_get_the_order(world, args, kind, order):
    w = world
    names = {"s": w / "s.zarr", "m": w / "m.zarr", "v": w / "v.npy", "w": w}
    argv = [a.format(**names) for a in args]
    before = tree_hash(w)
    result = cosim_main(*argv, "--scheduler", "tcp://127.0.0.1:1") if args[0] == "evaluate" \
        else cosim_main(*argv)
    assert result.exit_code == 2
    one_line_error(result.stderr, f"{argv[1]!r} looks like {kind}", f"{argv[2]!r} a model",
                   f"the order is `{order}`")
    assert tree_hash(w) == before


def test_two_stores_keep_the_plain_error(world):
    w = world
    result = cosim_main("evaluate", w / "s.zarr", w / "s.zarr", "--scheduler",
                        "tcp://127.0.0.1:1")
    assert result.exit_code == 2
    assert "looks like" not in one_line_error(result.stderr, "is not a cosim model")
