"""Which activations break MobileNetV3 at 3 bits? RTN W8, every activation quantizer at 8 bits except one class
of them at 3 (ranges from the A3 calibration; the 8-bit grids span the same ranges), first 1000 test images.

    python bench/mobilenetv3_act_groups.py      (after dvc repro prepare)
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from common import DEVICE, ROOT, build_store, pretrained, rtn_model

from ptqflow.data import LabelledImages, normalize
from ptqflow.evaluate import accuracy, predict_logits
from ptqflow.quant.model import QuantConfig
from stages.common import load_split

GROUPS: dict[str, Callable[[str], bool]] = {
    "Hardswish outputs": lambda n: n.endswith(("_0_2", "_1_2")),
    "SE fc1 activation": lambda n: "activation" in n,
    "SE gated product (mul)": lambda n: "act_mul" in n,
    "block outputs (add / project conv)": lambda n: "act_add" in n or n.endswith(("_3_0", "_2_0")),
}


def main() -> None:
    torch.set_num_threads(1)
    full = load_split(ROOT / "data" / "prepare" / "test.pt")
    test = LabelledImages(full.images[:1000], full.labels[:1000])
    fp = pretrained("mobilenetv3_s")
    with tempfile.TemporaryDirectory() as tmp:
        model = rtn_model(fp, build_store(fp, 256, Path(tmp) / "s.zarr"), QuantConfig(weight_bits=8, act_bits=3))

    def top1() -> float:
        return accuracy(predict_logits(model, test, 500, normalize, DEVICE), test.labels)["top1"]

    print(f"all activations at 3 bits: {top1():.2f}")
    quantizers = dict(model.act_quantizers())
    saved = {n: (q.bits, q.scale.detach().clone(), q.zero_point.clone()) for n, q in quantizers.items()}
    for group, pick in GROUPS.items():
        chosen = [n for n in quantizers if pick(n)]
        for name, q in quantizers.items():
            bits, scale, zero = saved[name]
            if name in chosen or bits == 8:  # the chosen class at 3 bits; the (8-bit) stem as it is
                q.bits, q.scale.data, q.zero_point.data = bits, scale.clone(), zero.clone()
            else:  # the same range on the 8-bit grid
                q.bits, q.scale.data, q.zero_point.data = 8, scale * 7 / 255, torch.round(zero * 255 / 7)
        print(f"{group}: {len(chosen)} quantizers at 3 bits -> top-1 {top1():.2f}", flush=True)


if __name__ == "__main__":
    main()
