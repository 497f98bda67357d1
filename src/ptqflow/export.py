"""Deployment export of a quantized model: ONNX with QuantizeLinear/DequantizeLinear (QDQ), a plain
state_dict and a table of scales, zero points and bits, plus the onnxruntime round-trip check.

ptqflow's grid is unsigned and asymmetric, ``Q(x) = s * (clamp(round(x / s) + z, 0, 2^b - 1) - z)``
(algorithms.md section 1). ONNX's ``QuantizeLinear`` computes ``saturate(round(x / s) + zp)`` with
round-half-to-even (as ``torch.round``) and ``DequantizeLinear`` computes ``(q - zp) * s``; both allow a
1-D scale and zero point along ``axis`` (per channel) since opset 13 (onnx.ai Operators.md). The mapping:

* **Activations** (per tensor), asymmetric scheme: an unsigned container, zero point ``z`` itself. 8-bit -> ``UINT8``;
  any other b -> ``UINT8`` followed by a ``Clip(0, 2^b - 1)`` on the integers before
  ``DequantizeLinear`` (the "QCDQ" pattern). Saturation to the container's range plus the clip is
  exactly ptqflow's ``clamp``. ``UINT4`` for 4-bit activations is opt-in (``containers: int4``): the
  graph is valid ONNX and runs node by node, but onnxruntime 1.32's default optimisations reject it
  (measured: its QDQ fusion builds a ``QLinearConv`` on ``tensor(uint4)``, which that kernel does not
  accept, and its Clip->QuantizeLinear fusion fails on a 4-bit zero point).
* **Activations**, symmetric scheme (``QuantConfig.scheme``; zero point ``2^(b-1)``): a signed container
  (``INT8``, + Clip below 8 bits), ONNX zero point 0 -- TensorRT's form (:func:`tensorrt_violations`).
* **Weights** (per output channel, ``axis=0``): stored as integers on the grid, shifted to a signed
  container (``q - 2^(b-1)``, zero point ``z - 2^(b-1)``; ``(q - zp)`` and so the dequantized weight are
  unchanged): ``INT8`` for 8-bit, ``INT4`` for 4-bit when the opset allows it, ``INT8`` holding values in
  ``[-2^(b-1), 2^(b-1) - 1]`` otherwise. Weights are constants, so they need no ``QuantizeLinear`` and no
  clip. Signed weights are what onnxruntime's quantized kernels prefer (its ``U8S8`` format).

The graph is traced by ``torch.onnx.export`` (the TorchScript exporter) from the quantized units'
own ``forward``: every :class:`~ptqflow.quant.quantizer.WeightQuantizer` and
:class:`~ptqflow.quant.quantizer.ActQuantizer` is swapped for a marker that computes the same
fake-quantization in PyTorch and exports as one ``ptqflow::FakeQuant`` node naming the quantizer.
The markers are then rewritten into Q/(Clip)/DQ from the quantizers' exact values. Nothing depends on a
block type: a newly registered unit exports as long as ``torch.onnx`` can trace its float ops.
The exporter tops out at opset 20; for 21..23 the float graph is traced at 20 and relabelled, which is
sound because those opsets changed the ops a convnet uses only by adding types (the relabelled graph
is validated by ``onnx.checker`` with full shape inference).
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from ptqflow.data import LabelledImages, batches
from ptqflow.errors import ConfigError, ExportError, ModelError
from ptqflow.quant.model import QuantModel
from ptqflow.quant.quantizer import _EPS, ActQuantizer, Log2ActQuantizer, WeightQuantizer, fake_quantize

if TYPE_CHECKING:
    import onnx

__all__ = [
    "INT4_OPSET",
    "beyond_thresholds",
    "MAX_OPSET",
    "MIN_OPSET",
    "ExportConfig",
    "TensorQuant",
    "compare_logits",
    "export_onnx",
    "onnx_logits",
    "onnx_session",
    "onnx_session_logits",
    "openvino_session",
    "tensorrt_violations",
    "plain_state_dict",
    "quant_table",
    "tensor_quants",
]

#: Per-axis (per-channel) QuantizeLinear/DequantizeLinear exist from opset 13.
MIN_OPSET = 13
#: INT4/UINT4 Q/DQ types exist from opset 21.
INT4_OPSET = 21
#: The newest opset this exporter writes (see the module docstring on 21..23).
MAX_OPSET = 23
_TRACE_OPSET = 20  # the TorchScript exporter's newest opset
_DOMAIN = "ptqflow"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class ExportConfig:
    """How the ONNX graph is written.

    Args:
        opset: ONNX opset, 13..23. 4-bit tensors get INT4/UINT4 containers from 21 on.
        containers: ``auto``: INT4 for 4-bit weights where the opset allows it (>= 21), 8-bit
            containers (+ Clip below 8 bits) for everything else; ``int8``: always 8-bit containers;
            ``int4``: INT4 weights and UINT4 activations (an opset below 21 is an error). onnxruntime
            1.32 runs ``int4`` graphs only with its graph optimisations off (see the module docstring).
    """

    opset: int = 21
    containers: Literal["auto", "int8", "int4"] = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ConfigError(f"opset must be an integer in {MIN_OPSET}..{MAX_OPSET}, got {self.opset!r}")
        if self.containers not in ("auto", "int8", "int4"):
            raise ConfigError(f"containers must be one of 'auto', 'int8', 'int4', got {self.containers!r}")
        if self.containers == "int4" and self.opset < INT4_OPSET:
            raise ConfigError(
                f"containers 'int4' needs opset >= {INT4_OPSET} (INT4/UINT4 Q/DQ), got opset {self.opset}; "
                "raise the opset or use containers 'auto' (8-bit containers + Clip below opset 21)"
            )

    @property
    def int4(self) -> bool:
        """Whether 4-bit weights use INT4 containers."""
        return self.containers != "int8" and self.opset >= INT4_OPSET

    @property
    def int4_activations(self) -> bool:
        """Whether 4-bit activations use UINT4 containers (only when asked: see the module docstring)."""
        return self.containers == "int4"


@dataclass(frozen=True)
class TensorQuant:
    """One quantized tensor as the ONNX graph stores it.

    Attributes:
        name: the quantizer's name in the model (``layer1.0.conv1`` for a layer's weight,
            ``layer1.0.act1`` for an activation quantizer).
        kind: ``weight`` (per output channel, ``axis=0``) or ``activation`` (per tensor).
        bits: bit-width b.
        scale: float32 step, ``(C,)`` or ``()``; for activations the effective ``|s|`` the forward uses.
        zero_point: ptqflow's integer zero point z in ``[0, 2^b - 1]``, same shape.
        container: ONNX element type name: ``INT8``, ``INT4``, ``UINT8`` or ``UINT4``.
        offset: container value = grid value - offset (``2^(b-1)`` for signed containers, else 0).
        clip: ``(lo, hi)`` of the Clip after QuantizeLinear (container values), or ``None``.
    """

    name: str
    kind: Literal["weight", "activation"]
    bits: int
    scale: torch.Tensor
    zero_point: torch.Tensor
    container: str
    offset: int
    clip: tuple[int, int] | None

    def to_json(self) -> dict[str, Any]:
        """Plain lists and numbers (floats are the float32 values, exactly)."""
        zero = self.zero_point.to(torch.int64)
        return {
            "kind": self.kind,
            "bits": self.bits,
            "axis": 0 if self.kind == "weight" else None,
            "scale": self.scale.tolist(),
            "zero_point": zero.tolist(),
            "container": self.container,
            "onnx_zero_point": (zero - self.offset).tolist(),
            "clip": list(self.clip) if self.clip is not None else None,
        }


def _container(bits: int, signed: bool, int4: bool) -> tuple[str, int, tuple[int, int] | None]:
    native = bits == 8 or (bits == 4 and int4)
    size = bits if native else 8
    name = ("INT" if signed else "UINT") + str(size)
    offset = 2 ** (bits - 1) if signed else 0
    clip = None if native else (-offset, 2**bits - 1 - offset)
    return name, offset, clip


def _check_exportable(model: QuantModel) -> None:
    for name, layer in model.quant_layers():
        if layer.adaround is not None:
            raise ModelError(f"layer {name} still has soft AdaRound attached; finish reconstruction first")
        if not layer.quantize_weight:
            raise ModelError(f"layer {name} has weight quantization switched off; nothing to export as QDQ")
    for name, quantizer in model.act_quantizers():
        if not quantizer.enabled or quantizer.observing or quantizer.keep_prob < 1.0:
            raise ModelError(f"activation quantizer {name} is not in its inference state (enabled, no drop)")
        if isinstance(quantizer, Log2ActQuantizer):
            raise ExportError(
                f"activation quantizer {name} uses the log2 softmax grid, which no ONNX QuantizeLinear/"
                "DequantizeLinear pair expresses; quantize with quantize.softmax: uniform to export"
            )


def tensor_quants(model: QuantModel, config: ExportConfig) -> list[TensorQuant]:
    """Every quantized tensor of ``model``: weights first (forward order), then activations."""
    out = []
    for name, layer in model.quant_layers():
        wq = layer.weight_quantizer
        container, offset, _ = _container(wq.bits, signed=True, int4=config.int4)
        out.append(
            TensorQuant(name, "weight", wq.bits, wq.scale.detach().float().cpu().clone(),
                        wq.zero_point.detach().float().cpu().clone(), container, offset, None)
        )  # fmt: skip
    for name, aq in model.act_quantizers():
        # the symmetric scheme's grid (zero point 2^(b-1)) is a signed container with ONNX zero point 0
        container, offset, clip = _container(aq.bits, signed=aq.symmetric, int4=config.int4_activations)
        scale = aq.scale.detach().float().cpu().abs().clamp_min(_EPS)
        zero = aq.zero_point.detach().float().cpu().clone()
        out.append(TensorQuant(name, "activation", aq.bits, scale, zero, container, offset, clip))
    return out


def quant_table(quants: list[TensorQuant], config: ExportConfig) -> dict[str, Any]:
    """The JSON sidecar: ``{"weights": {layer: ...}, "activations": {quantizer: ...}}`` (see TensorQuant)."""
    table: dict[str, Any] = {"opset": config.opset, "containers": config.containers, "weights": {}, "activations": {}}
    for tq in quants:
        table["weights" if tq.kind == "weight" else "activations"][tq.name] = tq.to_json()
    return table


def plain_state_dict(model: QuantModel) -> dict[str, torch.Tensor]:
    """``{"<layer>.weight": on-grid float32 weight, "<layer>.bias": bias}`` per quantized layer (the bias the
    forward adds: on the int32 grid ``s_in * s_w`` where ``QuantConfig.bias`` is ``int32``).

    Layer names are :meth:`QuantModel.quant_layers`' (the keys of :func:`quant_table`'s ``weights``);
    the weights are the fake-quantized values the forward pass uses, so ``round(w / s) + z`` recovers
    the integers exactly.
    """
    state = {}
    with torch.no_grad():
        for name, layer in model.quant_layers():
            state[f"{name}.weight"] = layer.quantized_weight().detach().float().cpu().contiguous()
            bias = layer.effective_bias()
            if bias is not None:
                state[f"{name}.bias"] = bias.detach().float().cpu().contiguous()
    return state


class _FakeQuant(torch.autograd.Function):
    """ptqflow's fake quantization in PyTorch; one ``ptqflow::FakeQuant`` node in the exported graph."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, name: str
    ) -> torch.Tensor:
        return fake_quantize(x, scale, zero_point, bits)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, zero_point: Any, bits: int, name: str) -> Any:
        out = g.op(f"{_DOMAIN}::FakeQuant", x, name_s=name)
        out.setType(x.type())
        return out


