"""The model file: a Zarr group with the metric, the training record and (for resuming) the
solver state. Loading reads JSON attributes and numeric arrays only; nothing is unpickled.

Layout::

    MODEL/                 zarr v3 group, attrs: format, format_version, d, param, rank,
      A      (d, d) f64    loss, solver, steps, final losses/AUC, thresholds, store
      M      (k, d) f64    fingerprint, settings, history (one dict per step), ...
      solver/              the solver's arrays; its scalars in the group's attrs
"""

from __future__ import annotations

import math
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import zarr

import cosim_dask.objectstore as objectstore
from cosim_dask import __version__
from cosim_dask.core.forms import Parameterisation
from cosim_dask.errors import ModelError
from cosim_dask.fit.config import MAX_NEGATIVES, TrainConfig
from cosim_dask.fit.loop import TrainState, state_to_attrs
from cosim_dask.outputs import MODEL, Output, UrlOutput, claim_output, is_url, recover

FORMAT = "cosim-model"
FORMAT_VERSION = 1


@dataclass
class Model:
    """A learned metric and what is known of how it was learned."""

    A: np.ndarray
    M: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    solver_state: dict[str, Any] | None = None

    @property
    def d(self) -> int:
        return self.A.shape[0]

    @property
    def history(self) -> list[dict]:
        return self.attrs.get("history", [])

    def components(self) -> np.ndarray:
        """L with A = LᵀL: M for the factor form, the symmetric square root A^½ otherwise.

        ``x ↦ L x`` maps vectors so that plain cosine similarity of the images equals the
        learned similarity.
        """
        if self.M is not None:
            return self.M
        w, V = np.linalg.eigh(self.A)
        return (V * np.sqrt(np.maximum(w, 0.0))) @ V.T


def _json_safe(value: Any) -> Any:
    """Attributes are JSON: NaN/Inf become None, NumPy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_model(path: str | os.PathLike, model: Model, *, overwrite: bool = False,
               inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Write ``model`` to ``path`` through the output policy (:func:`claim_output`): locked,
    never over an input or anything but a model, old or new at every instant.

    A failed write (disk full, file size limit, ...) leaves no temporary folder and the
    previous ``path``, if any, as it was; it raises one line saying so.
    """
    with claim_output(path, MODEL, overwrite=overwrite, inputs=inputs) as target:
        write_model(target, model)


def write_model(target: Output | UrlOutput, model: Model) -> None:
    """Write ``model`` as a new version of the claimed output ``target`` (a run that holds
    its output for checkpoints writes each one with this)."""
    with target.staged() as tmp:
        root = zarr.open_group(tmp, mode="w")
        root.attrs.update(_json_safe({**model.attrs, "format": FORMAT,
                                      "format_version": FORMAT_VERSION, "d": model.d}))
        _write(root, "A", model.A)
        if model.M is not None:
            _write(root, "M", model.M)
        if model.solver_state is not None:
            group = root.create_group("solver")
            scalars = {}
            for key, value in model.solver_state.items():
                if isinstance(value, np.ndarray):
                    _write(group, key, value)
                else:
                    scalars[key] = value
            group.attrs.update(_json_safe(scalars))


def _write(group, name: str, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=np.float64)
    # Uncompressed and in one chunk: exact float64 round trip, and the files are small.
    # write_empty_chunks: zarr skips an all-zero chunk (a zero gradient), and load_model
    # reports a missing chunk file as damage.
    z = group.create_array(name, shape=array.shape, dtype="float64",
                           chunks=array.shape or None, compressors=None,
                           config={"write_empty_chunks": True})
    z[...] = array


#: Tolerances of the checks on A at load time, relative to its size: entries of A − Aᵀ at
#: most SYMMETRY_TOL·max|A|, eigenvalues at least −PSD_TOL·λ_max. Round-off of MᵀM or of a
#: PSD projection stays orders of magnitude below; anything beyond is a damaged file.
SYMMETRY_TOL = 1e-8
PSD_TOL = 1e-8

#: Keys of the ``train_state`` attribute (what a resumed run continues from) and the kinds
#: of value each holds.
TRAIN_STATE_KEYS = {"step": "count", "best_score": "number or null", "since_best": "count",
                    "stop_reason": "text or null"}


