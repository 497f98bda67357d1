"""Does ptqflow quantize this model? The checks of the zoo coverage table (README, "Any model").

:func:`check_model` runs, on random or real weights and one small batch:

1. units and quantizers: unit extraction (:mod:`ptqflow.units`), weight and activation quantizers counted;
2. the silent-float check, structural: every input of every conv/linear layer and activation matmul walks
   back through pass-through ops to an activation quantizer (:meth:`QuantModel.unquantized_inputs`);
3. the distinct-value probe (graph.md, "How to know it is right"): weights in float, activations
   quantized at A bits, every such reader input holds at most ``sum 2^b`` distinct values over the
   quantizers it reads from (a float activation has thousands). Inputs behind an average pooling are
   not probed: BRECQ/QDrop quantize before that pooling, so its output is off the grid by design;
4. FP equivalence: with quantization switched off the quantized model equals the BN-folded FP model;
5. a 2-iteration QDrop reconstruction over every unit (finite losses);
6. the ONNX QDQ export, run in onnxruntime (graph optimisations off: float semantics) against the torch
   fake-quant logits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from ptqflow.features import FeatureStore, FeatureStoreWriter, extract_features
from ptqflow.fold import fold_bn
from ptqflow.ops import OpKind, averages, classify_function, classify_method, classify_module
from ptqflow.quant.model import QuantConfig, QuantModel, build_quant_model, calibrate_activations
from ptqflow.quant.quantizer import ActQuantizer, lp_range_search
from ptqflow.quant.units import QuantLayer, QuantUnit
from ptqflow.recon.reconstruct import ReconConfig, reconstruct
from ptqflow.units import extract_units, reader_inputs

__all__ = ["CoverageReport", "check_model"]

CPU = torch.device("cpu")


@dataclass
class CoverageReport:
    """What :func:`check_model` measured (a JSON-ready dict via :meth:`to_json`)."""

    units: int = 0
    blocks: int = 0
    weight_quantizers: int = 0
    act_quantizers: int = 0
    unquantized: list[str] = field(default_factory=list)
    probed: int = 0
    probe_violations: list[str] = field(default_factory=list)
    fp_max_abs_diff: float = float("nan")
    recon_steps: int = 0
    recon_finite: bool = False
    onnx_agreement: float = float("nan")
    onnx_max_abs_diff: float = float("nan")
    float_leaves: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """Every check passed (the export counts only if it was run)."""
        return (
            not self.unquantized
            and not self.probe_violations
            and self.fp_max_abs_diff <= 1e-5
            and self.recon_finite
            and (self.onnx_agreement != self.onnx_agreement or self.onnx_agreement == 100.0)
        )

    def to_json(self) -> dict[str, Any]:
        """Plain numbers and lists."""
        return {**asdict(self), "passed": self.passed}


def _min_max_weights(model: QuantModel) -> None:
    """One-candidate (min/max) weight ranges: the 80-candidate Lp search over a large net is most of a
    smoke run's time, and these checks are about placement, not range quality."""
    for _, layer in model.quant_layers():
        q, w = layer.weight_quantizer, layer.layer.weight
        scale, zero = lp_range_search(w.detach().reshape(w.shape[0], -1), q.bits, steps=1)
        q.scale.copy_(scale)
        q.zero_point.copy_(zero)


def _node_kind(node: torch.fx.Node, modules: dict[str, nn.Module]) -> OpKind:
    if node.op == "call_module":
        return classify_module(modules[str(node.target)])
    if node.op == "call_function":
        return classify_function(node.target)
    if node.op == "call_method":
        return classify_method(str(node.target))
    return OpKind.COMPUTE


def _sources(units: list[QuantUnit], index: int, node: torch.fx.Node) -> tuple[list[ActQuantizer], bool]:
    """The quantizers a reader input comes from through pass-through ops, and whether one averages."""
    modules = dict(units[index].body.named_modules())
    if node.op == "placeholder":
        if index == 0:
            return [], False
        (output,) = [n for n in units[index - 1].body.graph.nodes if n.op == "output"]
        return _sources(units, index - 1, output.args[0])
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    if isinstance(module, ActQuantizer):
        return [module], False
    if node.op == "get_attr" or _node_kind(node, modules) != OpKind.PASS:
        return [], False
    averaged = averages(node.op, node.target, module)
    found: list[ActQuantizer] = []
    first = node.args[0] if node.args else None
    for arg in first if isinstance(first, list | tuple) else [first]:
        if isinstance(arg, torch.fx.Node):
            quantizers, avg = _sources(units, index, arg)
            found += quantizers
            averaged = averaged or avg
    return found, averaged


class _Recorder(torch.fx.Interpreter):
    """Runs a unit's graph and keeps the activation inputs of its readers."""

    def __init__(self, unit: QuantUnit) -> None:
        super().__init__(unit.body)
        self.modules = dict(unit.body.named_modules())
        self.seen: dict[torch.fx.Node, list[torch.Tensor]] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        module = self.modules.get(str(n.target)) if n.op == "call_module" else None
        kind = OpKind.WEIGHT if isinstance(module, QuantLayer) else None
        if n.op in ("call_function", "call_method") and _node_kind(n, self.modules) == OpKind.MATMUL:
            kind = OpKind.MATMUL
        if kind is not None:
            self.seen[n] = [self.env[s] for s in reader_inputs(n, kind) if s in self.env]
        return super().run_node(n)


