"""Portable CPU kernels (same bytes for any thread count and instruction set) and the auto thread count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from ptqflow import kernels
from ptqflow.kernels import (
    auto_threads,
    broadcast_scalar,
    conv,
    fixed_sum,
    free_cores,
    linear,
    portable_layers,
    set_threads,
    usable_cores,
    use_kernels,
)

ROOT = Path(__file__).resolve().parents[2]
AVX512 = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False


@pytest.fixture
def portable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Portable conv path in this process (the env switches are checked in subprocesses below)."""
    monkeypatch.setattr(kernels, "_mode", "portable")


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


LAYERS = {
    "3x3": lambda: nn.Conv2d(4, 8, 3, padding=1),
    "stride2 no bias": lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False),
    "depthwise": lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8),
    "same, even kernel": lambda: nn.Conv2d(4, 6, 4, padding="same", dilation=1),
    "same, dilated": lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=2),
    "valid": lambda: nn.Conv2d(4, 6, 3, padding="valid"),
    "reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "conv1d": lambda: nn.Conv1d(4, 6, 5, padding=2),
    "conv3d": lambda: nn.Conv3d(2, 3, 3, padding=1),
}


def _input(layer: nn.Module) -> torch.Tensor:
    size = {nn.Conv1d: (2, 4, 11), nn.Conv2d: (2, layer.in_channels, 9, 9), nn.Conv3d: (2, 2, 5, 5, 5)}[type(layer)]
    return torch.randn(size, requires_grad=True)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the layer's own warning
@pytest.mark.parametrize("kind", list(LAYERS))
def test_portable_conv_matches_the_layer(kind: str, portable: None, threads: None) -> None:
    """Same forward bytes as the layer, same input/bias gradients, and the weight gradient of a
    single-threaded run whatever the thread count."""
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    x = _input(layer)
    ref = layer(x)
    grad = torch.randn_like(ref)
    torch.set_num_threads(1)
    ref_grads = torch.autograd.grad(layer(x), [x, layer.weight], grad)
    torch.set_num_threads(2)
    out = conv(layer, x, layer.weight)
    assert torch.equal(out, ref)
    assert out.grad_fn is not None and "PortableConv" in type(out.grad_fn).__name__
    grads = torch.autograd.grad(out, [x, layer.weight], grad)
    assert torch.equal(grads[1], ref_grads[1])
    assert torch.allclose(grads[0], ref_grads[0], rtol=1e-5, atol=1e-6)
    assert torch.get_num_threads() == 2  # restored after the single-threaded weight gradient
    if layer.bias is not None:
        (bias_grad,) = torch.autograd.grad(conv(layer, x, layer.weight), [layer.bias], grad)
        assert torch.allclose(bias_grad, grad.sum(dim=[d for d in range(grad.dim()) if d != 1]), atol=1e-4)


#: A classifier batch; ViT tokens; MobileNetV2-s's classifier at batch 64 and a 576-wide one (measured on an
#: Intel Xeon: MKL splits their forward reduction over the threads, and a 1280x64 by 64x10 input gradient
#: between 2 and 3 threads).
LINEAR_SHAPES = [(16, 64), (4, 17, 96), (64, 1280), (64, 576), (1280, 64)]


@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_portable_linear_does_not_depend_on_threads(shape: tuple[int, ...], portable: None, threads: None) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(shape[-1], 10)
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(*shape[:-1], 10)
    results, forwards = [], []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        out = linear(layer, x, layer.weight)
        with torch.no_grad():
            forwards.append(linear(layer, x, layer.weight))
        assert torch.equal(out, forwards[-1])
        results.append(torch.autograd.grad(out, [x, layer.weight, layer.bias], grad))
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            assert torch.equal(got, want)
    assert all(torch.equal(f, forwards[0]) for f in forwards[1:])
    assert torch.allclose(forwards[0], layer(x), rtol=1e-5, atol=1e-5)
    reference = torch.autograd.grad(layer(x), [x, layer.weight, layer.bias], grad)
    for got, want in zip(results[0], reference, strict=True):  # sums of up to 1280 terms of size ~1
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)