class _WeightMark(nn.Module):
    def __init__(self, quantizer: WeightQuantizer, name: str) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.name = name

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        view = (-1,) + (1,) * (weight.dim() - 1)
        q = self.quantizer
        return _FakeQuant.apply(weight, q.scale.view(view), q.zero_point.view(view), q.bits, self.name)


class _ActMark(nn.Module):
    def __init__(self, quantizer: ActQuantizer, name: str) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        scale = q.scale.detach().abs().clamp_min(_EPS)
        return _FakeQuant.apply(x, scale, q.zero_point, q.bits, self.name)


def _marked_copy(model: QuantModel) -> QuantModel:
    marked = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        for _, layer in marked.quant_layers():  # the int32-grid bias as a constant (it reads the weight step)
            bias = layer.effective_bias()
            if bias is not None and layer.layer.bias is not None:
                layer.layer.bias.copy_(bias)
            layer.bias_grid = False
    for unit_name, unit in marked.named_units():
        for name, layer in unit.quant_layers():
            layer.weight_quantizer = _WeightMark(layer.weight_quantizer, f"{unit_name}.{name}")  # type: ignore[assignment]
        for name, quantizer in list(unit.act_quantizers()):
            unit.replace_act_quantizer(name, _ActMark(quantizer, f"{unit_name}.{name}"))
    return marked


