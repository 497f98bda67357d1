"""Model structure -> reconstruction units (BRECQ section 3.2: stem, one unit per block, head).

The model is traced with ``torch.fx``, treating every registered block type
(:func:`ptqflow.quant.units.registered_block_types`) as a leaf. The top-level graph must then be a
chain; each block call is a unit and the operations between blocks (stem before the first, head after
the last, glue in between) become small ``GraphModule`` units. Nothing here depends on a particular
model class, so torchvision ResNets, MobileNetV2 and the embedded nets share one code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from ptqflow.errors import ModelError
from ptqflow.quant.units import registered_block_types

__all__ = ["Unit", "UnitModel", "extract_units"]


@dataclass
class Unit:
    """One reconstruction unit of an FP model.

    Attributes:
        name: the block's qualified module name (``layer1.0``), or ``stem`` / ``head`` / ``glueN``.
        kind: ``stem``, ``block``, ``head`` or ``glue``.
        module: the FP module; calling it maps the unit's input tensor to its output tensor.
    """

    name: str
    kind: str
    module: nn.Module


class _BlockLeafTracer(torch.fx.Tracer):
    def __init__(self, leaves: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


def _node_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []

    def visit(n: torch.fx.Node) -> torch.fx.Node:
        found.append(n)
        return n

    torch.fx.map_arg((node.args, node.kwargs), visit)
    return found


def _segment(
    root: nn.Module, nodes: list[torch.fx.Node], source: torch.fx.Node, result: torch.fx.Node
) -> torch.fx.GraphModule:
    """A GraphModule computing ``result`` from ``source`` with ``nodes`` (which must form a chain)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {source: graph.placeholder("x")}
    for node in nodes:
        for dep in _node_inputs(node):
            if dep not in env:
                raise ModelError(
                    f"model is not a chain of units: {node.name} reads {dep.name}, which is not the output "
                    "of the previous unit; register its block type or use a supported model"
                )
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[result])
    return torch.fx.GraphModule(root, graph)


def extract_units(model: nn.Module) -> list[Unit]:
    """Split ``model`` into its chain of reconstruction units (see the module docstring).

    Raises:
        ModelError: the model cannot be traced, has several inputs, or is not a chain of units.
    """
    leaves = registered_block_types()
    try:
        graph = _BlockLeafTracer(leaves).trace(model)
    except Exception as exc:  # fx raises many types for untraceable control flow
        raise ModelError(f"model {type(model).__name__} cannot be traced with torch.fx: {exc}") from None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ModelError(f"model {type(model).__name__} must take exactly one input, takes {len(placeholders)}")
    modules = dict(model.named_modules())
    units: list[Unit] = []
    pending: list[torch.fx.Node] = []
    source = placeholders[0]

    def flush(result: torch.fx.Node, last: bool) -> None:
        nonlocal pending
        if pending:
            if not units:
                name, kind = "stem", "stem"
            elif last:
                name, kind = "head", "head"
            else:
                name = f"glue{sum(u.kind == 'glue' for u in units)}"
                kind = "glue"
            units.append(Unit(name, kind, _segment(model, pending, source, result)))
        elif result is not source:
            raise ModelError(f"model is not a chain of units at {result.name}")
        pending = []

    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            (result,) = _node_inputs(node)
            flush(result, last=True)
            break
        if node.op == "call_module" and isinstance(modules[node.target], leaves):
            inputs = _node_inputs(node)
            if len(inputs) != 1:
                raise ModelError(f"block {node.target} takes {len(inputs)} inputs; a unit takes one")
            flush(inputs[0], last=False)
            units.append(Unit(str(node.target), "block", modules[node.target]))
            source = node
        else:
            pending.append(node)
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