def test_native_mode_and_no_grad_use_the_layer_itself(threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_mode", "native")
    layer = nn.Conv2d(2, 3, 3)
    x = torch.randn(1, 2, 6, 6)
    assert "PortableConv" not in type(conv(layer, x, layer.weight).grad_fn).__name__
    with torch.no_grad():
        assert conv(layer, x, layer.weight).grad_fn is None


def test_portable_layers_routes_a_plain_model_and_restores_it(portable: None) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    with portable_layers(model):
        out = model(x)
        assert "PortableConv" in type(out.grad_fn).__name__
    assert torch.equal(out, expected)
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("shape", [(7,), (40_000,), (100_352,), (8, 16, 28, 28), (3, 70_001)])
def test_fixed_sum_is_the_sum_for_every_thread_count(shape: tuple[int, ...], portable: None, threads: None) -> None:
    """ATen's own full sum of 10^5 floats changes with the thread count; fixed_sum does not, and stays the
    sum (float64 reference). The row form too, and a broadcast scalar's gradient is that sum."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    results = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        s = torch.tensor(0.5, requires_grad=True)
        (x * broadcast_scalar(s, x)).sum().backward()
        rows = fixed_sum(x.reshape(shape[0], -1), dim=1)
        results.append((fixed_sum(x), s.grad, rows))
    for total, grad, rows in results[1:]:
        assert torch.equal(total, results[0][0]) and torch.equal(grad, results[0][1])
        assert torch.equal(rows, results[0][2])
    assert torch.allclose(results[0][0].double(), x.double().sum(), rtol=1e-5, atol=1e-3)
    assert torch.allclose(results[0][1], x.sum(), rtol=1e-5, atol=1e-3)
    assert torch.allclose(results[0][2], x.reshape(shape[0], -1).sum(1), rtol=1e-5, atol=1e-3)


def test_native_mode_sums_and_broadcasts_plainly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_mode", "native")
    x = torch.randn(50_000)
    s = torch.tensor(1.0, requires_grad=True)
    assert torch.equal(fixed_sum(x), x.sum()) and broadcast_scalar(s, x) is s


def test_portable_late_in_a_process_warns_and_keeps_the_fixed_order_parts(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This test process computed long ago: the pin cannot apply any more; that is said, not hidden."""
    monkeypatch.setattr(kernels, "_mode", "native")
    for key in kernels.PORTABLE_ENV:
        monkeypatch.setenv(key, "")  # recorded, so the test's teardown restores what was there before
        monkeypatch.delenv(key)
    caplog.set_level("DEBUG", logger="ptqflow.kernels")
    pinned = use_kernels("portable")
    assert kernels.kernels_mode() == "portable"
    assert pinned == (torch.backends.cpu.get_cpu_capability() == "AVX2")
    if not pinned:
        assert "call use_kernels before any CPU op" in caplog.text


def test_use_kernels_rejects_unknown_modes() -> None:
    with pytest.raises(ValueError, match="portable, native"):
        use_kernels("fast")  # type: ignore[arg-type]


CHILD = r"""
import hashlib, json, sys
import torch
from ptqflow.kernels import portable_layers, use_kernels
from ptqflow.models import build_model
if sys.argv[2] == "late":
    torch.ones(8).exp()  # a CPU op before the switch
use_kernels(sys.argv[1], strict=True)
torch.set_num_threads(int(sys.argv[3]))
h = lambda t: hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:12]
found = {"isa": torch.backends.cpu.get_cpu_capability()}
for name, batch in (("resnet20", 16), ("mobilenetv2_s", 64)):  # the second: a 1280-wide classifier
    torch.manual_seed(0)
    model = build_model(name)
    x = torch.randn(batch, 1, 28, 28, requires_grad=True)
    with portable_layers(model):
        logits = model(x)
        torch.nn.functional.cross_entropy(logits, torch.arange(batch) % 10).backward()
    dw = torch.cat([p.grad.flatten() for p in model.parameters()])
    found[name] = [h(logits), h(x.grad), h(dw)]
print(json.dumps(found))
"""

#: What a machine without AVX-512 looks like to the three libraries (on one that has it).
AVX2_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def _child(mode: str, threads: int, env: dict[str, str] | None = None, when: str = "first") -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ATEN_", "DNNL_", "ONEDNN_", "MKL_"))}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode, when, str(threads)],
        env={**clean, **(env or {}), "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 or when == "late", done.stderr
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip().splitlines()[-1]}


@pytest.mark.skipif(usable_cores() < 2, reason="needs two usable cores to compare thread counts")
def test_portable_bytes_do_not_depend_on_threads_or_the_instruction_set() -> None:
    """ResNet-20 and MobileNetV2-s forward + backward (logits, input gradient, every weight gradient):
    portable mode gives the same bytes with 1 thread, with 2, and as a machine capped at AVX2 sees it."""
    one = _child("portable", 1)
    assert one["isa"] == "AVX2"
    assert _child("portable", 2) == one
    assert _child("portable", 2, AVX2_MACHINE) == one
    if AVX512:  # the comparison has teeth: without the pins the instruction set changes the bytes
        assert _child("native", 1) != _child("native", 1, AVX2_MACHINE)


@pytest.mark.skipif(not AVX512, reason="ATen picks AVX2 anyway on a machine without AVX-512")
def test_portable_after_the_first_cpu_op_is_refused() -> None:
    result = _child("portable", 1, when="late")
    assert "error" in result and "call use_kernels before any CPU op" in result["error"]


def test_set_threads_takes_a_number_or_auto(threads: None) -> None:
    assert set_threads(1) == 1 and torch.get_num_threads() == 1
    chosen = set_threads("auto")
    assert 1 <= chosen <= usable_cores() and torch.get_num_threads() == chosen


@pytest.mark.skipif(not Path("/proc/stat").exists() or usable_cores() < 2, reason="needs /proc/stat, 2 cores")
def test_auto_leaves_a_core_that_another_process_keeps_busy() -> None:
    quiet = free_cores(0.2)
    if quiet < 0.75:  # the machine is busy already (another xdist worker, a CI neighbour): nothing to take away
        pytest.skip(f"no idle core to measure against ({quiet:.2f} free)")
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = free_cores(0.3)
        chosen = auto_threads(0.3)
    finally:
        competitor.kill()
        competitor.wait()
    assert busy <= quiet - 0.5, (quiet, busy)
    assert chosen <= usable_cores() - 1


#: (a, b) shapes of activation products: attention's Q Kᵀ and P V (batch x heads), a broadcast batch, and
#: plain 2-d products (a classifier-like long reduction; one measured to split over MKL threads).
MATMUL_SHAPES = [
    ((2, 3, 17, 8), (2, 3, 8, 17)),
    ((2, 3, 17, 17), (1, 3, 17, 8)),
    ((5, 6, 4), (4, 7)),
    ((64, 1280), (1280, 10)),
    ((5, 6, 4), (4,)),  # vectors: torch.matmul's one-column / one-row rules
    ((4,), (3, 4, 7)),
    ((4,), (4,)),
]


@pytest.mark.parametrize(("a_shape", "b_shape"), MATMUL_SHAPES)
def test_portable_matmul_matches_torch_matmul_with_gradients(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...], portable: None, threads: None
) -> None:
    """Values and gradients of torch.matmul (broadcast dimensions summed back), on one thread, threads restored."""
    torch.manual_seed(0)
    a = torch.randn(a_shape, requires_grad=True)
    b = torch.randn(b_shape, requires_grad=True)
    torch.set_num_threads(2)
    out = kernels.matmul(a, b)
    assert out.grad_fn is not None
    ref = torch.matmul(a, b)
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-5, atol=1e-4)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, [a, b], grad)
    want = torch.autograd.grad(ref, [a, b], grad)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and torch.allclose(g, w, rtol=1e-5, atol=1e-4)
    assert torch.get_num_threads() == 2
    with torch.no_grad():
        assert torch.equal(kernels.matmul(a, b), out)


