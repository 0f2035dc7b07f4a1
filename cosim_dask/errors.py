"""One error hierarchy for the package; the CLI turns each into one line and a non-zero exit.

The library knows parameters, not command-line flags. A message that tells the user what to
change names the parameter as a ``{name}`` placeholder and carries its value in ``params``
(a :class:`Message`): ``str()`` renders it the Python way (``overwrite=True``, ``lr``,
``split='all'``), and the CLI renders the same message with its own flags (``--overwrite``,
``--lr``, ``--split all``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

#: A placeholder's value meaning "the parameter itself" (``lr``), not a setting of it.
ANY = "<any>"

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def python_param(name: str, value: object) -> str:
    """A parameter as Python code names it: ``lr``, ``overwrite=True``, ``split='all'``; a
    mapping value is a call, ``train_store(store='s.zarr', resume=True)``."""
    if value is ANY:
        return name
    if isinstance(value, Mapping):
        return f"{name}({', '.join(f'{k}={v!r}' for k, v in value.items())})"
    return f"{name}={value!r}"


class Message(str):
    """Text whose ``{name}`` placeholders stand for the parameters in ``params``.

    As a ``str`` it reads the Python way (:func:`python_param`); :meth:`render` fills the
    placeholders another way (the CLI's flags). Only the names in ``params`` are
    placeholders: any other brace in the text (from a path, say) stays as it is.
    """

    template: str
    params: dict[str, object]

    def __new__(cls, template: str, params: Mapping[str, object] | None = None) -> Message:
        params = dict(params or {})
        self = super().__new__(cls, _fill(template, params, python_param))
        self.template, self.params = template, params
        return self

    def __reduce__(self):  # survives pickling (errors raised on Dask workers)
        return (self.__class__, (self.template, self.params))

    def render(self, name: Callable[[str, object], str]) -> str:
        """The text with every placeholder written as ``name(parameter, value)``."""
        return _fill(self.template, self.params, name)


def _fill(template: str, params: Mapping[str, object],
          name: Callable[[str, object], str]) -> str:
    if not params:
        return template
    return _PLACEHOLDER.sub(
        lambda m: name(m[1], params[m[1]]) if m[1] in params else m[0], template)


class CosimError(ValueError):
    """Base of every error cosim-dask raises on purpose (bad input, bad state).

    ``CosimError("... pass {overwrite} to replace it", params={"overwrite": True})`` names
    the parameter to change (see :class:`Message`); :attr:`message` keeps it for renderers.
    """

    def __init__(self, message: object = "", *args: object,
                 params: Mapping[str, object] | None = None) -> None:
        if params is not None:
            message = Message(str(message), params)
        super().__init__(message, *args)

    @property
    def message(self) -> Message:
        """The first argument as a :class:`Message` (one without placeholders if plain)."""
        first = self.args[0] if self.args else ""
        return first if isinstance(first, Message) else Message(str(first))


class InvalidPairsError(CosimError):
    """Pairs whose similarity is undefined: zero, NaN/Inf vectors or xᵀAx ≤ 0."""


class ShapeError(CosimError):
    """Arrays whose shapes or dtypes do not fit together."""


class UnknownNameError(CosimError):
    """A loss, solver or other registry entry that does not exist."""


class StoreError(CosimError):
    """A pair store that is missing, malformed or cannot be written."""


class ModelError(CosimError):
    """A model file that is missing, malformed or does not fit the data."""


class TrainingError(CosimError):
    """Training that cannot start or cannot go on (diverged, bad resume, ...)."""


class ClusterError(CosimError):
    """A Dask cluster that cannot be reached or started."""


class SchedulerLostError(ClusterError):
    """The Dask scheduler went away or stopped answering during a run."""


class WorkerLostError(ClusterError):
    """A worker left while a request needed every worker (a broadcast); the request is
    repeated."""


class DivergedError(TrainingError):
    """A solver whose parameters ran off (inf/nan, or a degenerate metric): the step size is
    too large for the problem, not the data at fault."""
