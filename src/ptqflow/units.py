"""Model -> reconstruction units and activation-quantizer positions, from the traced graph (graph.md).

BRECQ (Li et al., ICLR 2021, section 3.2) reconstructs block by block: a block is a piece of the network
whose input carries all the state forward. That is a property of the data-flow graph, so it is read off
the ``torch.fx`` trace instead of a table of block classes:

1. **Cut points.** Walking the nodes in topological order, a node after which exactly one value is live
   (computed and still read later) -- itself -- is a cut point: everything after it depends on the input
   only through it. A residual block has no cut inside (its input stays live for the skip), a dense block
   none before its last concatenation, a chain of layers a cut after every op. Between consecutive cut
   points lies a *segment*.
2. **Units.** A segment belongs to the innermost submodule that contains it and whose nodes are exactly a
   run of whole segments (an *aligned* module; containers with the default ``Sequential`` forward and
   leaves do not count). Consecutive segments of one module form a unit named by the module path
   (``layer1.0``, ``features.3``, ``encoder.layers.encoder_layer_2``); segments no such module owns are
   *loose* and consecutive loose segments form one unit (``stem`` first, ``head`` last, the module path
   they share in between). A unit without a conv/linear layer folds into a loose neighbour if it has one,
   else into the previous unit. A network with no aligned module at all (a plain chain, VGG-like) is cut
   into one unit per weight layer.
3. **Placement** (:mod:`ptqflow.ops`): every input of a conv/linear layer or activation matmul is walked
   back through pass-through ops to its producer, which gets one quantizer shared by all its consumers --
   never the image. Each unit records which of its nodes are producers; :mod:`ptqflow.quant.units` inserts
   the quantizers.

In-place ops are rewritten out of place (later readers of the mutated tensor read the op's result, so
values are unchanged) before anything else, so no in-place op can overwrite a tensor a quantizer needs.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from ptqflow import kernels
from ptqflow.attention import decompose_attention
from ptqflow.errors import ModelError
from ptqflow.ops import WEIGHT_MODULES, OpKind, classify_node

__all__ = ["Unit", "UnitModel", "extract_units", "reader_inputs", "trace_model"]

#: What to do when an op cannot be placed (appended to those errors).
FLOAT_LEAF_HINT = "list the module path in base.float_leaves to keep it in float (reported in metrics)"


@dataclass
class Unit:
    """One reconstruction unit of an FP model.

    Attributes:
        name: the unit's module path (``layer1.0``), or ``stem`` / ``head`` (loose ops at the ends).
        kind: ``stem``, ``block``, ``head`` or ``glue`` (loose ops between blocks).
        module: a ``GraphModule`` mapping the unit's input tensor to its output tensor (FP; submodule
            names relative to ``prefix``).
        prefix: the module path the unit's submodule names are relative to (``""``: the model root).
        quantized: names of the nodes of ``module.graph`` whose output gets an activation quantizer.
        float_leaves: module paths inside this unit kept in float on request.
    """

    name: str
    kind: str
    module: torch.fx.GraphModule
    prefix: str = ""
    quantized: tuple[str, ...] = ()
    float_leaves: tuple[str, ...] = field(default_factory=tuple)


class _Tracer(torch.fx.Tracer):
    """fx's default leaves (``torch.nn`` modules) plus the modules the user keeps in float."""

    def __init__(self, float_leaves: frozenset[str]) -> None:
        super().__init__()
        self.float_leaves = float_leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.float_leaves or super().is_leaf_module(m, module_qualified_name)


