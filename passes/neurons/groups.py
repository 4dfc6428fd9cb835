"""Channel dependency groups (DepGraph semantics) over an ONNX graph.

``analyze(graph)`` walks the nodes in topological order and asks the handler of each
op type (``handlers.HANDLERS``, an explicit table) what happens to the channels of
its inputs: a *producer* (Conv, Gemm, MatMul with a constant weight) creates new
channel atoms; a pass-through op moves them to its outputs; an elementwise op between
two tracked tensors *couples* them (position ``p`` of one is removed together with
position ``p`` of the other); a *consumer* (the input side of Conv/Gemm/MatMul)
absorbs them. Anything an op cannot rewrite exactly *pins* the atoms it touches,
with a reason; so does an op without a handler ("op X not handled"), a graph output,
or a subgraph that reads the tensor.

``ChannelGraph.finish`` then builds:

- *classes*: atoms that must go together (union-find over couplings);
- *groups*: producers joined by couplings or by a grouped-Conv constraint (all
  channel groups of a grouped Conv must lose the same number of channels), each with
  its classes, its blocking reasons and its buckets of equal removal.

Nothing here changes the graph; ``rewrite.py`` applies a selection.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.neurons.layout import Dims, Layout, infer_shapes

MAX_REASONS = 3
log = logging.getLogger(__name__)


@dataclass
class Producer:
    """One node's output channels: atoms ``base .. base + size``."""

    name: str
    op: str  # op type, or "untracked" for channels of unknown origin (never pruned)
    base: int
    size: int
    node: gs.Node | None = None


@dataclass
class Sink:
    """A consumer input where tracked channels end (Conv / Gemm / MatMul input)."""

    node: gs.Node
    index: int
    layout: Layout


@dataclass
class MacTerm:
    """MACs of one node; they scale with the kept fraction of ``inputs``/``output``."""

    node: gs.Node
    inputs: Layout | None
    output: Layout | None


@dataclass
class Contribution:
    """Weights removed with each position of ``atoms``: ``magnitudes(norm)`` gives
    sum |w| (``"l1"``) or sum w^2 (``"l2"``) per position."""

    atoms: np.ndarray
    magnitudes: Callable[[str], np.ndarray]


