"""Attention decomposed into traceable ops: same function, every projection and matmul input quantized."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import calibrate_on, feature_store
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from ptqflow import kernels
from ptqflow.attention import DecomposedAttention, DecomposedWindowAttention, decompose_attention
from ptqflow.coverage import check_model
from ptqflow.errors import ExportError, ModelError
from ptqflow.export import ExportConfig, export_onnx
from ptqflow.fold import fold_bn
from ptqflow.models import build_model
from ptqflow.quant.model import QuantConfig, build_quant_model, calibrate_activations
from ptqflow.quant.quantizer import ActQuantizer, Log2ActQuantizer
from ptqflow.units import UnitModel, extract_units

CPU = torch.device("cpu")


def tiny_vit(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(
        image_size=28, patch_size=7, num_layers=layers, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10
    ).eval()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_first": True},
        {"batch_first": False},
        {"batch_first": True, "bias": False},
        {"batch_first": True, "kdim": 24, "vdim": 20},
    ],
    ids=["batch-first", "seq-first", "no-bias", "kdim-vdim"],
)
@pytest.mark.parametrize("need_weights", [False, True])
def test_decomposition_equals_the_fused_module(kwargs: dict[str, object], need_weights: bool) -> None:
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(32, 4, **kwargs).eval()  # type: ignore[arg-type]
    batch_first = bool(kwargs.get("batch_first"))

    def tokens(length: int, width: int) -> torch.Tensor:
        return torch.randn(3, length, width) if batch_first else torch.randn(length, 3, width)

    q = tokens(7, 32)
    k, v = tokens(5, int(kwargs.get("kdim", 32))), tokens(5, int(kwargs.get("vdim", 32)))  # type: ignore[call-overload]
    if "kdim" not in kwargs:
        k = v = q  # self-attention, as the ViT calls it (the fused fast path)
    decomposed = DecomposedAttention.from_module(mha)
    with torch.no_grad():
        ref_out, ref_w = mha(q, k, v, need_weights=need_weights)
        out, w = decomposed(q, k, v, need_weights=need_weights)
    assert out.shape == ref_out.shape
    assert (out - ref_out).abs().max() <= 1e-5
    if need_weights:
        assert ref_w is not None and w is not None
        assert (w - ref_w).abs().max() <= 1e-5
    else:
        assert w is None


def test_vit_traced_with_attention_matches_the_model() -> None:
    model = tiny_vit()
    x = torch.randn(4, 3, 28, 28)
    units = extract_units(fold_bn(model))
    with torch.no_grad():
        assert (UnitModel(units)(x) - model(x)).abs().max() <= 1e-5
    # BRECQ's block for a transformer: one unit per encoder layer; the patch embedding, class token and
    # position embedding are the stem, the final norm and the classifier the head.
    assert [(u.name, u.kind) for u in units] == [
        ("stem", "stem"),
        ("encoder.layers.encoder_layer_0", "block"),
        ("encoder.layers.encoder_layer_1", "block"),
        ("head", "head"),
    ]
    stem_modules = {n.target for n in units[0].module.graph.nodes if n.op == "call_module"}
    assert "conv_proj" in stem_modules
    head_modules = {n.target for n in units[-1].module.graph.nodes if n.op == "call_module"}
    assert {"encoder.ln", "heads.head"} <= head_modules


@pytest.mark.parametrize("softmax", ["uniform", "log2"])
def test_every_matmul_input_and_the_softmax_output_is_quantized(softmax: str) -> None:
    model = build_quant_model(tiny_vit(), QuantConfig(4, 4, softmax=softmax))  # type: ignore[arg-type]
    assert model.unquantized_inputs() == []
    # 6 linears per layer (q, k, v, out, 2 MLP) x 2 + the patch conv + the head
    assert len(list(model.quant_layers())) == 14
    for _, unit in list(model.named_units())[1:-1]:
        body = unit.body
        modules = dict(body.named_modules())
        matmuls = [n for n in body.graph.nodes if n.op == "call_function" and n.target is kernels.matmul]
        assert len(matmuls) == 2
        for node in matmuls:
            for arg in node.args:
                while not (arg.op == "call_module" and isinstance(modules[str(arg.target)], ActQuantizer)):
                    assert arg.op in ("call_method", "call_module"), arg  # transposes, dropout
                    arg = arg.args[0]
        softmaxes = [n for n in body.graph.nodes if n.target is torch.softmax]
        (users,) = [list(n.users) for n in softmaxes]
        (quantizer,) = users
        kind = Log2ActQuantizer if softmax == "log2" else ActQuantizer
        assert type(modules[str(quantizer.target)]) is kind
        # GELU output (the second MLP linear's input) is quantized too: 4 attention quantizers (shared
        # LN output, q, k, v), softmax, merged heads, LN before the MLP, GELU
        assert len(list(unit.act_quantizers())) == 8


def test_vit_passes_the_coverage_check(tmp_path: Path) -> None:
    report = check_model(tiny_vit(), torch.randn(8, 3, 28, 28), tmp_path)
    assert report.unquantized == [] and report.probe_violations == []
    assert report.fp_max_abs_diff <= 1e-5
    assert report.recon_finite and report.recon_steps == report.units
    assert report.onnx_error is None and report.onnx_agreement >= 99.5


def test_log2_softmax_passes_the_probe_and_refuses_export(tmp_path: Path) -> None:
    report = check_model(tiny_vit(), torch.randn(8, 3, 28, 28), tmp_path, softmax="log2", export=False)
    assert report.unquantized == [] and report.probe_violations == [] and report.recon_finite
    x = torch.randn(4, 3, 28, 28)
    model = calibrate_on(build_quant_model(tiny_vit(), QuantConfig(4, 4, softmax="log2")), x)
    with pytest.raises(ExportError, match="log2 softmax grid.*quantize.softmax: uniform"):
        export_onnx(model, x, ExportConfig())


def test_embedded_vit_units_and_placement() -> None:
    model = build_model("vit_s")
    units = extract_units(fold_bn(model.eval()))
    assert [u.name for u in units] == ["stem"] + [f"encoder.layers.encoder_layer_{i}" for i in range(4)] + ["head"]
    assert build_quant_model(model, QuantConfig(4, 4)).unquantized_inputs() == []


def test_masks_and_unsupported_options_are_refused_in_one_line() -> None:
    with pytest.raises(ModelError, match=r"module enc.attn \(MultiheadAttention\).*add_bias_kv.*float_leaves"):
        DecomposedAttention.from_module(nn.MultiheadAttention(8, 2, add_bias_kv=True), "enc.attn")
    attention = DecomposedAttention.from_module(nn.MultiheadAttention(8, 2, batch_first=True))
    x = torch.randn(1, 3, 8)
    with pytest.raises(ModelError, match="masks are not decomposed.*float_leaves"):
        attention(x, x, x, attn_mask=torch.zeros(3, 3))


def test_float_leaves_keep_the_fused_module() -> None:
    model = nn.Sequential()
    model.add_module("a", nn.MultiheadAttention(8, 2))
    model.add_module("b", nn.Sequential(nn.MultiheadAttention(8, 2)))
    assert decompose_attention(model, keep=["b"]) == ["a"]
    assert isinstance(model.a, DecomposedAttention) and isinstance(model.b[0], nn.MultiheadAttention)


def tiny_swin(v2: bool) -> nn.Module:
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    torch.manual_seed(0)
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10,
        **extra,  # type: ignore[arg-type]
    ).eval()  # fmt: skip


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("size", [8, 9], ids=["whole-windows", "padded"])
@pytest.mark.parametrize("shift", [0, 2], ids=["no-shift", "shift"])
def test_window_attention_decomposition_equals_torchvision(v2: bool, size: int, shift: int) -> None:
    from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

    torch.manual_seed(2)
    cls = ShiftedWindowAttentionV2 if v2 else ShiftedWindowAttention
    source = cls(16, [4, 4], [shift, shift], num_heads=2).eval()
    with torch.no_grad():
        source.proj.bias.normal_()
        if v2:
            source.logit_scale.add_(0.3)
    x = torch.randn(2, size, size, 16)
    with torch.no_grad():
        assert (DecomposedWindowAttention.from_module(source)(x) - source(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_units_placement_and_export(v2: bool, tmp_path: Path) -> None:
    model = tiny_swin(v2)
    units = extract_units(fold_bn(model))
    # one unit per Swin block, the patch merging between stages its own unit
    assert [u.name for u in units] == [
        "stem", "features.1.0", "features.1.1", "features.2", "features.3.0", "features.3.1", "head",
    ]  # fmt: skip
    quant = build_quant_model(model, QuantConfig(4, 4))
    assert quant.unquantized_inputs() == []
    for _, unit in list(quant.named_units())[1:3]:
        modules = dict(unit.body.named_modules())
        softmax = [n for n in unit.body.graph.nodes if n.target is torch.softmax]
        assert len(softmax) == 1 and isinstance(modules[str(next(iter(softmax[0].users)).target)], ActQuantizer)
    x = torch.randn(4, 3, 36, 36)  # 9x9 tokens: padded windows, shifted
    report = check_model(model, x, tmp_path)
    assert report.fp_max_abs_diff <= 1e-5 and report.probe_violations == [] and report.recon_finite
    assert report.onnx_error is None and report.onnx_agreement >= 99.5


@pytest.mark.parametrize("method", ["brecq", "qdrop"])
def test_fisher_loss_and_joint_encoder_layers_reconstruct_a_vit(method: str, tmp_path: Path) -> None:
    """BRECQ's Fisher-weighted loss and an MRECG group of two encoder layers on the generic transformer units."""
    from ptqflow.recon.reconstruct import ReconConfig, reconstruct

    model, x = tiny_vit(), torch.randn(16, 3, 28, 28)
    units = extract_units(fold_bn(model))
    labels = torch.zeros(16, dtype=torch.long)
    store = feature_store(units, x, labels, tmp_path / "s.zarr", chunk_size=16, shard_size=16)
    quant = build_quant_model(model, QuantConfig(2, 4, convention="qdrop", calib_size=16))
    calibrate_activations(quant, lambda i: store.iter_inputs(i, 16), 2.4, CPU)
    config = ReconConfig(method=method, loss="fisher", iters=20, act_iters=5, batch_size=8)
    stats = reconstruct(quant, store, [[0], [1, 2], [3]], config, CPU)
    assert len(stats) == 3 * (2 if method == "brecq" else 1)  # BRECQ: a weight and an activation phase per group
    before, after = torch.tensor([s["loss_before"] for s in stats]), torch.tensor([s["loss_after"] for s in stats])
    assert torch.isfinite(before).all() and torch.isfinite(after).all()
    assert after.sum() < before.sum()  # reconstruction lowers the Fisher-weighted output error