@contextlib.contextmanager
def _refuse_autograd_functions() -> Iterator[None]:
    """fx traces a custom ``autograd.Function`` through its forward and silently drops its backward;
    stop instead, naming it."""
    original = torch.autograd.Function.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if any(isinstance(a, torch.fx.Proxy) for a in (*args, *kwargs.values())):
            raise ModelError(
                f"custom autograd function {cls.__name__} cannot be traced (its backward would be lost); "
                f"{FLOAT_LEAF_HINT}"
            )
        return original.__func__(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = original


def trace_model(
    model: nn.Module, float_leaves: Sequence[str] = ()
) -> tuple[torch.fx.GraphModule, dict[str, nn.Module]]:
    """Trace ``model`` (a copy: in-place flags are switched off, ``nn.MultiheadAttention`` decomposed by
    :func:`ptqflow.attention.decompose_attention`) into a ``GraphModule`` without in-place ops.

    Returns:
        The graph module and the copy's own modules by path (the graph module's containers are plain
        ``nn.Module`` objects, not the model's classes).

    Raises:
        ModelError: the model cannot be traced, takes several inputs, returns several outputs, or a float
            leaf is not one of its submodules.
    """
    name = type(model).__name__
    modules = dict(model.named_modules())
    for leaf in float_leaves:
        if leaf not in modules or leaf == "":
            raise ModelError(f"base.float_leaves entry {leaf!r} is not a submodule of {name}")
    model = copy.deepcopy(model)
    decompose_attention(model, float_leaves)  # projections and matmuls become visible to placement
    try:
        with _refuse_autograd_functions():
            graph = _Tracer(frozenset(float_leaves)).trace(model)
    except ModelError:
        raise
    except Exception as exc:  # fx raises many types for untraceable control flow
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"model {name} cannot be traced with torch.fx: {first}; make its forward traceable (no "
            f"data-dependent control flow) or {FLOAT_LEAF_HINT}"
        ) from None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ModelError(f"model {name} must take exactly one input, takes {len(placeholders)}")
    (output,) = [n for n in graph.nodes if n.op == "output"]
    if not isinstance(output.args[0], torch.fx.Node):
        raise ModelError(f"model {name} must return one tensor (the logits), returns {type(output.args[0]).__name__}")
    inplace_modules = set()
    for path, module in model.named_modules():
        if getattr(module, "inplace", None) is True:
            inplace_modules.add(path)
            module.inplace = False
    _rewrite_inplace(graph, inplace_modules)
    gm = torch.fx.GraphModule(model, graph)
    gm.graph.eliminate_dead_code()
    gm.meta["float_leaves"] = tuple(float_leaves)
    return gm, dict(model.named_modules())


_INPLACE_FUNCTIONS: dict[Any, Any] = {
    torch.relu_: torch.relu,
    torch.nn.functional.relu_: torch.nn.functional.relu,
    torch.sigmoid_: torch.sigmoid,
    torch.tanh_: torch.tanh,
}


