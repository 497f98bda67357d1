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
   fake-quant logits. onnxruntime's and PyTorch's float kernels sum in different orders, so a value next
   to a 4-bit rounding boundary can land one step apart, and a random-weight net (nearly tied logits, no
   trained margins) amplifies that. So every activation quantizer's output is also a graph output, and the
   gate is the *first* quantizer (in execution order) whose output differs from torch's: every quantizer
   before it matched exactly, so the elements it moves are rounding flips of its own, and they must be at
   most 0.1 % of its elements (a missing or mis-scaled quantizer moves nearly all). Argmax agreement and the
   relative logit error (max |diff| / max |logit|) are reported beside it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx
from torch import nn

from ptqflow.errors import ExportError
from ptqflow.features import FeatureStore, FeatureStoreWriter, extract_features
from ptqflow.fold import fold_bn
from ptqflow.ops import OpKind, classify_node
from ptqflow.quant.model import QuantConfig, QuantModel, build_quant_model, calibrate_activations, input_sources
from ptqflow.quant.quantizer import lp_range_search
from ptqflow.quant.units import QuantLayer, QuantUnit
from ptqflow.recon.reconstruct import ReconConfig, reconstruct
from ptqflow.units import extract_units, reader_inputs

__all__ = ["CoverageReport", "bn_statistics", "check_model"]

CPU = torch.device("cpu")
#: Largest fraction of the first diverging quantizer's elements that rounding flips may move (item 6).
ONNX_FLIP_FRACTION = 1e-3


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
    onnx_rel_diff: float = float("nan")
    onnx_first_divergence: str | None = None
    onnx_divergence_fraction: float = 0.0
    onnx_error: str | None = None
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
            and self.onnx_error is None
            and not self.onnx_divergence_fraction > ONNX_FLIP_FRACTION
        )

    def to_json(self) -> dict[str, Any]:
        """Plain numbers and lists."""
        return {**asdict(self), "passed": self.passed}


@torch.no_grad()
def bn_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Re-estimate every BN's statistics on ``x`` (one pass with the BNs in train mode), then eval mode.

    Random weights with arbitrary statistics make deep nets explode (ResNet-152 logits of 1e7), which no
    trained net does; with statistics of real activations each layer stays O(1), and folding still sees
    non-trivial statistics."""
    model.eval()  # only the BNs train: no auxiliary heads (Inception) or dropout in this pass
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: exactly this batch's statistics
        m.train()
    model(x)
    return model.eval()


def _min_max_weights(model: QuantModel) -> None:
    """One-candidate (min/max) weight ranges: the 80-candidate Lp search over a large net is most of a
    smoke run's time, and these checks are about placement, not range quality."""
    for _, layer in model.quant_layers():
        q, w = layer.weight_quantizer, layer.layer.weight
        scale, zero = lp_range_search(w.detach().reshape(w.shape[0], -1), q.bits, steps=1)
        q.scale.copy_(scale)
        q.zero_point.copy_(zero)


class _Recorder(torch.fx.Interpreter):
    """Runs a unit's graph and keeps the activation inputs of its readers."""

    def __init__(self, unit: QuantUnit) -> None:
        super().__init__(unit.body)
        self.modules = dict(unit.body.named_modules())
        self.seen: dict[torch.fx.Node, list[torch.Tensor]] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        module = self.modules.get(str(n.target)) if n.op == "call_module" else None
        kind = OpKind.WEIGHT if isinstance(module, QuantLayer) else None
        if n.op in ("call_function", "call_method") and classify_node(n, self.modules) == OpKind.MATMUL:
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
                    sources = input_sources(units, index, source)
                    if sources is None or sources[1] or not sources[0]:
                        continue  # a float input (counted by unquantized_inputs), averaged, or the image
                    quantizers = sources[0]
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
    softmax: Literal["uniform", "log2"] = "uniform",
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
        softmax: grid of the softmax-output quantizers (``log2`` cannot be exported: set ``export=False``).

    Raises:
        ModelError: the model cannot be traced or placed (the message says which op and what to do).
    """
    began = time.perf_counter()
    report = CoverageReport(float_leaves=list(float_leaves))
    n = example.shape[0]
    folded = fold_bn(model).eval()
    units = extract_units(folded, float_leaves)
    qconfig = QuantConfig(
        weight_bits, act_bits, convention="qdrop", calib_size=n, float_leaves=tuple(float_leaves), softmax=softmax
    )
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
        try:
            (
                report.onnx_agreement,
                report.onnx_max_abs_diff,
                report.onnx_rel_diff,
                report.onnx_first_divergence,
                report.onnx_divergence_fraction,
            ) = _onnx_check(quant, example)
        except ExportError as exc:  # e.g. over protobuf's 2 GiB: every other check still counts
            report.onnx_error = str(exc)
    report.seconds = round(time.perf_counter() - began, 2)
    return report


def _onnx_check(model: QuantModel, x: torch.Tensor) -> tuple[float, float, float, str | None, float]:
    """Argmax agreement, max and relative logit error of the exported graph in onnxruntime (float
    semantics) against torch, and the first activation quantizer whose output differs with the fraction of
    its elements that do (every quantizer's output is made a graph output and compared with torch's)."""
    import onnx
    import onnxruntime as ort

    from ptqflow.export import INPUT_NAME, OUTPUT_NAME, ExportConfig, export_onnx

    model_bytes, table = export_onnx(model, x, ExportConfig())
    proto = onnx.load_from_string(model_bytes)
    outputs = {}
    for node in proto.graph.node:
        name = node.name.removesuffix("/DequantizeLinear")
        if node.op_type == "DequantizeLinear" and name in table["activations"]:
            outputs[name] = node.output[0]
            proto.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = list(outputs)
    results = session.run([OUTPUT_NAME, *(outputs[n] for n in names)], {INPUT_NAME: x.numpy()})
    got = torch.from_numpy(results[0])
    recorded: dict[str, torch.Tensor] = {}
    quantizers = dict(model.act_quantizers())
    handles = [
        quantizers[n].register_forward_hook(lambda m, i, o, n=n: recorded.__setitem__(n, o.detach())) for n in names
    ]
    try:
        with torch.no_grad():
            ref = model(x)
    finally:
        for handle in handles:
            handle.remove()
    first, fraction = None, 0.0
    for name, onnx_out in zip(names, results[1:], strict=True):  # graph order = execution order
        step = float(quantizers[name].scale.detach().abs())
        moved = (torch.from_numpy(onnx_out) - recorded[name]).abs() > 0.5 * step
        if moved.any():
            first, fraction = f"{name}: {int(moved.sum())} of {moved.numel()}", float(moved.float().mean())
            break
    agreement = 100.0 * float((got.argmax(1) == ref.argmax(1)).float().mean())
    diff = (got - ref).abs().max().item()
    relative = diff / max(ref.abs().max().item(), 1e-12)
    return round(agreement, 4), float(f"{diff:.6g}"), float(f"{relative:.4g}"), first, float(f"{fraction:.4g}")