@dataclass
class Group:
    """Producers whose channels are pruned together."""

    index: int
    producers: list[Producer]
    classes: np.ndarray  # the class roots (atom ids), one per prunable channel
    reasons: list[str] = field(default_factory=list)
    buckets: list[np.ndarray] = field(default_factory=list)  # class indices, equal removal
    free: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def blocked(self) -> bool:
        return bool(self.reasons)

    @property
    def size(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        names = [p.name for p in self.producers if p.op != "untracked"]
        shown = ", ".join(names[:4]) + (f" +{len(names) - 4} more" if len(names) > 4 else "")
        return shown or "untracked channels"


class ChannelGraph:
    """Mutable state of the analysis; handlers call its methods."""

    def __init__(
        self,
        graph: gs.Graph,
        shapes: dict[str, Dims | None],
        *,
        track_constants: bool = False,
        exclude: Sequence[str] = (),
        heads: bool = True,
    ) -> None:
        self.graph = graph
        self.shapes = shapes
        self.opset = int(graph.opset or 1)
        self.track_constants = track_constants
        self.exclude = tuple(exclude)
        self.heads = heads  # attention: remove whole heads (else the same dims of every head)
        self.layouts: dict[str, Layout] = {}
        self.producers: list[Producer] = []
        self.owner: list[int] = []  # atom -> producer index
        self.unions: list[tuple[np.ndarray, np.ndarray]] = []
        self.pins: list[tuple[np.ndarray, str]] = []
        self.constraints: list[tuple[list[np.ndarray], str]] = []
        self.sinks: list[Sink] = []
        self.mac_terms: list[MacTerm] = []
        self.contributions: list[Contribution] = []
        self.groups: list[Group] = []
        self.atom_group = np.zeros(0, dtype=np.int64)
        self.atom_class = np.zeros(0, dtype=np.int64)

    # -------------------------------------------------------------- queries

    def layout(self, tensor: gs.Tensor) -> Layout | None:
        if tensor is None or tensor.is_empty():
            return None
        return self.layouts.get(tensor.name)

    def dims(self, tensor: gs.Tensor) -> Dims | None:
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in tensor.shape)
        return self.shapes.get(tensor.name)

    def rank(self, tensor: gs.Tensor) -> int | None:
        if tensor is None or tensor.is_empty():
            return None
        layout = self.layout(tensor)
        if layout is not None:
            return layout.rank
        dims = self.dims(tensor)
        return len(dims) if dims is not None else None

    # -------------------------------------------------------------- building

    def set_layout(self, tensor: gs.Tensor, layout: Layout) -> None:
        if not tensor.is_empty():
            self.layouts[tensor.name] = layout

    def new_producer(
        self, node: gs.Node | None, size: int, axis: int, rank: int, const: np.ndarray | None
    ) -> Layout:
        """Fresh atoms for ``size`` output channels of ``node`` (its output 0)."""
        base = len(self.owner)
        op = node.op if node is not None else "untracked"
        name = (node.name or node.outputs[0].name) if node is not None else "untracked"
        self.producers.append(Producer(name, op, base, size, node))
        self.owner.extend([len(self.producers) - 1] * size)
        atoms = np.arange(base, base + size, dtype=np.int64)
        if const is None or not self.track_constants:
            const = np.zeros(size, dtype=bool)
        layout = Layout(axis, rank, atoms, np.asarray(const, dtype=bool))
        if node is not None:
            self.set_layout(node.outputs[0], layout)
            if self.exclude and any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
                self.pin(layout, f"{name} matches exclude=")
        return layout

    def untracked(self, size: int, axis: int, rank: int, reason: str) -> Layout:
        """Positions of unknown origin inside a tracked tensor (e.g. a Concat part)."""
        layout = self.new_producer(None, size, axis, rank, None)
        self.pin(layout, reason)
        return layout

    def couple(self, a: Layout, b: Layout) -> None:
        """Position p of ``a`` and of ``b`` must be removed together."""
        self.unions.append((a.atoms, b.atoms))

    def pin(self, layout: Layout | np.ndarray, reason: str) -> None:
        atoms = layout.atoms if isinstance(layout, Layout) else layout
        self.pins.append((np.asarray(atoms), reason))

    def block(self, node: gs.Node, reason: str) -> None:
        """Pin every tracked input of ``node``; its outputs stay untracked."""
        for tensor in node.inputs:
            layout = self.layout(tensor)
            if layout is not None:
                self.pin(layout, f"{_label(node)}: {reason}")

    def constrain(self, chunks: list[np.ndarray], reason: str) -> None:
        """Each chunk (atoms) must lose the same number of channels."""
        self.constraints.append((chunks, reason))

    def sink(self, node: gs.Node, index: int, layout: Layout) -> None:
        self.sinks.append(Sink(node, index, layout))

    def mac_term(self, node: gs.Node, inputs: Layout | None, output: Layout | None) -> None:
        self.mac_terms.append(MacTerm(node, inputs, output))

    def contribute(self, atoms: np.ndarray, magnitudes: Callable[[str], np.ndarray]) -> None:
        self.contributions.append(Contribution(atoms, magnitudes))

    # -------------------------------------------------------------- finishing

    def finish(self) -> None:
        """Resolve couplings, pins and constraints into groups and classes."""
        count = len(self.owner)
        owner = np.asarray(self.owner, dtype=np.int64)
        roots = _union_roots(count, self.unions)
        joined = _UnionFind(len(self.producers))
        for atom in np.flatnonzero(roots != np.arange(count)):
            joined.union(int(owner[atom]), int(owner[roots[atom]]))
        for chunks, _ in self.constraints:
            members = np.unique(owner[np.concatenate(chunks)]) if chunks else []
            for other in members[1:]:
                joined.union(int(members[0]), int(other))
        group_of_producer = np.array([joined.find(i) for i in range(len(self.producers))])
        self._build_groups(roots, owner, group_of_producer)
        self._apply_pins()
        self._apply_constraints()

    def _build_groups(self, roots: np.ndarray, owner: np.ndarray, gop: np.ndarray) -> None:
        order: dict[int, int] = {}
        for root in gop:
            order.setdefault(int(root), len(order))
        self.atom_group = np.array([order[int(gop[o])] for o in owner], dtype=np.int64)
        self.atom_class = np.zeros(len(owner), dtype=np.int64)
        members: list[list[Producer]] = [[] for _ in order]
        for producer_index, root in enumerate(gop):
            members[order[int(root)]].append(self.producers[producer_index])
        self.groups = []
        for index, producers in enumerate(members):
            atoms = np.flatnonzero(self.atom_group == index)
            classes, inverse = np.unique(roots[atoms], return_inverse=True)
            self.atom_class[atoms] = inverse
            self.groups.append(Group(index, producers, classes, free=np.arange(len(classes))))

    def _apply_pins(self) -> None:
        for atoms, reason in self.pins:
            for index in np.unique(self.atom_group[atoms]) if len(atoms) else []:
                _add_reason(self.groups[int(index)], reason)

    def _apply_constraints(self) -> None:
        by_group: dict[int, list[tuple[list[np.ndarray], str]]] = {}
        for chunks, reason in self.constraints:
            if not chunks or not len(chunks[0]):
                continue
            index = int(self.atom_group[chunks[0][0]])
            by_group.setdefault(index, []).append((chunks, reason))
        for index, constraints in by_group.items():
            group = self.groups[index]
            problem = _bucketize(group, [[self.atom_class[c] for c in ch] for ch, _ in constraints])
            if problem:
                _add_reason(group, f"{constraints[0][1]}: {problem}")