def _rewrite_inplace(graph: torch.fx.Graph, inplace_modules: set[str]) -> None:
    """Turn every in-place op out of place; readers after it of the tensor it mutated read its result."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        mutated = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        inplace = False
        if node.op == "call_method" and isinstance(node.target, str):
            name = node.target
            if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
                node.target = name[:-1]
                inplace = True
        elif node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
            node.target = _INPLACE_FUNCTIONS[node.target]
            inplace = True
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
            inplace = True
        if node.op == "call_module":
            inplace = inplace or str(node.target) in inplace_modules
        if inplace and mutated is not None:
            for user in list(mutated.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(mutated, node)


def _module_of(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack)[-1]).split("@")[0] if stack else ""


def _ancestors(node: torch.fx.Node) -> list[str]:
    """Module paths the node was traced inside, outermost first (a leaf's own path last)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [str(k).split("@")[0] for k in stack]


def _describe(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module {node.target} ({type(modules[str(node.target)]).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    where = _module_of(node)
    return f"{node.op.replace('call_', '')} {target}" + (f" in {where}" if where else "")


def reader_inputs(node: torch.fx.Node, kind: OpKind) -> list[torch.fx.Node]:
    """The activation inputs of a reader: a weight layer's input, or every operand of a matmul."""
    if kind == OpKind.WEIGHT:
        arg = node.args[0] if node.args else node.kwargs.get("input")
        return [arg] if isinstance(arg, torch.fx.Node) else []
    if kind == OpKind.MATMUL:
        args = node.args[1:] if node.target is torch.einsum else node.args
        found: list[torch.fx.Node] = []
        torch.fx.map_arg(args, lambda n: found.append(n) or n)  # type: ignore[func-returns-value]
        return found
    return []


def _attr(gm: torch.fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name, None)


def _pass_sources(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The tensors a pass-through op forwards: its first argument, or every tensor of a concatenated list."""
    if not node.args:
        return []
    first = node.args[0]
    if isinstance(first, list | tuple):
        return [a for a in first if isinstance(a, torch.fx.Node)]
    return [first] if isinstance(first, torch.fx.Node) else []


def _producers(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Every node whose output gets an activation quantizer (graph order), checking every op on the way.

    Raises:
        ModelError: an op that hides weights, a weight module called more than once, or a reader input
            produced by an op in no table.
    """
    modules = dict(gm.named_modules())
    leaves = frozenset(gm.meta.get("float_leaves", ()))
    calls: dict[str, int] = {}
    kinds: dict[torch.fx.Node, OpKind] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        kind = kinds[node] = classify_node(node, modules, leaves)
        if kind == OpKind.UNKNOWN and node.op != "call_module":
            for arg in node.all_input_nodes:
                if arg.op == "get_attr" and getattr(_attr(gm, str(arg.target)), "dim", lambda: 0)() >= 2:
                    kind = OpKind.UNSUPPORTED  # an opaque function of a weight tensor: the weight would stay float
        if kind == OpKind.UNSUPPORTED:
            raise ModelError(f"{_describe(node, modules)} holds weights ptqflow cannot quantize; {FLOAT_LEAF_HINT}")
        if kind == OpKind.WEIGHT:
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
            if calls[str(node.target)] > 1:
                raise ModelError(
                    f"module {node.target} is called more than once; ptqflow quantizes each weight layer once "
                    f"per forward (give each use its own module) or {FLOAT_LEAF_HINT}"
                )
    producers: dict[torch.fx.Node, None] = {}
    seen: set[torch.fx.Node] = set()

    def walk(node: torch.fx.Node, reader: torch.fx.Node) -> None:
        if node.op in ("placeholder", "get_attr") or node in seen:
            return  # the image and constants are never quantized
        seen.add(node)
        kind = kinds[node]
        source = node.args[0] if node.args else None
        if node.target is operator.getitem and isinstance(source, torch.fx.Node) and kinds.get(source) != OpKind.PASS:
            kind = OpKind.COMPUTE  # an item of a computed tuple (a float leaf's outputs): quantize the item
        if kind == OpKind.PASS:
            for source in _pass_sources(node):
                walk(source, reader)
        elif kind == OpKind.UNKNOWN:
            raise ModelError(
                f"{_describe(node, modules)} produces the input of {_describe(reader, modules)} and is in no "
                f"placement table (ptqflow.ops); {FLOAT_LEAF_HINT}"
            )
        else:
            producers[node] = None

    for node, kind in kinds.items():
        for source in reader_inputs(node, kind):
            walk(source, node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(producers, key=order.__getitem__)


def _segments(graph: torch.fx.Graph) -> list[list[torch.fx.Node]]:
    """The nodes between consecutive cut points (get_attr constants excluded), in order."""
    nodes = [n for n in graph.nodes if n.op != "get_attr"]
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users if u in index), default=-1) for n in nodes}
    ending: dict[int, int] = {}
    for n in nodes:
        if last_use[n] >= 0:
            ending[last_use[n]] = ending.get(last_use[n], 0) + 1
    segments: list[list[torch.fx.Node]] = []
    current: list[torch.fx.Node] = []
    live = 0
    for i, n in enumerate(nodes):
        if n.op == "output":
            break
        live += (last_use[n] > i) - ending.get(i, 0)
        if n.op == "placeholder":
            continue
        current.append(n)
        if live == 1 and last_use[n] > i:
            segments.append(current)
            current = []
    if current:
        segments.append(current)
    return segments


def _is_container(module: nn.Module) -> bool:
    if isinstance(module, nn.Sequential):
        return type(module).forward is nn.Sequential.forward
    return isinstance(module, nn.ModuleList | nn.ModuleDict) and type(module).forward is nn.Module.forward


def _owners(segments: list[list[torch.fx.Node]], original: dict[str, nn.Module]) -> list[str | None]:
    """The unit-owning module of each segment (module docstring, step 2), ``None`` for loose segments.

    ``original`` maps module paths to the model's own modules (the trace's containers are plain modules).
    A module is *aligned* when its nodes are exactly a run of whole segments. Units are the outermost aligned
    modules, except that one whose weight layers all lie in two or more aligned submodules (an encoder
    holding its layers, a stage with its own forward) is replaced by those; its remaining ops keep it as
    owner (weight-free, they fold into a neighbour).
    """
    called = {str(n.target) for seg in segments for n in seg if n.op == "call_module"}
    seg_of: dict[str, set[int]] = {}
    count: dict[str, int] = {}
    weights: dict[str, set[torch.fx.Node]] = {}
    for s, seg in enumerate(segments):
        for node in seg:
            is_weight = node.op == "call_module" and type(original.get(str(node.target))) in WEIGHT_MODULES
            for path in dict.fromkeys(_ancestors(node)):
                seg_of.setdefault(path, set()).add(s)
                count[path] = count.get(path, 0) + 1
                if is_weight:
                    weights.setdefault(path, set()).add(node)
    aligned = set()
    for path, segs in seg_of.items():
        lo, hi = min(segs), max(segs)
        module = original.get(path)
        if (
            path
            and module is not None
            and path not in called
            and not _is_container(module)
            and len(segs) == hi - lo + 1
            and sum(len(segments[s]) for s in range(lo, hi + 1)) == count[path]
        ):
            aligned.add(path)

    def inner(path: str) -> list[str]:
        """The outermost aligned modules strictly inside ``path``."""
        below = [p for p in aligned if p.startswith(path + ".")]
        return [p for p in below if not any(p.startswith(q + ".") for q in below)]

    chosen: dict[str, str] = {}  # unit module -> itself; a split module's remnant -> the split module

    def choose(path: str) -> None:
        parts = [p for p in inner(path) if weights.get(p)]
        covered = set().union(*(weights[p] for p in parts)) if parts else set()
        if len(parts) >= 2 and covered == weights.get(path, set()):
            chosen[path] = path  # remnant owner
            for part in inner(path):
                choose(part)
        else:
            chosen[path] = path

    tops = [p for p in aligned if not any(p.startswith(q + ".") for q in aligned if q != p)]
    for top in tops:
        choose(top)
    owners: list[str | None] = []
    for seg in segments:
        common: list[str] | None = None
        for node in seg:
            chain = _ancestors(node)
            common = chain if common is None else [a for a, b in zip(common, chain, strict=False) if a == b]
        owners.append(next((p for p in reversed(common or []) if p in chosen), None))
    return owners


def _has_weight(nodes: Sequence[torch.fx.Node], modules: dict[str, nn.Module]) -> bool:
    return any(n.op == "call_module" and type(modules[str(n.target)]) in WEIGHT_MODULES for n in nodes)


@dataclass
class _Run:
    owner: str | None  # None: loose
    nodes: list[torch.fx.Node]


def _runs(segments: list[list[torch.fx.Node]], owners: list[str | None], modules: dict[str, nn.Module]) -> list[_Run]:
    runs: list[_Run] = []
    for seg, owner in zip(segments, owners, strict=True):
        if runs and runs[-1].owner == owner:
            runs[-1].nodes.extend(seg)
        else:
            runs.append(_Run(owner, list(seg)))
    if all(r.owner is None for r in runs):
        # A plain chain: one unit per weight layer, with the weight-free ops after it (before the first).
        pieces: list[_Run] = []
        for seg in segments:
            if not pieces or (_has_weight(seg, modules) and _has_weight(pieces[-1].nodes, modules)):
                pieces.append(_Run(None, list(seg)))
            else:
                pieces[-1].nodes.extend(seg)
        return pieces
    # Fold weight-free runs into a loose neighbour if there is one, else into the previous run.
    changed = True
    while changed and len(runs) > 1:
        changed = False
        for i, run in enumerate(runs):
            if _has_weight(run.nodes, modules):
                continue
            left = runs[i - 1] if i > 0 else None
            right = runs[i + 1] if i + 1 < len(runs) else None
            if right is not None and right.owner is None and (left is None or left.owner is not None):
                right.nodes[:0] = run.nodes
            elif left is not None:
                left.nodes.extend(run.nodes)
            else:
                assert right is not None
                right.nodes[:0] = run.nodes
            del runs[i]
            changed = True
            break
    return runs


def _common_prefix(nodes: Sequence[torch.fx.Node]) -> str:
    common: list[str] | None = None
    for node in nodes:
        chain = [p for p in _ancestors(node) if not (node.op == "call_module" and p == node.target)]
        common = chain if common is None else [a for a, b in zip(common, chain, strict=False) if a == b]
    return common[-1] if common else ""


def _relative(target: str, prefix: str) -> str:
    return target[len(prefix) + 1 :] if prefix else target


def _plain_matmul(node: torch.fx.Node) -> bool:
    """Whether ``node`` is an activation product ``a @ b`` (``matmul``, ``bmm``, ``@``; not ``einsum``) with two
    positional operands and nothing else, which :func:`ptqflow.kernels.matmul` computes the same way."""
    if node.op == "call_module" or len(node.args) != 2 or node.kwargs or node.target is torch.einsum:
        return False
    return classify_node(node, {}) == OpKind.MATMUL


def _unit_module(
    gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], source: torch.fx.Node, prefix: str
) -> tuple[torch.fx.GraphModule, dict[torch.fx.Node, torch.fx.Node], str]:
    """A GraphModule computing the last of ``nodes`` from ``source``, submodule names relative to ``prefix``."""
    targets = [str(n.target) for n in nodes if n.op == "call_module"]
    targets += [str(a.target) for n in nodes for a in n.all_input_nodes if a.op == "get_attr"]
    if prefix and not all(t.startswith(prefix + ".") for t in targets):
        prefix = ""
    base = gm.get_submodule(prefix) if prefix else gm
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {source: graph.placeholder("x")}

    def lookup(n: torch.fx.Node) -> torch.fx.Node:
        if n not in env:
            if n.op != "get_attr":
                raise ModelError(f"unit reads {n.name} from outside its input; this is a bug in unit extraction")
            env[n] = graph.get_attr(_relative(str(n.target), prefix))
        return env[n]

    for node in nodes:
        new = graph.node_copy(node, lookup)
        if node.op == "call_module":
            new.target = _relative(str(node.target), prefix)
        elif _plain_matmul(node):
            new.op, new.target = "call_function", kernels.matmul  # one thread in portable mode
        env[node] = new
    graph.output(env[nodes[-1]])
    return torch.fx.GraphModule(base, graph), env, prefix


def extract_units(model: nn.Module, float_leaves: Sequence[str] = ()) -> list[Unit]:
    """Split ``model`` (BN already folded) into its reconstruction units (see the module docstring).

    Args:
        model: the FP model; it is not modified.
        float_leaves: module paths kept as opaque float ops (their weights and inner activations float).

    Raises:
        ModelError: the model cannot be traced or holds an op placement cannot handle (the message names
            it and what to do).
    """
    gm, original = trace_model(model, float_leaves)
    modules = dict(gm.named_modules())
    producers = set(_producers(gm))
    segments = _segments(gm.graph)
    if not segments:
        raise ModelError(f"model {type(model).__name__} computes nothing from its input")
    owners = _owners(segments, original)
    runs = _runs(segments, owners, modules)
    (source,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    units: list[Unit] = []
    used_names: set[str] = set()
    for i, run in enumerate(runs):
        loose = run.owner is None
        if loose and i == 0:
            name, kind, prefix = "stem", "stem", ""
        elif loose and i == len(runs) - 1 and i > 0:
            name, kind, prefix = "head", "head", ""
        elif loose:
            prefix = _common_prefix(run.nodes)
            weights = [
                str(n.target)
                for n in run.nodes
                if n.op == "call_module" and type(modules[str(n.target)]) in WEIGHT_MODULES
            ]
            chain = all(r.owner is None for r in runs)  # a plain chain cut per weight layer: name by the layer
            name = (weights[0] if chain and weights else prefix) or (weights[0] if weights else f"glue{i}")
            kind = "block" if chain else "glue"
        else:
            name, kind, prefix = str(run.owner), "block", str(run.owner)
        if name in used_names:
            name = f"{name}#{i}"
        used_names.add(name)
        module, env, unit_prefix = _unit_module(gm, run.nodes, source, prefix)
        quantized = tuple(env[n].name for n in run.nodes if n in producers)
        leaves = tuple(str(n.target) for n in run.nodes if n.op == "call_module" and str(n.target) in float_leaves)
        units.append(Unit(name, kind, module, unit_prefix, quantized, leaves))
        source = run.nodes[-1]
    return units


class UnitModel(nn.Module):
    """A model run as its chain of units: ``forward(x) = units[-1](... units[0](x))``."""

    def __init__(self, units: list[Unit]) -> None:
        super().__init__()
        self.names = [u.name for u in units]
        self.kinds = [u.kind for u in units]
        self.units = nn.ModuleList(u.module for u in units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x

    def forward_collect(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every unit's output, in order (the last one is the logits)."""
        outputs = []
        for unit in self.units:
            x = unit(x)
            outputs.append(x)
        return outputs
