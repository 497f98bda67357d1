"""Per-layer digests of the embedded models' forward pass under the portable pins, to compare across CPUs.

    python bench/layer_digests.py --out bench/layer_digests/<cpu>.json
    python bench/layer_digests.py --compare bench/layer_digests/intel-xeon-avx512.json

Issue "Speed and determinism", item 3: the demo's feature store written on an Intel Xeon (AVX-512) differs
from the one written on an AMD EPYC, with the same pins (``ptqflow.kernels.PORTABLE_ENV``) and the same
thread-count independence on each. A whole-store hash cannot say which kernel parts ways; this script can.
In a fresh interpreter with ``use_kernels("portable")`` (as every stage), for each embedded CNN on a fixed
seeded batch it records the sha256 prefix of the input batch (ATen's generator), of every leaf module's output
in execution order (BN folded, linear layers through ``portable_layers`` as the ``features`` stage runs them),
then of the input gradient and every parameter gradient of a cross-entropy backward (every layer through
``portable_layers``, as reconstruct runs them), and of a float32 matmul (``ptqflow.kernels.matmul``: MKL
under the pins, on one thread), for 1 and 2 threads (the digests must agree). ``--compare`` runs the same here
and names, per model, the first entry that differs from the reference file's: the first kernel that computes
other bytes on this CPU. Found this way (AMD EPYC against the Intel Xeon's file, before the MKL pin): every
convolution agreed, the first linear layer did not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, json, sys
from ptqflow.kernels import matmul, portable_layers, use_kernels
use_kernels("portable", strict=True)
import torch
torch.set_num_threads(int(sys.argv[1]))
from pathlib import Path
from ptqflow.fold import fold_bn
from ptqflow.models import build_model, load_weights
def h(t):
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:12]
out = {}
for name in ("resnet20", "mobilenetv2_s"):
    model = fold_bn(load_weights(build_model(name), Path("data/pretrained") / f"{name}.pt", name).eval())
    torch.manual_seed(0)
    x = torch.randn(64, 1, 28, 28)
    seen = [("input", h(x))]
    def hook(label):
        return lambda module, args, output: seen.append((label, h(output)))
    handles = [
        module.register_forward_hook(hook(label))
        for label, module in model.named_modules()
        if label and not list(module.children())
    ]
    with torch.no_grad(), portable_layers(model, convs=False):  # as features and predict run it
        model(x)
    out[name] = seen
    for handle in handles:
        handle.remove()
    x.requires_grad_(True)
    with portable_layers(model):  # every layer: weight gradients on one thread, as reconstruct computes them
        logits = model(x)
        torch.nn.functional.cross_entropy(logits, torch.arange(64) % 10).backward()
    grads = [("input", h(x.grad))]
    grads += [(label, h(p.grad)) for label, p in model.named_parameters()]
    out[name + " gradients"] = grads
torch.manual_seed(1)
out["matmul 256x300 @ 300x200"] = [("output", h(matmul(torch.randn(256, 300), torch.randn(300, 200))))]
print(json.dumps(out))
"""


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure() -> dict[str, object]:
    """Digests for 1 and 2 threads (they must agree: the portable pins promise it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATEN_", "DNNL_", "ONEDNN_", "MKL_"))}
    env["PYTHONPATH"] = str(ROOT / "src")
    runs = {}
    for threads in (1, 2):
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(threads)], env=env, cwd=ROOT, capture_output=True, text=True, check=True
        )
        runs[threads] = json.loads(done.stdout)
    import torch

    for model, seen in runs[1].items():
        where = first_difference(seen, runs[2][model])
        if where is not None:
            print(f"  {model}: 1 and 2 threads first differ at {where}")
    return {
        "cpu": _cpu(),
        "torch": torch.__version__,
        "threads_agree": runs[1] == runs[2],
        "digests": runs[2],
    }


def first_difference(mine: list[list[str]], theirs: list[list[str]]) -> str | None:
    """The first (module, digest) pair that differs, as ``module``; ``None`` when all agree."""
    for (label, digest), (other_label, other) in zip(mine, theirs, strict=False):
        if label != other_label:
            return f"{label} (module lists differ: {other_label})"
        if digest != other:
            return label
    return None if len(mine) == len(theirs) else "(module counts differ)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write this CPU's digests as JSON")
    parser.add_argument("--compare", type=Path, help="a reference JSON written on another CPU")
    args = parser.parse_args()
    result = measure()
    print(f"cpu: {result['cpu']}; torch {result['torch']}; 1 and 2 threads agree: {result['threads_agree']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.compare:
        reference = json.loads(args.compare.read_text())
        print(f"against {args.compare} ({reference['cpu']}, torch {reference['torch']}):")
        digests: dict[str, list[list[str]]] = result["digests"]  # type: ignore[assignment]
        for model, seen in digests.items():
            if model not in reference["digests"]:
                print(f"  {model}: not in the reference")
                continue
            where = first_difference(seen, reference["digests"][model])
            print(f"  {model}: {'identical' if where is None else 'first differs at ' + where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
