"""The reduction tree of a pass: the one definition of which partials add up in which order.

A pass over ``n`` chunks yields ``n`` leaves (partial sums, or score statistics); they are
added ``k`` at a time (the fan-in, ``split_every``), level by level: node ``j`` of level
``l`` adds, in order, the nodes ``j·k .. j·k + k − 1`` of level ``l − 1`` that exist. Level 0
is the leaves, and the root is the one node of the top level. Float additions do not
associate, so this shape fixes the bits of the result: every way of computing a pass (the
delayed graph, the in-process sum, a task that folds several chunks, a task per worker's
run of chunks) goes through :class:`Tree` and gives the same sums, bitwise, whichever
worker finishes first.

Nothing here knows what a leaf holds: nodes are added with ``combine(*children)`` (by
default ``+``, left to right).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import dask

from cosim_dask.errors import CosimError

#: The fan-in when neither the option nor Dask's ``split_every`` config sets one.
DEFAULT_SPLIT_EVERY = 8

#: ``(level, index)``: level 0 holds the leaves.
Node = tuple[int, int]


def resolve_split_every(option: int | None = None) -> int:
    """The fan-in of a pass: ``option``, else Dask's ``split_every`` config, else
    :data:`DEFAULT_SPLIT_EVERY`; a whole number of at least 2 (``CosimError`` otherwise)."""
    value, origin = option, "split_every"
    if value is None:
        value, origin = dask.config.get("split_every", None), "Dask's config split_every"
        if value is None:
            return DEFAULT_SPLIT_EVERY
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise CosimError(f"{origin}={value!r} must be a whole number of at least 2 (the "
                         "fan-in of the reduction tree)")
    return int(value)


def add(*parts: Any) -> Any:
    """``parts[0] + parts[1] + ...``, left to right: the default way a node adds."""
    return functools.reduce(operator.add, parts)


@dataclass(frozen=True)
class Tree:
    """The reduction tree over ``leaves`` leaves with fan-in ``fan_in`` (see the module)."""

    leaves: int
    fan_in: int

    def __post_init__(self) -> None:
        if self.leaves < 1:
            raise ValueError(f"a reduction tree needs at least one leaf, got {self.leaves}")
        if self.fan_in < 2:
            raise ValueError(f"fan_in={self.fan_in} must be at least 2")

    def width(self, level: int) -> int:
        """Nodes at ``level``."""
        return -(-self.leaves // self.fan_in**level)

    @property
    def depth(self) -> int:
        """Levels above the leaves: ⌈log_k(n)⌉ (0 for a single leaf, which is the root)."""
        level = 0
        while self.width(level) > 1:
            level += 1
        return level

    @property
    def root(self) -> Node:
        return (self.depth, 0)

    def children(self, node: Node) -> list[Node]:
        """The nodes ``node`` adds, in the order it adds them."""
        level, j = node
        k = self.fan_in
        return [(level - 1, c) for c in range(j * k, min(j * k + k, self.width(level - 1)))]

    def span(self, node: Node) -> tuple[int, int]:
        """The leaves ``[first, stop)`` under ``node``."""
        level, j = node
        size = self.fan_in**level
        return j * size, min((j + 1) * size, self.leaves)

    def fold(self, values: Iterable, start: int = 0, stop: int | None = None,
             combine: Callable = add) -> dict[Node, Any]:
        """Add the leaves ``start .. stop − 1`` (``values``, in order) into every node whose
        leaves all lie in that run; return the largest such nodes, in leaf order.

        Each node is formed as soon as its last child is, so at most ``fan_in`` values per
        level are held at once. Over all leaves the result is ``{root: total}``.
        """
        stop = self.leaves if stop is None else stop
        done: dict[Node, Any] = {}
        for i, value in zip(range(start, stop), values, strict=True):
            node = (0, i)
            done[node] = value
            while node[0] < self.depth:
                parent = (node[0] + 1, node[1] // self.fan_in)
                first, last = self.span(parent)
                if self.children(parent)[-1] != node or first < start or last > stop:
                    break
                done[parent] = combine(*[done.pop(c) for c in self.children(parent)])
                node = parent
        return dict(sorted(done.items(), key=lambda item: self.span(item[0])))

    def top_nodes(self, start: int, stop: int) -> list[Node]:
        """The nodes :meth:`fold` returns for the run ``start .. stop − 1``."""
        return list(self.fold([None] * (stop - start), start, stop, lambda *_: None))

    def build(self, nodes: dict[Node, Any], make_node: Callable[[Node, list], Any]) -> Any:
        """The root, given some nodes (every leaf under one of them): each missing node is
        ``make_node(node, children)``, its children given in order."""

        def value(node: Node) -> Any:
            if node in nodes:
                return nodes[node]
            return make_node(node, [value(c) for c in self.children(node)])

        return value(self.root)

    def sum(self, values: Sequence, combine: Callable = add) -> Any:
        """All leaves added up, in this process."""
        return self.fold(values, combine=combine)[self.root]


def tree_reduce(leaves: list, split_every: int, token: str, combine: Callable = add):
    """The delayed root of the tree over the delayed ``leaves``: combine tasks keyed
    ``cosim-combine-{token}-{level}-{first child}``, never a chain nor one fan-in of all."""
    tree = Tree(len(leaves), split_every)
    return tree.build({(0, i): leaf for i, leaf in enumerate(leaves)},
                      combine_task(tree, token, combine))


def combine_key(tree: Tree, token: str, node: Node) -> str:
    """The key of the task combining ``node``'s children: ``cosim-combine-{token}-{level}-
    {first child}`` (the same name whichever way the graph is written)."""
    level, j = node
    return f"cosim-combine-{token}-{level}-{j * tree.fan_in}"


def combine_task(tree: Tree, token: str, combine: Callable = add) -> Callable[[Node, list], Any]:
    """``make_node`` for :meth:`Tree.build` that makes each missing node a delayed task."""

    def make_node(node: Node, children: list) -> Any:
        return dask.delayed(combine)(*children, dask_key_name=combine_key(tree, token, node))

    return make_node