@torch.no_grad()
def _probe(model: QuantModel, x: torch.Tensor) -> tuple[int, list[str]]:
    """The distinct-value probe (module docstring, item 3): readers probed, readers over their bound."""
    units = [unit for _, unit in model.named_units()]
    model.set_quant_state(weight=False, act=True)
    probed, violations = 0, []
    try:
        h = x
        for index, (unit_name, unit) in enumerate(model.named_units()):
            recorder = _Recorder(unit)
            out = recorder.run(h)
            for node, tensors in recorder.seen.items():
                kind = OpKind.WEIGHT if node.op == "call_module" else OpKind.MATMUL
                for source, tensor in zip(reader_inputs(node, kind), tensors, strict=False):
                    quantizers, averaged = _sources(units, index, source)
                    if averaged or not quantizers:
                        continue  # behind an average pooling, or the image
                    bound = sum(2**q.bits for q in {id(q): q for q in quantizers}.values())
                    probed += 1
                    distinct = int(torch.unique(tensor[:1]).numel())
                    if distinct > bound:
                        violations.append(f"{unit_name}.{node.target}: {distinct} values > {bound}")
            h = out
    finally:
        model.set_quant_state(weight=True, act=True)
    return probed, violations


def check_model(
    model: nn.Module,
    example: torch.Tensor,
    workdir: Path,
    *,
    weight_bits: int = 4,
    act_bits: int = 4,
    recon_iters: int = 2,
    export: bool = True,
    float_leaves: Sequence[str] = (),
) -> CoverageReport:
    """Run the coverage checks (module docstring) on ``model`` with the batch ``example``.

    Args:
        model: an FP classifier (eval mode is set on a copy; the model itself is not modified).
        example: ``(N, C, H, W)`` inputs, N >= 2 (calibration, reconstruction and every comparison use it).
        workdir: an empty folder for the feature store and nothing else.
        weight_bits: weight bits (first and last layer at 8, QDrop's convention).
        act_bits: activation bits (the QDrop convention keeps the head input at 8).
        recon_iters: QDrop iterations per unit.
        export: also export to ONNX and run it in onnxruntime.
        float_leaves: module paths kept in float.

    Raises:
        ModelError: the model cannot be traced or placed (the message says which op and what to do).
    """
    began = time.perf_counter()
    report = CoverageReport(float_leaves=list(float_leaves))
    n = example.shape[0]
    folded = fold_bn(model).eval()
    units = extract_units(folded, float_leaves)
    qconfig = QuantConfig(weight_bits, act_bits, convention="qdrop", calib_size=n, float_leaves=tuple(float_leaves))
    quant = build_quant_model(model, qconfig, init_weights=False)
    _min_max_weights(quant)
    report.units = len(units)
    report.blocks = sum(u.kind == "block" for u in units)
    report.weight_quantizers = len(list(quant.quant_layers()))
    report.act_quantizers = len(list(quant.act_quantizers()))
    report.unquantized = quant.unquantized_inputs()
    with torch.no_grad():
        quant.set_quant_state(weight=False, act=False)
        report.fp_max_abs_diff = float((quant(example) - folded(example)).abs().max())
        quant.set_quant_state(weight=True, act=True)
        shapes, h = [], example[:1]
        for unit in units:
            h = unit.module(h)
            shapes.append(tuple(h.shape[1:]))
    writer = FeatureStoreWriter(
        workdir / "store.zarr",
        [u.name for u in units],
        tuple(example.shape[1:]),
        shapes,
        n,
        chunk_size=n,
        shard_size=n,
    )
    extract_features([u.module for u in units], iter([(example, torch.zeros(n, dtype=torch.long))]), writer, CPU)
    store = FeatureStore.open(workdir / "store.zarr")
    calibrate_activations(quant, lambda i: store.iter_inputs(i, n), 2.4, CPU)
    report.probed, report.probe_violations = _probe(quant, example)
    config = ReconConfig(method="qdrop", iters=recon_iters, act_iters=1, batch_size=min(4, n), keep_prob=0.5)
    stats = reconstruct(quant, store, [[i] for i in range(len(units))], config, CPU)
    report.recon_steps = len(stats)
    report.recon_finite = all(
        bool(torch.isfinite(torch.tensor([s["loss_before"], s["loss_after"]])).all()) for s in stats
    )
    if export:
        report.onnx_agreement, report.onnx_max_abs_diff = _onnx_check(quant, example)
    report.seconds = round(time.perf_counter() - began, 2)
    return report


def _onnx_check(model: QuantModel, x: torch.Tensor) -> tuple[float, float]:
    import onnxruntime as ort

    from ptqflow.export import INPUT_NAME, OUTPUT_NAME, ExportConfig, export_onnx

    model_bytes, _ = export_onnx(model, x, ExportConfig())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
    with torch.no_grad():
        ref = model(x)
    agreement = 100.0 * float((got.argmax(1) == ref.argmax(1)).float().mean())
    return round(agreement, 4), float(f"{(got - ref).abs().max().item():.6g}")