def _trace(model: QuantModel, example: torch.Tensor, opset: int) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated upstream but still the one that keeps custom nodes
        # (our markers) as written; its deprecation and tracer warnings are not the user's concern.
        warnings.simplefilter("ignore")
        if sum(p.numel() * p.element_size() for p in model.parameters()) >= 2**31:
            raise ExportError(
                "model is larger than protobuf's 2 GiB limit for one ONNX file; ptqflow's export does not "
                "write ONNX external data yet"
            )
        # nn.MultiheadAttention kept as a float leaf would take its fused inference kernel
        # (aten::_native_multi_head_attention), which has no ONNX symbolic; its composite path exports.
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            torch.onnx.export(
                model,
                (example,),
                buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file-likes too
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        except torch.onnx.errors.UnsupportedOperatorError as exc:
            raise ExportError(f"ONNX export: {str(exc).splitlines()[0]}") from None
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    return buffer.getvalue()


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'ptqflow[export]'") from None
    return onnx


def _int_tensor(onnx: Any, name: str, values: np.ndarray, container: str) -> onnx.TensorProto:
    dtype = getattr(onnx.TensorProto, container)
    values = np.array(values, dtype=np.int64, order="C")  # keeps 0-d arrays 0-d (per-tensor zero points)
    if container in ("INT4", "UINT4"):
        return onnx.helper.make_tensor(name, dtype, list(values.shape), values.reshape(-1).tolist())
    np_dtype = np.int8 if container == "INT8" else np.uint8
    return onnx.numpy_helper.from_array(values.astype(np_dtype), name)


def _weight_integers(model: QuantModel, name: str, tq: TensorQuant) -> np.ndarray:
    layer = dict(model.quant_layers())[name]
    weight = layer.layer.weight.detach().float().cpu()
    view = (-1,) + (1,) * (weight.dim() - 1)
    # The same arithmetic as fake_quantize, so the integers are the ones the torch forward uses.
    q = torch.div(weight, tq.scale.view(view)).round_().add_(tq.zero_point.view(view)).clamp_(0, 2**tq.bits - 1)
    return (q - tq.offset).to(torch.int64).numpy()


def _rewrite(onnx: Any, proto: Any, model: QuantModel, quants: dict[str, TensorQuant], opset: int) -> None:
    """Replace every marker node by QDQ nodes; drop the float weights they read; set the opset."""
    helper = onnx.helper
    graph = proto.graph
    nodes: list[Any] = []
    new_inits: list[Any] = []
    dropped: set[str] = set()
    seen: set[str] = set()
    for node in graph.node:
        if node.domain != _DOMAIN:
            nodes.append(node)
            continue
        name = next(a.s.decode() for a in node.attribute if a.name == "name")
        if name in seen:
            raise ExportError(f"quantizer {name} is used twice in the traced graph; a quantizer must have one use")
        seen.add(name)
        tq = quants[name]
        out = node.output[0]
        scale = onnx.numpy_helper.from_array(tq.scale.numpy().astype(np.float32), f"{name}.scale")
        zero = _int_tensor(
            onnx, f"{name}.zero_point", (tq.zero_point.to(torch.int64) - tq.offset).numpy(), tq.container
        )
        new_inits += [scale, zero]
        if tq.kind == "weight":
            dropped.add(node.input[0])
            new_inits.append(_int_tensor(onnx, f"{name}.weight_q", _weight_integers(model, name, tq), tq.container))
            nodes.append(
                helper.make_node(
                    "DequantizeLinear", [f"{name}.weight_q", scale.name, zero.name], [out], f"{name}/DequantizeLinear",
                    axis=0,
                )
            )  # fmt: skip
            continue
        quantized = f"{name}.q"
        nodes.append(helper.make_node("QuantizeLinear", [node.input[0], scale.name, zero.name], [quantized],
                                      f"{name}/QuantizeLinear"))  # fmt: skip
        if tq.clip is not None:
            lo, hi = tq.clip
            new_inits += [
                _int_tensor(onnx, f"{name}.qmin", np.array(lo), tq.container),
                _int_tensor(onnx, f"{name}.qmax", np.array(hi), tq.container),
            ]
            nodes.append(helper.make_node("Clip", [quantized, f"{name}.qmin", f"{name}.qmax"], [f"{name}.qc"],
                                          f"{name}/Clip"))  # fmt: skip
            quantized = f"{name}.qc"
        nodes.append(helper.make_node("DequantizeLinear", [quantized, scale.name, zero.name], [out],
                                      f"{name}/DequantizeLinear"))  # fmt: skip
    missing = sorted(set(quants) - seen)
    if missing:
        raise ExportError(f"quantizers not reached by the traced graph: {', '.join(missing[:5])}")
    used = {i for n in nodes for i in n.input}
    kept = [t for t in graph.initializer if t.name not in dropped or t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    # Value infos of the marker outputs were typed by the tracer; drop all and let checkers infer.
    del graph.value_info[:]
    imports = [o for o in proto.opset_import if o.domain not in (_DOMAIN, "", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", opset), *imports])
    proto.ir_version = max(helper.find_min_ir_version_for(list(proto.opset_import)), 7)
    proto.producer_name = "ptqflow"
    proto.producer_version = ""


def export_onnx(model: QuantModel, example: torch.Tensor, config: ExportConfig) -> tuple[bytes, dict[str, Any]]:
    """The quantized model as a serialized, checked QDQ ONNX model (identical bytes for identical input),
    and its sidecar table (:func:`quant_table`: scales, zero points, bits and containers as written).

    Args:
        model: a quantized model in its inference state (AdaRound finished, quantizers enabled).
        example: one input batch ``(N, C, H, W)`` fixing the input's shape (the batch is dynamic).
        config: opset and container choice.

    Raises:
        ModelError: the model is not in its inference state.
        ExportError: onnx is missing, or the graph fails ``onnx.checker``.
    """
    onnx = _import_onnx()
    _check_exportable(model)
    quants = {tq.name: tq for tq in tensor_quants(model, config)}
    proto = onnx.load_from_string(
        _trace(_marked_copy(model), example.detach().float().cpu(), min(config.opset, _TRACE_OPSET))
    )
    _rewrite(onnx, proto, model, quants, config.opset)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported graph is not valid ONNX: {str(exc).splitlines()[0]}") from None
    return bytes(proto.SerializeToString(deterministic=True)), quant_table(list(quants.values()), config)


def onnx_logits(
    model_bytes: bytes, data: LabelledImages, batch_size: int, preprocess: Any, optimize: bool = True
) -> torch.Tensor:
    """Logits ``(N, classes)`` of an ONNX model under onnxruntime's CPU execution provider.

    Args:
        model_bytes: the serialized model.
        data: labelled images (uint8).
        batch_size: images per run.
        preprocess: uint8 images -> float input (as for the torch model).
        optimize: onnxruntime's default graph optimisations (QDQ groups fused into integer kernels);
            ``False`` runs the graph node by node, which reproduces PyTorch's float arithmetic.
    """
    inputs = (preprocess(images) for images, _ in batches(data, batch_size))
    return onnx_session_logits(model_bytes, inputs, optimize)


def onnx_session_logits(model_bytes: bytes, inputs: Iterable[torch.Tensor], optimize: bool = True) -> torch.Tensor:
    """Logits of an ONNX model under onnxruntime's CPU execution provider over batches of float inputs
    (``optimize`` as in :func:`onnx_logits`)."""
    session = onnx_session(model_bytes, optimize)
    return torch.cat([session(x) for x in inputs]).float()


def onnx_session(model_bytes: bytes, optimize: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """An onnxruntime CPU session of the model as a function of one float input batch to its logits
    (``optimize`` as in :func:`onnx_logits`)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("the onnxruntime check needs onnxruntime: pip install 'ptqflow[export]'") from None
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.detach().float().cpu().numpy()})[0]).float()

    return run


def openvino_session(model_bytes: bytes, threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """An OpenVINO CPU compiled model of the ONNX graph as a function of one float input batch to its logits.

    OpenVINO reads the QDQ graph and runs the quantized convolutions as integer kernels (its low-precision
    transformations). The float parts run at ``INFERENCE_PRECISION_HINT = f32``: left to its default, the
    CPU plugin picks bfloat16 on CPUs with AMX/AVX-512 BF16 and the float residual adds and the classifier
    then round to 8 mantissa bits (measured on the demo's W2A4 ResNet-20: agreement with the integer-exact
    logits 98.07 % under bf16, 99.99 % under f32).

    Args:
        model_bytes: the serialized ONNX model.
        threads: ``INFERENCE_NUM_THREADS`` (default: PyTorch's intra-op thread count).

    Raises:
        ExportError: openvino is not installed.
    """
    try:
        import openvino as ov
    except ImportError:
        raise ExportError("the OpenVINO check needs openvino: pip install 'ptqflow[export]'") from None
    core = ov.Core()
    model = core.read_model(model_bytes, b"")  # ONNX from memory (the weights are inside the model bytes)
    compiled = core.compile_model(
        model,
        "CPU",
        {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()},
    )

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.array(compiled(x.detach().float().cpu().numpy())[0])).float()

    return run


#: Ops between a DequantizeLinear and a GEMM that keep the values quantized ones (reshapes, pooling).
_TRT_PASS = ("Flatten", "Reshape", "Transpose", "MaxPool", "AveragePool", "GlobalAveragePool", "Squeeze")
#: Ops whose inputs TensorRT's explicit quantization runs in INT8 when both arrive through DequantizeLinear.
_TRT_QUANTIZABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def tensorrt_violations(model_bytes: bytes) -> list[str]:
    """Where a QDQ graph breaks TensorRT's explicit-quantization rules (empty: the graph is TensorRT-ready).

    The rules (TensorRT developer guide, "Explicit Quantization" and "Q/DQ layer placement"), one check each:

    1. **Symmetric only**: every ``QuantizeLinear``/``DequantizeLinear`` zero point is 0.
    2. **Types**: activations ``INT8``; weights ``INT8``, or ``INT4`` only on ``Gemm``/``MatMul`` weights
       (TensorRT's INT4 is weight-only quantization of GEMMs; no INT4 convolution, no INT4 activation).
    3. **Q feeds DQ directly**: nothing between a ``QuantizeLinear`` and its ``DequantizeLinear`` (TensorRT
       fuses the pair into the consumer; ptqflow's sub-8-bit ``Clip`` between them has no TensorRT form,
       so activations must be 8-bit).
    4. **Scales**: activation scales per tensor (a scalar), weight scales per output channel (``axis=0``)
       or per tensor.
    5. **Placement**: every Conv/Gemm/MatMul weight (an initializer) arrives through a
       ``DequantizeLinear`` of integers, and every activation input of such an op through a
       ``DequantizeLinear`` too (possibly through reshapes and pooling: the classifier reads pooled quantized
       values), except the network input (that op stays in float, as TensorRT allows).
    """
    onnx = _import_onnx()
    from onnx import numpy_helper

    proto = onnx.load_from_string(model_bytes)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inputs = {i.name for i in graph.input}
    found: list[str] = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero = inits.get(node.input[2]) if len(node.input) > 2 else None
        if zero is not None and np.any(numpy_helper.to_array(zero) != 0):
            found.append(f"rule 1: {node.name} has a non-zero zero point (TensorRT is symmetric only)")
        kind = onnx.TensorProto.DataType.Name(zero.data_type) if zero is not None else "INT8"
        weight = node.op_type == "DequantizeLinear" and node.input[0] in inits
        gemm_weight = weight and all(c.op_type in ("Gemm", "MatMul") for c in consumers.get(node.output[0], []))
        if kind != "INT8" and not (kind == "INT4" and gemm_weight):
            found.append(f"rule 2: {node.name} uses {kind} (TensorRT: INT8, INT4 only for GEMM weights)")
        if node.op_type == "QuantizeLinear":
            readers = consumers.get(node.output[0], [])
            if any(r.op_type != "DequantizeLinear" for r in readers):
                between = sorted({r.op_type for r in readers if r.op_type != "DequantizeLinear"})
                found.append(f"rule 3: {node.name} feeds {', '.join(between)} before its DequantizeLinear")
        scale = inits.get(node.input[1])
        if scale is not None and len(scale.dims) > 0 and not weight:
            found.append(f"rule 4: {node.name} has a per-channel activation scale")
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if weight and scale is not None and len(scale.dims) > 0 and axis != 0:
            found.append(f"rule 4: {node.name} quantizes a weight along axis {axis}, not its output channels")
    for node in graph.node:
        if node.op_type not in _TRT_QUANTIZABLE:
            continue
        for position, name in enumerate(node.input[:2]):
            source = producer.get(name)
            while position == 0 and source is not None and source.op_type in _TRT_PASS:
                name = source.input[0]  # pooled/reshaped quantized values (the classifier's input)
                source = producer.get(name)
            if name in inputs:
                continue  # the network input: TensorRT runs this op in float
            if source is None or source.op_type != "DequantizeLinear":
                what = "weight" if position == 1 else "input"
                found.append(f"rule 5: the {what} of {node.name} does not come through a DequantizeLinear")
    return found


def beyond_thresholds(result: dict[str, float], max_top1_diff: float, min_agreement: float) -> str | None:
    """``top-1 <candidate> vs <reference>, agreement <a>%`` when :func:`compare_logits`' ``result`` differs
    by more than ``max_top1_diff`` points of top-1 or agrees on fewer than ``min_agreement`` percent of the
    samples (the export check's rule), else ``None``."""
    if abs(result["top1_onnx"] - result["top1_torch"]) > max_top1_diff or result["agreement"] < min_agreement:
        return f"top-1 {result['top1_onnx']} vs {result['top1_torch']}, agreement {result['agreement']}%"
    return None


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 of both (percent), per-sample argmax agreement (percent) and the largest logit difference."""
    ref_pred, cand_pred = reference.argmax(dim=1), candidate.argmax(dim=1)
    return {
        "top1_torch": round(100.0 * (ref_pred == labels).float().mean().item(), 4),
        "top1_onnx": round(100.0 * (cand_pred == labels).float().mean().item(), 4),
        "agreement": round(100.0 * (ref_pred == cand_pred).float().mean().item(), 4),
        "max_abs_logit_diff": float(f"{(reference - candidate).abs().max().item():.6g}"),
    }