MATMUL_CHILD = r"""
import hashlib, json, sys
from ptqflow import kernels
kernels.use_kernels("portable", strict=True)
import torch
h = lambda t: hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:12]
found = []
for threads in (1, 2, 3):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    row = []
    for a_shape, b_shape in ((64, 1280), (1280, 10)), ((256, 300), (300, 200)), ((2, 6, 50, 64), (2, 6, 64, 50)):
        a = torch.randn(a_shape, requires_grad=True)
        b = torch.randn(b_shape, requires_grad=True)
        out = kernels.matmul(a, b)
        ga, gb = torch.autograd.grad(out, [a, b], torch.ones_like(out))
        row += [h(out), h(ga), h(gb)]
    found.append(row)
print(json.dumps(found))
"""


@pytest.mark.skipif(usable_cores() < 2, reason="needs two usable cores to compare thread counts")
def test_portable_matmul_does_not_depend_on_threads_under_the_mkl_pins() -> None:
    """With MKL's cross-vendor branch (``MKL_CBWR=COMPATIBLE``, set by ``use_kernels``) in a fresh interpreter:
    products and their gradients are the same bytes for 1, 2 and 3 threads."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ATEN_", "DNNL_", "ONEDNN_", "MKL_"))}
    done = subprocess.run(
        [sys.executable, "-c", MATMUL_CHILD],
        env={**clean, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        check=True,
    )
    one, two, three = json.loads(done.stdout)
    assert one == two == three


def test_portable_env_pins_mkl_to_its_cross_vendor_branch() -> None:
    assert kernels.PORTABLE_ENV["MKL_CBWR"] == "COMPATIBLE"
