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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelError
from .outputs import MODEL, Output, claim_output, recover

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


def write_model(target: Output, model: Model) -> None:
    """Write ``model`` as a new version of the claimed output ``target`` (a run that holds
    its output for checkpoints writes each one with this)."""
    import zarr

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
    z = group.create_array(name, shape=array.shape, dtype="float64",
                           chunks=array.shape or None, compressors=None)
    z[...] = array


def load_model(path: str | os.PathLike, *, with_solver: bool = False) -> Model:
    """Read a model written by :func:`save_model`; :class:`ModelError` when it is not one."""
    import zarr

    recover(path)  # a swap a killed writer left half done
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model {str(path)!r} does not exist; train one with `cosim train`")
    try:
        root = zarr.open_group(path, mode="r")
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
    if not isinstance(d, int) or A.shape != (d, d):
        raise ModelError(f"model {str(path)!r}: A has shape {A.shape}, expected d={d!r}")
    if not np.isfinite(A).all():
        raise ModelError(f"model {str(path)!r}: A has NaN or Inf entries")
    M = _read(root, "M", path) if "M" in root else None
    if M is not None and (M.ndim != 2 or M.shape[1] != d):
        raise ModelError(f"model {str(path)!r}: M has shape {M.shape}, expected (k, {d})")
    state = None
    if with_solver and "solver" in root:
        group = root["solver"]
        state = dict(group.attrs)
        for name in group.array_keys():
            state[name] = _read(group, name, path)
    return Model(A=A, M=M, attrs=attrs, solver_state=state)


def _read(group, name: str, path: Path) -> np.ndarray:
    try:
        array = group[name]
    except KeyError:
        raise ModelError(f"model {str(path)!r} has no array {name!r}") from None
    except Exception as exc:  # e.g. an object (pickle) dtype zarr refuses to open
        raise ModelError(f"model {str(path)!r}: array {name!r} cannot be opened "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if array.dtype != np.float64:
        raise ModelError(f"model {str(path)!r}: {name} has dtype {array.dtype}, expected float64")
    return np.asarray(array[...])