@dataclass
class ModelAttrs:
    """The attributes of a model file, typed: what :func:`build_model` writes and what
    :func:`load_model` checks (each one present must be of its type; ints are counts, ≥ 0).

    The fields without a default are written by every model; the others only when known
    (a model fitted by the estimator has no store, a graded one no thresholds).
    """

    param: str | None
    rank: int | None
    loss: str | None
    solver: str | None
    settings: dict  # the TrainConfig, as a dict
    settings_key: str | None  # TrainConfig.key(): what a resume must match
    steps: int
    complete: bool
    train_loss: float | None
    val_loss: float | None
    val_auc: float | None
    stop_reason: str | None
    history: list  # one step record (a dict of numbers or nulls, with a "step") per step
    train_state: dict  # the loop state, keys TRAIN_STATE_KEYS
    cosim_version: str | None
    saved: str | None  # ISO time of writing
    targets: str | None = None  # "binary" or "graded"
    threshold: float | None = None  # of the learned similarity, calibrated on training rows
    plain_threshold: float | None = None  # the same for plain cosine
    store_path: str | None = None
    store_fingerprint: str | None = None
    # The fan-in fixes the order of the float sums, so the bits of A: a resume must keep it.
    split_every: int | None = None
    run_id: str | None = None
    train_seconds: float | None = None
    train_figures: dict | None = None
    validation_figures: dict | None = None
    roc: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        """The attributes to store: optional ones only when set."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None or f.default is not None}


def _kind(hint: Any) -> str:
    """The kind :func:`_is_kind` checks for a type hint of :class:`ModelAttrs`."""
    args = [h for h in typing.get_args(hint) if h is not type(None)]
    if isinstance(hint, types.UnionType) and len(args) == 1:
        return _kind(args[0]) + " or null"
    return {int: "count", float: "number", str: "text", bool: "bool", list: "list",
            dict: "dict"}[typing.get_origin(hint) or hint]


#: Attributes the readers rely on, when present, and the kinds of value the format gives
#: them ("...or null": null allowed), from :class:`ModelAttrs`. ``history``, ``settings``
#: and ``train_state`` are checked in depth by :func:`_check_attrs`.
ATTR_KINDS = {key: _kind(hint) for key, hint in typing.get_type_hints(ModelAttrs).items()}


def build_model(form: Parameterisation, params: np.ndarray, config: TrainConfig,
                state: TrainState, *, complete: bool = True,
                solver_state: dict[str, Any] | None = None, **known: Any) -> Model:
    """The model of a run: the one place A is normalised and the attributes are made.

    ``params`` are the solver's parameters of ``form``; ``known`` the optional attributes
    of :class:`ModelAttrs` the caller knows (store, thresholds, ...). Without
    regularization A is scaled to trace d (and M alike): the loss cannot see the scale of
    A and the solver lets it drift (eigenvalues of 1e4 are common), and the scale changes
    no similarity. With regularization toward I the scale is part of what was learned and
    is kept. ``solver_state`` (for a resume) keeps the raw parameters.
    """
    params = np.array(params, dtype=np.float64)
    A = form.metric(params)
    A = 0.5 * (A + A.T)
    if not config.regularization:
        scale = A.shape[0] / np.trace(A)
        A = A * scale
        params = params * np.sqrt(scale) if form.name == "factor" else params
    last = state.history[-1] if state.history else {}
    attrs = ModelAttrs(
        param=config.param, rank=config.rank, loss=config.loss, solver=config.solver,
        settings=asdict(config), settings_key=config.key(), steps=state.step,
        complete=complete, train_loss=last.get("loss"), val_loss=last.get("val_loss"),
        val_auc=last.get("val_auc"), stop_reason=state.stop_reason, history=state.history,
        train_state={k: v for k, v in state_to_attrs(state).items() if k != "history"},
        cosim_version=__version__, saved=datetime.now(UTC).isoformat(timespec="seconds"),
        **known,
    )
    M = params if form.name == "factor" else None
    return Model(A=A, M=M, attrs=attrs.to_dict(), solver_state=solver_state)


def _is_kind(value: Any, kind: str) -> bool:
    """Whether a JSON attribute value is of ``kind`` ("count", "number", "text", "bool",
    "list", "dict", each optionally "... or null")."""
    if kind.endswith(" or null"):
        return value is None or _is_kind(value, kind[: -len(" or null")])
    if isinstance(value, bool):
        return kind == "bool"
    return {"count": isinstance(value, int) and value >= 0,
            "number": isinstance(value, int | float),
            "text": isinstance(value, str), "list": isinstance(value, list),
            "dict": isinstance(value, dict)}.get(kind, False)


def _damaged(path: str | Path, problem: str) -> ModelError:
    return ModelError(f"model {str(path)!r} is damaged: {problem}; retrain it or restore a copy")


def load_model(path: str | os.PathLike, *, with_solver: bool = False) -> Model:
    """Read a model written by :func:`save_model`; :class:`ModelError` when it is not one.

    Nothing is taken on trust: every array must be present and complete (a missing chunk
    file is an error, never zeros), A finite, symmetric and positive semi-definite within
    stated tolerances (max|A − Aᵀ| ≤ :data:`SYMMETRY_TOL`·max|A|, smallest eigenvalue ≥
    −:data:`PSD_TOL`·largest, largest > 0), M finite and (k, d), the solver's arrays
    finite, and the attributes the readers rely on of the types the format gives them
    (:data:`ATTR_KINDS`; ``history`` a list of step records, ``settings`` the training
    settings, ``train_state`` a dict with :data:`TRAIN_STATE_KEYS`). Any mismatch raises one
    line, "model PATH is damaged: ...; retrain it or restore a copy".

    A URL opens the version its pointer names (:mod:`cosim_dask.objectstore`); one that no
    writer has published yet is refused as incomplete.
    """
    shown = os.fspath(path)
    if is_url(shown):
        with objectstore.storage_errors(shown):
            location = objectstore.locate(shown, "model", ModelError,
                                          "train one with `cosim train`")
            return _load_model(shown, location, with_solver)
    recover(path)  # a swap a killed writer left half done
    if not Path(path).exists():
        raise ModelError(f"model {shown!r} does not exist; train one with `cosim train`")
    return _load_model(shown, shown, with_solver)


def _load_model(path: str, location: str, with_solver: bool) -> Model:
    """:func:`load_model` of the Zarr group at ``location``, named ``path`` in messages."""
    try:
        root = zarr.open_group(location, mode="r", zarr_format=3 if is_url(location) else None)
        attrs = dict(root.attrs)
    except Exception:
        raise ModelError(f"{str(path)!r} is not a cosim model (not a Zarr group)") from None
    if attrs.get("format") != FORMAT:
        raise ModelError(f"{str(path)!r} is not a cosim model (format {attrs.get('format')!r})")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"model {str(path)!r} has format version {attrs.get('format_version')!r}; this "
            f"cosim-dask reads version {FORMAT_VERSION}"
        )
    d = attrs.get("d")
    A = _read(root, "A", path)
    if not _is_kind(d, "count") or d < 1 or A.shape != (d, d):
        raise _damaged(path, f"A has shape {A.shape}, expected d={d!r}")
    if not np.isfinite(A).all():
        raise _damaged(path, "A has NaN or Inf entries")
    _check_psd(A, path)
    M = _read(root, "M", path) if "M" in root else None
    if M is not None and (M.ndim != 2 or M.shape[1] != d or M.shape[0] < 1):
        raise _damaged(path, f"M has shape {M.shape}, expected (k, {d})")
    if M is not None and not np.isfinite(M).all():
        raise _damaged(path, "M has NaN or Inf entries")
    _check_attrs(attrs, path)
    state = None
    if with_solver and "solver" in root:
        group = root["solver"]
        state = dict(group.attrs)
        for name in group.array_keys():
            state[name] = _read(group, name, path)
            if not np.isfinite(state[name]).all():
                raise _damaged(path, f"solver array {name!r} has NaN or Inf entries")
        for key in ("train_state", "history"):  # what a resumed run continues from
            if key not in attrs:
                raise _damaged(path, f"it holds solver state but no {key!r} attribute")
    return Model(A=A, M=M, attrs=attrs, solver_state=state)


def _check_psd(A: np.ndarray, path: str | Path) -> None:
    """A symmetric and PSD within :data:`SYMMETRY_TOL` and :data:`PSD_TOL`, and not zero."""
    scale = float(np.abs(A).max())
    asym = float(np.abs(A - A.T).max())
    if asym > SYMMETRY_TOL * scale:
        raise _damaged(path, f"A is not symmetric (max |A - A^T| = {asym:.3g}, max |A| = "
                             f"{scale:.3g})")
    eig = np.linalg.eigvalsh((A + A.T) / 2)
    if not eig[-1] > 0:
        raise _damaged(path, "A is zero (no positive eigenvalue)")
    if eig[0] < -PSD_TOL * eig[-1]:
        raise _damaged(path, f"A is not positive semi-definite (smallest eigenvalue "
                             f"{eig[0]:.3g}, largest {eig[-1]:.3g})")


def _check_attrs(attrs: dict, path: str | Path) -> None:
    """The attributes the readers use, when present, are of the kinds the format says."""
    for key, kind in ATTR_KINDS.items():
        if key in attrs and not _is_kind(attrs[key], kind):
            raise _damaged(path, f"attribute {key!r} is {attrs[key]!r:.60}, expected "
                                 f"{'a ' if kind in ('count', 'bool', 'list', 'dict') else ''}"
                                 f"{kind}")
    for i, record in enumerate(attrs.get("history", [])):
        if not isinstance(record, dict) or not _is_kind(record.get("step"), "count"):
            raise _damaged(path, f"history[{i}] is {record!r:.60}, expected a step record "
                                 "with a 'step' count")
        bad = [k for k, v in record.items() if not _is_kind(v, "number or null")]
        if bad:
            raise _damaged(path, f"history[{i}].{bad[0]} is {record[bad[0]]!r:.60}, expected "
                                 "a number or null")
    if "train_state" in attrs:
        state = attrs["train_state"]
        for key, kind in TRAIN_STATE_KEYS.items():
            if key not in state:
                raise _damaged(path, f"train_state has no {key!r}")
            if not _is_kind(state[key], kind):
                raise _damaged(path, f"train_state.{key} is {state[key]!r:.60}, expected "
                                     f"{kind}")
    if "settings" in attrs:
        _check_settings(attrs["settings"], path)
    for key in ("train_figures", "validation_figures", "roc"):
        parts = attrs.get(key) or {}
        bad = [k for k, v in parts.items() if not isinstance(v, dict)]
        if bad:
            raise _damaged(path, f"{key}.{bad[0]} is {parts[bad[0]]!r:.60}, expected a dict")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a type hint of :class:`~cosim_dask.fit.config.TrainConfig`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _check_settings(settings: dict, path: str | Path) -> None:
    """Each known training setting of the type :class:`~cosim_dask.fit.loop.TrainConfig`
    gives it (unknown keys are left alone)."""
    for key, hint in typing.get_type_hints(TrainConfig).items():
        if key in settings and not _fits(settings[key], hint):
            raise _damaged(path, f"settings.{key} is {settings[key]!r:.60}, expected "
                                 f"{getattr(hint, '__name__', hint)}")
    # Sizes work when read back (`cosim evaluate` makes that many negatives per pair).
    negatives = settings.get("negatives")
    if isinstance(negatives, int) and not 0 <= negatives <= MAX_NEGATIVES:
        raise _damaged(path, f"settings.negatives is {negatives!r:.60}, expected 0 to "
                             f"{MAX_NEGATIVES}")


def _read(group, name: str, path: str | Path) -> np.ndarray:
    """Array ``name`` of ``group``: float64 and every chunk stored (zarr would give the fill
    value, 0, for a missing chunk file), read in full."""
    try:
        array = group[name]
    except KeyError:
        raise ModelError(f"model {str(path)!r} has no array {name!r}") from None
    except Exception as exc:  # e.g. an object (pickle) dtype zarr refuses to open
        raise ModelError(f"model {str(path)!r}: array {name!r} cannot be opened "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if array.dtype != np.float64:
        raise ModelError(f"model {str(path)!r}: {name} has dtype {array.dtype}, expected float64")
    try:
        stored, total = array.nchunks_initialized, array.nchunks
        if array.size and stored < total:
            raise _damaged(path, f"array {name!r} has {stored} of its {total} chunk files "
                                 "(zarr would read the missing ones as zeros)")
        return np.asarray(array[...])
    except ModelError:
        raise
    except Exception as exc:  # a truncated or corrupt chunk file: the decoder fails
        raise _damaged(path, f"array {name!r} cannot be read ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
