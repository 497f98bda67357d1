"""Deployed vs simulated accuracy of the embedded models: fake-quant, integer-exact, onnxruntime fused, OpenVINO.

For each model, scheme (``asymmetric``, ``symmetric``: signed, zero point 0, TensorRT's), bias mode
(``float``: the float bias in the fake-quant forward, ptqflow before the integer check; ``int32``: the bias
on the ``s_in * s_w`` grid, the default) and W/A pair: the round-to-nearest model
(``brecq`` convention, first/last weights 8-bit, activation ranges from 256 calibration images) and, for the
``--recon`` pairs, QDrop with learned weight steps (the demo's reconstruction, ``--iters`` per unit). Each is
exported to QDQ ONNX and run four ways on the test set: the PyTorch fake-quant forward, ptqflow's
integer-exact simulation (:mod:`ptqflow.integer`), onnxruntime's default CPU session (QDQ groups fused into
integer kernels) and OpenVINO (CPU, f32 float parts). Agreements are per-sample argmax agreement in percent.
Needs ``dvc repro prepare`` and ``ptqflow[export]`` (onnxruntime, openvino).

    python bench/deploy_table.py [--models resnet20 mobilenetv2_s] [--bits 8/8 4/4 2/4] [--recon 4/4 2/4]
        [--configs asymmetric/float asymmetric/int32 symmetric/int32] [--mp] [--iters 300] [--seed 0]

``--mp`` adds the demo's mixed model (W/A ``mp``): KL sensitivities of 2/3/4/8-bit weights on the W3A4 RTN
model, the exact size front, the least-sensitive point at <= 3.0 average weight bits, RTN and reconstructed.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, build_store, pretrained, rtn_model
from method_table import REG_WEIGHT

from ptqflow.data import normalize
from ptqflow.evaluate import predict_logits
from ptqflow.export import ExportConfig, compare_logits, export_onnx, onnx_logits, openvino_session
from ptqflow.integer import IntegerModel
from ptqflow.quant.model import QuantConfig, QuantModel, set_weight_bits
from ptqflow.recon.reconstruct import ReconConfig, reconstruct
from ptqflow.search import BitSpace, SearchConfig, pareto_front, select
from ptqflow.sensitivity import SensitivityConfig, layer_infos, unit_sensitivities
from stages.common import load_split

CPU = torch.device("cpu")  # onnxruntime and OpenVINO run on the CPU; compare on the same device


def _row(model: QuantModel, test: object, batch: int) -> list[str]:
    """Top-1 of the four runtimes and the agreements, as table cells."""
    x0 = normalize(test.images[:1])  # type: ignore[attr-defined]
    onnx_bytes, _ = export_onnx(model, x0, ExportConfig())
    fake = predict_logits(model, test, batch, normalize, CPU)  # type: ignore[arg-type]
    exact = predict_logits(IntegerModel(model), test, batch, normalize, CPU)  # type: ignore[arg-type]
    fused = onnx_logits(onnx_bytes, test, batch, normalize, True)  # type: ignore[arg-type]
    vino_run = openvino_session(onnx_bytes)
    vino = torch.cat([vino_run(normalize(test.images[i : i + batch])) for i in range(0, len(test), batch)])  # type: ignore[attr-defined, arg-type]
    labels = test.labels  # type: ignore[attr-defined]
    sim = compare_logits(fake, exact, labels)
    ort = compare_logits(exact, fused, labels)
    ov = compare_logits(exact, vino, labels)
    return [
        f"{sim['top1_torch']:.2f}",
        f"{sim['top1_onnx']:.2f}",
        f"{ort['top1_onnx']:.2f}",
        f"{ov['top1_onnx']:.2f}",
        f"{sim['agreement']:.2f}",
        f"{ort['agreement']:.2f}",
        f"{ort['max_abs_logit_diff']:.3g}",
        f"{ov['agreement']:.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2_s"])
    parser.add_argument("--bits", nargs="*", default=["8/8", "4/4", "2/4"], help="RTN W/A pairs")
    parser.add_argument(
        "--recon", nargs="*", default=["4/4", "2/4"], help="W/A pairs also reconstructed (QDrop + Genie-M)"
    )
    parser.add_argument(
        "--configs", nargs="+", default=["asymmetric/float", "asymmetric/int32", "symmetric/int32"],
        help="scheme/bias pairs (quantize.scheme, quantize.bias)",
    )  # fmt: skip
    parser.add_argument(
        "--mp", action="store_true", help="also the demo's mixed model: 2/3/4/8-bit weights at <= 3.0 average bits, A4"
    )
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    test = load_split(ROOT / "data" / "prepare" / "test.pt")
    lines = [
        "| model | W/A | method | scheme | bias | fake-quant | integer-exact | ORT fused | OpenVINO | int vs fake % "
        "| fused vs int % | fused max logit diff | OpenVINO vs int % | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            fp = pretrained(name)
            store = build_store(fp, 1024, Path(tmp) / f"{name}.zarr")
            for combo in args.configs:
                scheme, bias = combo.split("/")
                for pair in dict.fromkeys([*args.bits, *args.recon, *(["mp"] if args.mp else [])]):
                    w, a = (3, 4) if pair == "mp" else (int(b) for b in pair.split("/"))
                    start = time.perf_counter()
                    qconfig = QuantConfig(weight_bits=w, act_bits=a, bias=bias, scheme=scheme)  # type: ignore[arg-type]
                    rtn = rtn_model(fp, store, qconfig, CPU).eval()
                    if pair == "mp":  # the demo's selection: KL sensitivities, exact size front, <= 3.0 avg bits
                        infos = layer_infos(rtn, store.unit(store.units[0]).inputs(slice(0, 1)), 8)
                        sens = SensitivityConfig(candidate_bits=(2, 3, 4, 8), metric="kl")
                        tables = unit_sensitivities(rtn, store, infos, sens, 2.4, CPU)
                        front = pareto_front(BitSpace(infos, tables, act_bits=4), "size", SearchConfig())
                        set_weight_bits(rtn, select(front, "avg_bits", 3.0)["bits"], 2.4)
                        rtn.eval()
                    models = [("RTN", rtn)] if pair in (*args.bits, "mp") else []
                    if pair in (*args.recon, "mp"):
                        model = copy.deepcopy(rtn)
                        config = ReconConfig(
                            method="qdrop", weight_scale_lr=1e-4, iters=args.iters, reg_weight=REG_WEIGHT[name],
                            seed=args.seed,
                        )  # fmt: skip
                        torch.manual_seed(args.seed)
                        reconstruct(
                            model, store, [[i] for i in range(len(store.units))], config, CPU, skip=frozenset({0})
                        )
                        models.append(("QDrop+Genie-M", model.eval()))
                    for method, model in models:
                        cells = _row(model, test, args.batch_size)
                        row = [name, pair, method, scheme, bias, *cells, f"{time.perf_counter() - start:.0f}"]
                        lines.append("| " + " | ".join(row) + " |")
                        print(lines[-1], flush=True)
    print(
        f"\n{len(test)} test images; reconstruction {args.iters} iterations per unit, seed {args.seed}; agreements "
        "are argmax agreement; 'fused' = onnxruntime's default CPU session\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
