"""Which CPU kernels change their bytes with the instruction set or the thread count (issue "Speed and determinism").

    python bench/cpu_determinism.py [--reps 15]

For each library switch below (set in a fresh interpreter before torch starts) and for 1 and 2 threads, one
forward + backward of each embedded model on a fixed batch: sha256 prefixes of the logits, the input gradient
(what ``features`` stores), the parameter gradients (what ``reconstruct`` steps on, conv backward-weights) and
of a plain float32 matmul, plus the median milliseconds of the forward + backward. Two configurations whose
columns agree computed the same bytes. Capping an instruction set on this machine stands in for a machine that
lacks the wider one (``ATEN_CPU_CAPABILITY`` for ATen's vectorised kernels, ``DNNL_MAX_CPU_ISA`` for oneDNN's
convolutions, ``MKL_ENABLE_INSTRUCTIONS`` for MKL's GEMM); ``MKL_CBWR`` is MKL's conditional numerical
reproducibility (``,STRICT``: bitwise independent of the thread count for GEMM); ``mkldnn off`` is
``torch.backends.mkldnn.enabled = False`` (ATen's im2col + MKL GEMM convolution instead of oneDNN's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS: dict[str, dict[str, str]] = {
    "native": {},
    "ATen avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "oneDNN AVX2": {"DNNL_MAX_CPU_ISA": "AVX2"},
    "MKL AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "all three AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "mkldnn off": {"PTQFLOW_BENCH_NO_MKLDNN": "1"},
    "pin: mkldnn off, ATen avx2, MKL_CBWR=AVX2,STRICT": {
        "PTQFLOW_BENCH_NO_MKLDNN": "1",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "AVX2,STRICT",
    },
    "pin, on a machine capped at AVX2": {
        "PTQFLOW_BENCH_NO_MKLDNN": "1",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "AVX2,STRICT",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "DNNL_MAX_CPU_ISA": "AVX2",
    },
}

CHILD = r"""
import hashlib, json, os, statistics, sys, time
import torch
if os.environ.get("PTQFLOW_BENCH_NO_MKLDNN"):
    torch.backends.mkldnn.enabled = False
torch.set_num_threads(int(sys.argv[1]))
from ptqflow.models import build_model, load_weights
from pathlib import Path
def h(t):
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:8]
out = {}
for name in ("resnet20", "mobilenetv2_s"):
    torch.manual_seed(0)
    model = load_weights(build_model(name), Path("data/pretrained") / f"{name}.pt", name).eval()
    x = torch.randn(64, 1, 28, 28, requires_grad=True)
    logits = model(x)
    torch.nn.functional.cross_entropy(logits, torch.arange(64) % 10).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    times = []
    batch = torch.randn(32, 1, 28, 28)
    for _ in range(int(sys.argv[2])):
        began = time.perf_counter()
        model.zero_grad()
        model(batch).sum().backward()
        times.append(time.perf_counter() - began)
    out[name] = [h(logits), h(x.grad), h(grads), round(1000 * statistics.median(times[3:]), 1)]
torch.manual_seed(1)
out["matmul"] = h(torch.randn(256, 300) @ torch.randn(300, 200))
print(json.dumps(out))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="timed forward+backward repetitions per model")
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ATEN_", "DNNL_", "ONEDNN_", "MKL_"))}
    base["PYTHONPATH"] = str(ROOT / "src")
    print(f"{'configuration':<50} thr | resnet20 logits/dx/dW  ms | mobilenetv2_s logits/dx/dW  ms | matmul")
    for label, env in CONFIGS.items():
        for threads in (1, 2):
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(threads), str(args.reps)],
                env={**base, **env},
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(done.stdout)
            a, b = r["resnet20"], r["mobilenetv2_s"]
            print(
                f"{label:<50} {threads:>3} | {a[0]} {a[1]} {a[2]} {a[3]:>6} | {b[0]} {b[1]} {b[2]} {b[3]:>6} "
                f"| {r['matmul']}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
