"""What the CLI prints: escaped text, one-line errors with the CLI's flag names, exit codes.

Every command runs its body through :func:`run`, which turns a :class:`CosimError` (and a
few well-understood OS errors) into one line on stderr and exit code 2; ``--debug`` shows the
traceback instead. The library names parameters (``overwrite=True``); :data:`FLAGS` is the
one table that maps them to this CLI's flags (``--overwrite``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import TypeVar

import typer
from rich.console import Console

from cosim_dask.errors import ANY, CosimError, Message, python_param

T = TypeVar("T")

#: Library parameter -> the flag that sets it. Every parameter a library message names is
#: here (a test checks), so that an error tells the user what to type.
FLAGS: dict[str, str] = {
    "batch_chunks": "--batch-chunks",
    "drop_invalid": "--drop-invalid",
    "i_column": "--i-column",
    "j_column": "--j-column",
    "lr": "--lr",
    "memory_limit": "--memory-limit",
    "negative_target": "--negative-target",
    "negatives": "--negatives",
    "overwrite": "--overwrite",
    "pairs": "--pairs",
    "patience": "--patience",
    "png_dir": "--png-dir",
    "rank": "--rank",
    "regularization": "--regularization",
    "resume": "--resume",
    "scheduler": "--scheduler",
    "security": "--security",
    "seed": "--seed",
    "split": "--split",
    "split_every": "--split-every",
    "steps": "--steps",
    "target_column": "--target-column",
    "targets": "--targets",
    "tol": "--tol",
    "validation": "--validation",
    "zero_is_negative": "--zero-is-negative",
}
#: Settings of a parameter that are flags of their own.
SETTING_FLAGS: dict[tuple[str, object], str] = {("on_invalid", "skip"): "--skip-invalid"}
#: Library calls named in messages -> the command line that does the same.
COMMANDS: dict[str, str] = {"train_store": "`cosim train {store} --out {out} --resume`"}


def flag(name: str, value: object) -> str:
    """A library parameter as the user types it: ``--lr``, ``--overwrite``, ``--split all``;
    a parameter this CLI has no flag for keeps its Python form."""
    if isinstance(value, Mapping):
        return COMMANDS[name].format(**value) if name in COMMANDS else python_param(name, value)
    if (name, value) in SETTING_FLAGS:
        return SETTING_FLAGS[name, value]
    if name not in FLAGS:
        return python_param(name, value)
    return FLAGS[name] if value is ANY or value is True else f"{FLAGS[name]} {value}"


def cli_text(text: object) -> str:
    """``text`` with the parameters it names written as flags (see :class:`Message`)."""
    if isinstance(text, CosimError):
        return text.message.render(flag) if len(text.args) <= 1 else str(text)
    return text.render(flag) if isinstance(text, Message) else str(text)


#: C0 and C1 control characters, DEL, and the Unicode controls that reorder text (bidi):
#: in a store attribute or a path they could clear the screen, set the terminal's title or
#: hide what is printed.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``text`` with every control character shown as an escape (ESC as ``\\x1b``): safe
    to print to a terminal whatever a file or an argument held."""
    return _UNPRINTABLE.sub(_escape, cli_text(text))


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def echo(text: object, err: bool = False) -> None:
    """Every human-readable line the CLI prints goes through here (JSON is escaped by
    json.dumps): one place where text from files and arguments is made printable.

    Lines for stdout are dropped under ``--quiet`` and go to stderr under ``--json`` (stdout
    holds the JSON document alone); ``err`` lines (errors) are always printed."""
    if not err and _mode["quiet"]:
        return
    typer.echo(printable(text), err=err or _mode["json"])


def say(console: Console, text: object) -> None:
    """:func:`echo` for a rich console: escaped, not read as rich markup, and dropped under
    ``--quiet``."""
    if not _mode["quiet"]:
        console.print(printable(text), markup=False)


#: Set by ``cosim --debug``: errors are raised with their traceback, not turned into a line.
_debug = {"on": False}


def set_debug(on: bool) -> None:
    """Show tracebacks (``on``) or one-line errors."""
    _debug["on"] = on


def debugging() -> bool:
    """Whether ``--debug`` was given."""
    return _debug["on"]


#: Set by each command's ``--quiet`` and ``--json`` (reset by the root for every command).
_mode = {"quiet": False, "json": False}


def set_mode(*, quiet: bool | None = None, as_json: bool | None = None) -> None:
    """Set what the command prints; a setting not given keeps its value."""
    if quiet is not None:
        _mode["quiet"] = quiet
    if as_json is not None:
        _mode["json"] = as_json


def is_quiet() -> bool:
    """Whether ``--quiet`` was given: errors only (and the JSON document under ``--json``);
    no progress bars, no notes, no tables."""
    return _mode["quiet"]


def print_json(document: Mapping) -> None:
    """The one JSON document of a ``--json`` command, alone on stdout. Not-a-number and
    infinite figures (an AUC of one-class rows) are written as null: JSON has no NaN."""
    typer.echo(json.dumps(_finite(document), indent=2, allow_nan=False))


def _finite(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run(body: Callable[[], T]) -> T:
    """Call ``body``; a CosimError becomes a one-line message and exit code 2."""
    try:
        return body()
    # MemoryError: a size typed with a few zeros too many ("Unable to allocate 71 PiB ...").
    except (CosimError, OSError, MemoryError) as exc:
        if debugging():
            raise
        text = cli_text(exc)
        echo(f"error: {text.splitlines()[0] if text else type(exc).__name__}", err=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt as exc:
        # SIGTERM arrives as Terminated (see cli.app): the same clean-up, its own exit code.
        terminated = isinstance(exc, Terminated)
        typer.echo("terminated" if terminated else "interrupted", err=True)
        raise typer.Exit(code=143 if terminated else 130) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every ``finally`` runs: outputs remove their
    temporary versions and release their locks, clusters are closed."""


def fmt(value: float | None, spec: str = ".5g") -> str:
    """A figure for a table or a status line; a dash when there is none."""
    return "—" if value is None else format(value, spec)
