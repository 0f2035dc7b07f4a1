"""Map embeddings through a learned metric: write L·x for every vector (A = LᵀL), so that
plain cosine similarity downstream (a vector database, FAISS) equals the learned similarity.

The input is read memory-mapped and streamed in row blocks, so memory stays bounded whatever
its size; the output is written through the output policy (:mod:`cosim_dask.outputs`): under a
temporary name beside OUT, renamed into place only when every block is done. Sources are
dispatched by kind (:func:`transform_file`): a ``.npy`` array, or a pair store (both sides of
every pair, into a new pair store).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cosim_dask import __version__
from cosim_dask.data.reader import StoreSlice, read_slice
from cosim_dask.data.store import create_store, open_store
from cosim_dask.errors import CosimError, ShapeError
from cosim_dask.fit.model import Model
from cosim_dask.outputs import NPY_ARRAY, claim_output, is_url

#: Rows per block: 65,536 × d = 128 float32 is 32 MB in and out; large enough that the GEMM
#: dominates the Python overhead, small enough to bound memory.
DEFAULT_BLOCK_ROWS = 65536
#: Called with the number of rows (vectors, or pairs of a store) done after each block.
Progress = Callable[[int], None]


@dataclass
class TransformReport:
    """What a transform wrote."""

    path: str
    rows: int
    in_dim: int
    out_dim: int
    dtype: str
    store: bool = False  # a pair store was transformed (else a .npy array)


def transform_block(L: np.ndarray, block: np.ndarray) -> np.ndarray:
    """``block @ Lᵀ``: rows x ↦ L x.

    Parameters
    ----------
    L : (k, d) components (A = LᵀL)
    block : (b, d) vectors

    Returns
    -------
    (b, k) array in the block's float dtype (float16 is computed in float32)
    """
    dtype = np.float32 if block.dtype in (np.float16, np.float32) else np.float64
    return np.asarray(block, dtype=dtype) @ L.T.astype(dtype)


def _blocks(array: np.ndarray, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    for lo in range(0, array.shape[0], block_rows):
        yield lo, np.asarray(array[lo : lo + block_rows])


def open_embeddings(path: str | os.PathLike) -> np.ndarray:
    """A ``.npy`` array of vectors (n, d), memory-mapped; one-line errors for bad input."""
    path = Path(path)
    if not path.exists():
        raise CosimError(f"input {str(path)!r} does not exist")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise CosimError(f"input {str(path)!r} is not a .npy array: {exc}") from None
    if not isinstance(array, np.ndarray):
        raise CosimError(f"input {str(path)!r} is an .npz archive; pass one .npy array")
    if array.ndim != 2:
        raise ShapeError(f"input {str(path)!r} must be 2-D (n_vectors, n_features); "
                         f"got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise CosimError(f"input {str(path)!r} has dtype {array.dtype}; expected float16, "
                         "float32 or float64 vectors")
    return array


def transform_file(
    model: Model,
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    inputs: Iterable[str | os.PathLike] = (),
    progress: Progress | None = None,
) -> TransformReport:
    """Write ``L x`` for every vector of ``src`` to the ``.npy`` file ``out``.

    Parameters
    ----------
    model : the learned metric; L = ``model.components()`` (k, d)
    src : a ``.npy`` array (n, d) of float vectors, read memory-mapped
    out : the output ``.npy`` path, (n, k), float32 for float16/float32 input, else float64
    overwrite : replace an existing ``out``
    block_rows : rows per block (bounds memory)
    inputs : other files the command reads (the model's path): ``out`` may not be one of
        them, nor ``src`` (the output policy, :mod:`cosim_dask.outputs`)
    progress : called with the rows done after each block (for a store: pairs per chunk)

    Raises
    ------
    CosimError
        missing or malformed input, d different from the model's, an existing ``out``
        without ``overwrite``, NaN/Inf in the input (named by row; nothing is written).
    """
    if block_rows < 1:
        raise CosimError(f"block_rows={block_rows} must be >= 1")
    if is_url(src) or Path(src).is_dir():
        return transform_store(model, src, out, overwrite=overwrite, inputs=inputs,
                               progress=progress)
    array = open_embeddings(src)
    n, d = array.shape
    if d != model.d:
        raise ShapeError(f"the model has d={model.d} but input {str(src)!r} has {d} features "
                         f"per vector (shape {array.shape})")
    L = model.components()
    out_dtype = np.float32 if array.dtype in (np.float16, np.float32) else np.float64
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(out_dtype)),
              "fortran_order": False, "shape": (n, L.shape[0])}
    with claim_output(out, NPY_ARRAY, overwrite=overwrite, inputs=[src, *inputs]) as target, \
            target.staged() as tmp, open(tmp, "wb") as f:
        # Written block by block with plain writes (bounded memory for any n); never a
        # memory map of a sparse file, on which a full disk is a SIGBUS instead of ENOSPC.
        np.lib.format.write_array_header_2_0(f, header)
        for lo, block in _blocks(array, block_rows):
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                raise CosimError(f"input {str(src)!r} has NaN or Inf values (first at row "
                                 f"{lo + int(np.argmin(finite))}); nothing was written")
            f.write(np.ascontiguousarray(transform_block(L, block), dtype=out_dtype).data)
            if progress is not None:
                progress(len(block))
    return TransformReport(str(out), n, d, L.shape[0], np.dtype(out_dtype).name)


def transform_store(
    model: Model, src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (), progress: Progress | None = None,
) -> TransformReport:
    """Write a new pair store with ``L x`` and ``L y`` for every pair of the store ``src``
    (same targets, same chunking), chunk by chunk in bounded memory.

    Training on the result with plain cosine (A = I) sees the learned similarities; a
    generated store's hidden metric is not carried over (it describes the old space).
    """
    store = open_store(src)
    if store.d != model.d:
        raise ShapeError(f"the model has d={model.d} but the pair store {str(src)!r} has "
                         f"d={store.d}")
    L = model.components()
    provenance = {"command": "transform", "source": str(src),
                  "model": model.attrs.get("run_id"), "cosim_version": __version__}
    with create_store(out, d=L.shape[0], chunk_rows=store.chunk_rows, targets=store.targets,
                      provenance=provenance, overwrite=overwrite,
                      inputs=[src, *inputs]) as writer:
        for i, s in enumerate(store.chunk_slices()):
            # The readers' one path: chunk files checked (a missing one is an error, not
            # zeros) and the store checked to be the one opened above.
            x, y, t = read_slice(StoreSlice(store.source, i, s.start, s.stop, store.fingerprint))
            writer.append(transform_block(L, x), transform_block(L, y), t)
            if progress is not None:
                progress(len(t))
    return TransformReport(str(out), store.n, store.d, L.shape[0], "float32", store=True)
