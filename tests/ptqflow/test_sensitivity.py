"""BRECQ sensitivity tables and MRECG module capacity on a tiny ResNet."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import TinyResNet, randomize_bn

from ptqflow.errors import ConfigError
from ptqflow.features import FeatureStore, FeatureStoreWriter, extract_features
from ptqflow.fold import fold_bn
from ptqflow.quant.model import QuantConfig, QuantModel, build_quant_model, calibrate_activations
from ptqflow.quant.quantizer import WeightQuantizer
from ptqflow.sensitivity import (
    SensitivityConfig,
    UnitSensitivity,
    capacity_differentials,
    layer_infos,
    modcap_data_dependent,
    modcap_data_free,
    stage_boundaries,
    unit_sensitivities,
)
from ptqflow.units import extract_units

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[QuantModel, FeatureStore]:
    torch.manual_seed(0)
    fp = randomize_bn(TinyResNet())
    units = extract_units(fold_bn(fp))
    n = 48
    x, labels = TinyResNet.example_inputs(n), torch.arange(n) % 10
    path = tmp_path_factory.mktemp("sens") / "s.zarr"
    shapes = [(8, 8, 8), (8, 8, 8), (16, 4, 4), (10,)]
    writer = FeatureStoreWriter(path, [u.name for u in units], (3, 8, 8), shapes, n, chunk_size=16, shard_size=16)
    extract_features([u.module for u in units], iter([(x, labels)]), writer, CPU)
    store = FeatureStore.open(path)
    model = build_quant_model(fp, QuantConfig(weight_bits=2, act_bits=4, first_last_weight_bits=8))
    calibrate_activations(model, lambda i: store.iter_inputs(i, 16), 2.4, CPU)
    return model, store


def test_layer_infos_and_data_free_modcap_by_hand(tiny: tuple[QuantModel, FeatureStore]) -> None:
    model, store = tiny
    infos = layer_infos(model, store.unit("stem").inputs(slice(0, 1)), first_last_weight_bits=8)
    by_name = {i.name: i for i in infos}
    # TinyResNet: stem 3->8 3x3; layer1.0 two 8->8 3x3; layer1.1 8->16 3x3 s2, 16->16 3x3, 1x1 s2 shortcut; fc 16->10.
    assert by_name["stem.conv1"].params == 216 and by_name["stem.conv1"].pinned_bits == 8
    assert by_name["head.fc"].params == 160 and by_name["head.fc"].pinned_bits == 8
    assert by_name["layer1.1.conv1"].stride == 2 and by_name["layer1.1.downsample.0"].params == 128
    assert by_name["layer1.0.conv1"].macs == 8 * 8 * 8 * 72  # H*W*C_out*(C_in*3*3)
    assert by_name["layer1.1.conv2"].macs == 4 * 4 * 16 * 144
    assert by_name["stem.conv1"].input_bits == 8 and by_name["layer1.0.conv1"].input_bits is None
    bits = {i.name: 4 for i in infos}
    capacity = modcap_data_free(infos, 4, bits, alpha=0.5)
    # sum params * bits * alpha^(stride - 1)
    assert capacity == [216 * 4, (576 + 576) * 4, 1152 * 4 * 0.5 + 2304 * 4 + 128 * 4 * 0.5, 160 * 4]
    assert capacity_differentials(capacity, "data_free") == [
        capacity[0] - capacity[1],
        capacity[1] - capacity[2],
        capacity[2] - capacity[3],
    ]
    assert capacity_differentials([1.0, 3.0, 2.0], "data_dependent") == [2.0, -1.0]
    assert stage_boundaries([(8, 8, 8), (8, 8, 8), (16, 4, 4), (10,)]) == [0.0, 1.0, 1.0]


def test_exhaustive_tables_match_a_naive_fisher_reference(tiny: tuple[QuantModel, FeatureStore]) -> None:
    model, store = tiny
    infos = layer_infos(model, store.unit("stem").inputs(slice(0, 1)), 8)
    config = SensitivityConfig(candidate_bits=(2, 4, 8), samples=32, batch_size=10)
    tables = unit_sensitivities(model, store, infos, config, 2.4, CPU)
    assert [t.unit for t in tables] == ["layer1.0", "layer1.1"]  # stem and head layers are pinned
    assert [t.mode for t in tables] == ["exhaustive", "exhaustive"]
    assert len(tables[0].measured) == 9 and len(tables[1].measured) == 27
    # Naive reference for one assignment of layer1.1: (conv1, conv2, downsample) = (2, 8, 4).
    unit = dict(model.named_units())["layer1.1"]
    saved = {n: layer.weight_quantizer for n, layer in unit.quant_layers()}
    for name, b in zip(["conv1", "conv2", "downsample.0"], [2, 8, 4], strict=True):
        layer = dict(unit.quant_layers())[name]
        q = WeightQuantizer(b, layer.layer.weight.shape[0])
        q.init_range(layer.layer.weight, 2.4)
        layer.weight_quantizer = q
    # activations in float everywhere (the unit's input quantizer sits in layer1.0): float biases, as measured
    model.set_quant_state(weight=True, act=False)
    f = store.unit("layer1.1")
    x, y, g = f.inputs(slice(0, 32)), f.outputs(slice(0, 32)), f.grads(slice(0, 32))
    with torch.no_grad():
        naive = (
            sum(float(((unit(x[i : i + 1]) - y[i : i + 1]) ** 2 * g[i : i + 1] ** 2).sum()) for i in range(32)) / 32
        )
    model.set_quant_state(weight=True, act=True)
    for name, q in saved.items():
        dict(unit.quant_layers())[name].weight_quantizer = q
    measured = dict(tables[1].measured)
    assert measured[(2, 8, 4)] == pytest.approx(naive, rel=1e-4)
    assert tables[1].losses(np.array([[0, 2, 1]]))[0] == pytest.approx(naive, rel=1e-4)
    # more bits, less error
    assert measured[(8, 8, 8)] < measured[(4, 4, 4)] < measured[(2, 2, 2)]
    # the model is left as it was: RTN at 2 bits, activations on
    assert all(layer.weight_quantizer.bits in (2, 8) for _, layer in model.quant_layers())
    assert all(q.enabled for _, q in model.act_quantizers())


def test_kl_tables_match_a_naive_whole_network_reference(tiny: tuple[QuantModel, FeatureStore]) -> None:
    """``kl``: only the measured unit quantized, the rest FP, the logits against the stored FP logits."""
    model, store = tiny
    infos = layer_infos(model, store.unit("stem").inputs(slice(0, 1)), 8)
    config = SensitivityConfig(candidate_bits=(2, 4, 8), metric="kl", samples=32, batch_size=10)
    tables = unit_sensitivities(model, store, infos, config, 2.4, CPU)
    assert [t.unit for t in tables] == ["layer1.0", "layer1.1"]
    # Naive reference for layer1.0 at (conv1, conv2) = (2, 8): a deep copy of the model, every layer FP
    # except these two, one sample at a time through the whole network.
    naive_model = copy.deepcopy(model)
    naive_model.set_quant_state(weight=False, act=False)
    unit = dict(naive_model.named_units())["layer1.0"]
    for name, b in zip(["conv1", "conv2"], [2, 8], strict=True):
        layer = dict(unit.quant_layers())[name]
        q = WeightQuantizer(b, layer.layer.weight.shape[0])
        q.init_range(layer.layer.weight, 2.4)
        layer.weight_quantizer = q
        layer.quantize_weight = True
    x = store.unit("stem").inputs(slice(0, 32))
    fp_logits = store.unit("head").outputs(slice(0, 32))
    with torch.no_grad():
        naive = 0.0
        for i in range(32):
            p_fp = torch.softmax(fp_logits[i].double(), 0)
            p_q = torch.softmax(naive_model(x[i : i + 1])[0].double(), 0)
            naive += float((p_fp * (p_fp.log() - p_q.log())).sum())
    measured = dict(tables[0].measured)
    assert measured[(2, 8)] == pytest.approx(naive / 32, rel=1e-3)
    assert measured[(8, 8)] < measured[(4, 4)] < measured[(2, 2)]
    # the model is left as it was: weights and activations quantized
    assert all(layer.quantize_weight for _, layer in model.quant_layers())
    assert all(q.enabled for _, q in model.act_quantizers())


def test_pruned_tables(tiny: tuple[QuantModel, FeatureStore]) -> None:
    model, store = tiny
    infos = layer_infos(model, store.unit("stem").inputs(slice(0, 1)), 8)
    subsets = unit_sensitivities(model, store, infos, SensitivityConfig(samples=16, max_assignments=8), 2.4, CPU)
    assert [t.mode for t in subsets] == ["lowest_subsets", "lowest_subsets"]  # 3^2 = 9 and 3^3 = 27 exceed 8
    table = subsets[1]
    assert len(table.measured) == 8 and {b for bits, _ in table.measured for b in bits} == {2, 4}
    measured = dict(table.measured)
    # An assignment is scored by which layers take the lowest bits; 8 shares the loss of 4.
    got = table.losses(np.array([[0, 2, 1], [0, 1, 1]]))
    assert got[0] == got[1] == pytest.approx(measured[(2, 4, 4)])
    additive = unit_sensitivities(model, store, infos, SensitivityConfig(samples=16, max_assignments=7), 2.4, CPU)
    table = additive[1]
    assert [t.mode for t in additive] == ["lowest_subsets", "additive"]  # 2^3 = 8 exceeds 7
    assert len(table.measured) == 1 + 3 * 2
    measured = dict(table.measured)
    base = measured[(8, 8, 8)]
    expect = base + (measured[(2, 8, 8)] - base) + (measured[(8, 4, 8)] - base)
    assert table.losses(np.array([[0, 1, 2]]))[0] == pytest.approx(expect)
    assert UnitSensitivity.from_json(table.to_json()).measured == [(b, float(f"{v:.9g}")) for b, v in table.measured]


def test_data_dependent_modcap_is_the_rtn_error_along_the_model(tiny: tuple[QuantModel, FeatureStore]) -> None:
    model, store = tiny
    errors = modcap_data_dependent(model, store, samples=32, batch_size=8, device=CPU)
    assert len(errors) == 4 and all(e >= 0 for e in errors)
    x = store.unit("stem").inputs(slice(0, 32))
    with torch.no_grad():
        for index, (name, unit) in enumerate(model.named_units()):
            x = unit(x)
            expect = float(((x - store.unit(name).outputs(slice(0, 32))) ** 2).sum()) / 32
            assert errors[index] == pytest.approx(expect, rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"candidate_bits": (2,)}, "at least two"),
        ({"candidate_bits": (4, 2)}, "strictly increasing"),
        ({"candidate_bits": (1, 4)}, "2..8"),
        ({"samples": 0}, "samples must be >= 1"),
        ({"modcap_alpha": 0.0}, "modcap_alpha"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SensitivityConfig(**kwargs)