# ---------------------------------------------------------------------------- helpers


def _label(node: gs.Node) -> str:
    return f"{node.op} {node.name or node.outputs[0].name!r}"


def _add_reason(group: Group, reason: str) -> None:
    if reason not in group.reasons and len(group.reasons) < MAX_REASONS:
        group.reasons.append(reason)


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        parent = self.parent
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _union_roots(count: int, unions: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    uf = _UnionFind(count)
    for a, b in unions:
        for x, y in set(zip(a.tolist(), b.tolist())):
            if x != y:
                uf.union(x, y)
    return np.array([uf.find(i) for i in range(count)], dtype=np.int64)


def _bucketize(group: Group, constraints: list[list[np.ndarray]]) -> str | None:
    """Split the group's classes into buckets that each lose the same number of
    channels, so that every constraint's chunks do; return a problem or None.

    Per constraint, a class present equally often in every chunk (or in none) is
    free: removing it removes as much from each chunk. A class present in a single
    chunk is labelled with that chunk when it occupies the constraint's usual number
    of positions there (a channel shuffle ahead of a grouped Conv puts each class
    ``g`` times in one chunk). A class straddling two chunks (136 shuffled channels
    in 4 Conv groups of 34) is *fixed*: never removed, it stays on its boundary.
    Buckets are trimmed to the smallest one (the extra classes are fixed too); when
    the buckets cannot all lose the same count evenly, the best even subset is kept.
    """
    labels = np.full((group.size, len(constraints)), -1, dtype=np.int64)
    fixed = np.zeros(group.size, dtype=bool)
    for k, chunks in enumerate(constraints):
        counts = np.zeros((group.size, len(chunks)), dtype=np.int64)
        for c, classes in enumerate(chunks):
            np.add.at(counts[:, c], classes, 1)
        balanced = np.all(counts == counts[:, :1], axis=1)
        single = ((counts > 0).sum(axis=1) == 1) & ~balanced
        if single.any():
            multiplicity = counts[single].max(axis=1)
            usual = Counter(multiplicity.tolist()).most_common(1)[0][0]
            single[np.flatnonzero(single)[multiplicity != usual]] = False
        fixed |= ~balanced & ~single
        labels[single, k] = counts[single].argmax(axis=1)
    labels[fixed] = -2
    keys, inverse = np.unique(labels, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    constrained = [i for i, key in enumerate(keys) if np.all(key >= -1) and np.any(key != -1)]
    sizes = [len(chunks) for chunks in constraints]
    if not _even(keys[constrained], sizes):
        constrained = _even_subset(keys, constrained, inverse, sizes)
        if not constrained:
            return "its channel groups cannot be pruned evenly"
    buckets = [np.flatnonzero(inverse == i) for i in constrained]
    if buckets:
        smallest = min(len(b) for b in buckets)
        buckets = [b[:smallest] for b in buckets]
    group.buckets = buckets
    group.free = np.flatnonzero(np.all(labels == -1, axis=1))
    if not len(group.free) and not any(len(b) for b in buckets):
        return "every channel spans its channel groups unevenly"
    return None


def _even(keys: np.ndarray, sizes: list[int]) -> bool:
    """Every chunk of every constraint is labelled by as many of these buckets."""
    for k, size in enumerate(sizes):
        column = keys[:, k] if len(keys) else np.zeros(0, dtype=np.int64)
        counts = np.bincount(column[column >= 0], minlength=size)
        if len(set(counts.tolist())) > 1:
            return False
    return True


MAX_SUBSET_SEARCH = 16


def _even_subset(keys, constrained: list[int], inverse, sizes: list[int]) -> list[int]:
    """The buckets to remove from when not all of them can be (Sum residuals tying
    stages whose grouped Convs cut the channels differently): the even subset with the
    most removable channels; the others are fixed. Empty when none is small enough
    to search or even."""
    if len(constrained) > MAX_SUBSET_SEARCH:
        return []
    size_of = {i: int(np.sum(inverse == i)) for i in constrained}
    best, best_capacity = [], 0
    for mask in range(1, 2 ** len(constrained)):
        subset = [b for j, b in enumerate(constrained) if mask >> j & 1]
        capacity = len(subset) * min(size_of[b] for b in subset)
        if capacity > best_capacity and _even(keys[subset], sizes):
            best, best_capacity = subset, capacity
    return best


def toposorted(graph: gs.Graph) -> list[gs.Node]:
    """The main graph's nodes in topological order (stable for sorted graphs)."""
    produced_by = {id(out): node for node in graph.nodes for out in node.outputs}
    done: set[int] = set()
    order: list[gs.Node] = []
    for start in graph.nodes:
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if id(node) in done:
                continue
            if expanded:
                done.add(id(node))
                order.append(node)
                continue
            stack.append((node, True))
            for tensor in node.inputs:
                parent = produced_by.get(id(tensor))
                if parent is not None and id(parent) not in done:
                    stack.append((parent, False))
    return order


def outer_names(node: gs.Node) -> set[str]:
    """Names of tensors a node's subgraphs read from the enclosing scope."""
    names: set[str] = set()
    for value in node.attrs.values():
        graphs = value if isinstance(value, list) else [value]
        for sub in graphs:
            if isinstance(sub, gs.Graph):
                inner = {t.name for n in sub.nodes for t in n.outputs} | {
                    t.name for t in sub.inputs
                }
                for inner_node in sub.nodes:
                    names |= {t.name for t in inner_node.inputs} - inner
                    names |= outer_names(inner_node)
    return names


def _try_handle(handler, node: gs.Node, cg: ChannelGraph) -> None:
    """Run one handler; a handler bug blocks what the node touches instead of
    failing the whole pass (logged with its traceback at debug level)."""
    try:
        handler(node, cg)
    except Exception as exc:
        log.debug("channel handler for %s %r failed", node.op, node.name, exc_info=True)
        reason = f"internal error in the {node.op} handler ({type(exc).__name__}: {exc})"
        cg.block(node, reason)
        for tensor in node.outputs:
            layout = cg.layouts.pop(tensor.name, None)
            if layout is not None:
                cg.pin(layout, f"{_label(node)}: {reason}")


def analyze(
    graph: gs.Graph,
    *,
    track_constants: bool = False,
    exclude: Sequence[str] = (),
    shapes: dict[str, Dims | None] | None = None,
    heads: bool = True,
) -> ChannelGraph:
    """Channel groups of ``graph``; never raises on an unknown op (it blocks)."""
    from onnxopt.passes.neurons.handlers import HANDLERS

    cg = ChannelGraph(
        graph,
        shapes if shapes is not None else infer_shapes(graph),
        track_constants=track_constants,
        exclude=exclude,
        heads=heads,
    )
    for node in toposorted(graph):
        captured = outer_names(node)
        for name in captured & set(cg.layouts):
            cg.pin(cg.layouts[name], f"read inside a subgraph of {_label(node)}")
        handler = HANDLERS.get(node.op) if node.domain in ("", "ai.onnx", None) else None
        if handler is None:
            op = node.op if node.domain in ("", "ai.onnx", None) else f"{node.domain}.{node.op}"
            cg.block(node, f"op {op} not handled")
            continue
        _try_handle(handler, node, cg)
    for tensor in graph.outputs:
        layout = cg.layout(tensor)
        if layout is not None:
            cg.pin(layout, f"reaches graph output {tensor.name!r}")
    cg.finish()
    return cg
