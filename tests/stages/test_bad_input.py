"""The catalogue of bad inputs, run through the ``ptqflow`` CLI.

Every case must end in exactly one line ``Error: ...`` that names the key or file (the ``expect``
fragment), exit code 2, no traceback, and nothing written: no declared output and no new file anywhere.
Each case runs against a tiny workspace (fake Fashion-MNIST, random ResNet-20, 16 calibration images)
built once per module by the real stages.

``base.device: cuda`` without a GPU is its own test (skipped where a GPU exists).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import write_fake_fashion_mnist

from ptqflow.models import build_model
from stages.cli import cli

Setup = Callable[[Path, Path], dict[str, str]]


@dataclass(frozen=True)
class Case:
    """One bad input: run ``stage`` with ``params`` merged into the workspace's (per section, per key;
    a string replaces the whole file) after ``setup(workspace, case_dir)``, whose result overrides CLI
    options. ``{case}`` in a params value is the case folder."""

    id: str
    stage: str
    expect: str
    params: dict[str, Any] | str | None = None
    setup: Setup | None = None


# --- setups: each writes a broken file into the case folder and points an option or key at it ---------


_USER_MODELS = {
    "untraceable": "return self.fc(self.conv(x).mean((2, 3))) if x.sum() > 0 else x.flatten(1)[:, :10]",
    "unplaceable": "return self.fc(self.conv(torch.special.erfcx(self.conv0(x))).mean((2, 3)))",
}


def user_model(kind: str) -> Setup:
    """A user's model package ``{case}/ptqflow_case_<kind>.py`` (entry point ``...:factory``) and its weights."""

    def setup(ws: Path, case: Path) -> dict[str, str]:
        module = f"ptqflow_case_{kind}"
        (case / f"{module}.py").write_text(
            "import torch\nfrom torch import nn\n\n\nclass Net(nn.Module):\n    def __init__(self):\n"
            "        super().__init__()\n        self.conv0 = nn.Conv2d(1, 4, 3)\n"
            "        self.conv = nn.Conv2d(4, 4, 3)\n"
            f"        self.fc = nn.Linear(4, 10)\n\n    def forward(self, x):\n        {_USER_MODELS[kind]}\n\n\n"
            "def factory():\n    return Net()\n"
        )
        sys.dont_write_bytecode = True  # no __pycache__ in the case folder (nothing may be written)
        sys.path.insert(0, str(case))
        torch.save(__import__(module).factory().state_dict(), case / "w.pt")
        return {}

    return setup


def _store_copy(ws: Path, case: Path) -> Path:
    return Path(shutil.copytree(ws / "store.zarr", case / "store.zarr"))


def _shard_file(store: Path, array: str = "units/layer1.0/output", index: int = 0) -> Path:
    """The file of shard ``index`` (zarr v3 default chunk keys: ``c/<i>/0/0/0``)."""
    (path,) = [p for p in (store / array / "c" / str(index)).rglob("*") if p.is_file()]
    return path


def flip_byte(ws: Path, case: Path) -> dict[str, str]:
    shard = _shard_file(_store_copy(ws, case), index=1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    return {"--features": str(case / "store.zarr")}


def delete_shard(ws: Path, case: Path) -> dict[str, str]:
    _shard_file(_store_copy(ws, case), "input", 0).unlink()  # zarr would read fill values (zeros)
    return {"--features": str(case / "store.zarr")}


def truncate_shard(ws: Path, case: Path) -> dict[str, str]:
    shard = _shard_file(_store_copy(ws, case), index=0)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return {"--features": str(case / "store.zarr")}


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def old_version_store(ws: Path, case: Path) -> dict[str, str]:
    _edit_json(_store_copy(ws, case) / "zarr.json", lambda m: m["attributes"].update(version=1))
    return {"--features": str(case / "store.zarr")}


def garbled_store_json(ws: Path, case: Path) -> dict[str, str]:
    meta = _store_copy(ws, case) / "zarr.json"
    meta.write_text(meta.read_text()[:-40])
    return {"--features": str(case / "store.zarr")}


def reshaped_array(ws: Path, case: Path) -> dict[str, str]:
    def edit(meta: dict[str, Any]) -> None:
        meta["shape"][1] += 1

    _edit_json(_store_copy(ws, case) / "units" / "head" / "output" / "zarr.json", edit)
    return {"--features": str(case / "store.zarr")}


def unclosed_store(ws: Path, case: Path) -> dict[str, str]:
    _edit_json(_store_copy(ws, case) / "zarr.json", lambda m: m["attributes"].pop("checksums"))
    return {"--features": str(case / "store.zarr")}


def not_a_store(ws: Path, case: Path) -> dict[str, str]:
    (case / "store.zarr").mkdir()
    (case / "store.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    return {"--features": str(case / "store.zarr")}


def _fm_copy(ws: Path, case: Path) -> Path:
    return Path(shutil.copytree(ws / "fm", case / "fm"))


def truncated_idx(ws: Path, case: Path) -> dict[str, str]:
    path = _fm_copy(ws, case) / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100], mtime=0))
    return {}


def not_gzip_idx(ws: Path, case: Path) -> dict[str, str]:
    (_fm_copy(ws, case) / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    return {}


def cut_gzip(ws: Path, case: Path) -> dict[str, str]:
    path = _fm_copy(ws, case) / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30])
    return {}


def fewer_labels(ws: Path, case: Path) -> dict[str, str]:
    root = _fm_copy(ws, case)
    write_fake_fashion_mnist(case / "other", train=40, test=20)
    shutil.copy(case / "other" / "train-labels-idx1-ubyte.gz", root / "train-labels-idx1-ubyte.gz")
    shutil.rmtree(case / "other")
    return {}


def missing_idx(ws: Path, case: Path) -> dict[str, str]:
    (_fm_copy(ws, case) / "t10k-images-idx3-ubyte.gz").unlink()
    return {}


def mobilenet_weights(ws: Path, case: Path) -> dict[str, str]:
    torch.save(build_model("mobilenetv2_s").state_dict(), case / "w.pt")
    return {}


def garbage_file(name: str) -> Setup:
    def setup(ws: Path, case: Path) -> dict[str, str]:
        (case / name).write_bytes(b"PK\x03\x04 this is not a torch file" * 10)
        return {}

    return setup


def tensor_list(ws: Path, case: Path) -> dict[str, str]:
    torch.save([torch.zeros(2)], case / "w.pt")
    return {}


def _rtn_copy(ws: Path, case: Path) -> Path:
    return Path(shutil.copytree(ws / "quantize", case / "rtn"))


def garbage_rtn(ws: Path, case: Path) -> dict[str, str]:
    (_rtn_copy(ws, case) / "w2a4.pt").write_bytes(b"\x00garbage" * 50)
    return {"--rtn": str(case / "rtn"), "--models": f"rtn={case / 'rtn'}"}


def state_dict_as_rtn(ws: Path, case: Path) -> dict[str, str]:
    torch.save(build_model("resnet20").state_dict(), _rtn_copy(ws, case) / "w2a4.pt")
    return {"--rtn": str(case / "rtn"), "--models": f"rtn={case / 'rtn'}"}


def future_rtn(ws: Path, case: Path) -> dict[str, str]:
    path = _rtn_copy(ws, case) / "w2a4.pt"
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "version": 99}, path)
    return {"--rtn": str(case / "rtn"), "--models": f"rtn={case / 'rtn'}"}


def mismatched_rtn(ws: Path, case: Path) -> dict[str, str]:
    path = _rtn_copy(ws, case) / "w2a4.pt"
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = {k: v for i, (k, v) in enumerate(payload["state_dict"].items()) if i}
    torch.save(payload, path)
    return {"--rtn": str(case / "rtn"), "--models": f"rtn={case / 'rtn'}"}


def empty_models(ws: Path, case: Path) -> dict[str, str]:
    (case / "none").mkdir()
    return {"--models": f"rtn={case / 'none'}"}


def bad_models_option(ws: Path, case: Path) -> dict[str, str]:
    return {"--models": str(ws / "quantize")}


def export_models(damage: Callable[[Path], None]) -> Setup:
    """``export --models`` on a copy of the RTN folder, its model file damaged by ``damage``."""

    def setup(ws: Path, case: Path) -> dict[str, str]:
        damage(_rtn_copy(ws, case) / "w2a4.pt")
        return {"--models": str(case / "rtn")}

    return setup


def plan(groups: Any) -> Setup:
    def setup(ws: Path, case: Path) -> dict[str, str]:
        (case / "plan.json").write_text(groups if isinstance(groups, str) else json.dumps({"groups": groups}))
        return {"--plan": str(case / "plan.json")}

    return setup


def missing(option: str, name: str) -> Setup:
    def setup(ws: Path, case: Path) -> dict[str, str]:
        return {option: str(case / name)}

    return setup


def garbage_split(option: str) -> Setup:
    def setup(ws: Path, case: Path) -> dict[str, str]:
        (case / "split.pt").write_bytes(b"\x80\x02garbage")
        return {option: str(case / "split.pt")}

    return setup


def split_of_wrong_kind(ws: Path, case: Path) -> dict[str, str]:
    torch.save({"images": torch.zeros(3, 28, 28, dtype=torch.uint8), "labels": torch.zeros(5)}, case / "split.pt")
    return {"--test": str(case / "split.pt")}


UNITS = ["stem", *[f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)], "head"]
W = {"weight_bits": 4, "act_bits": 4}

CASES = [
    # params file: syntax and shape
    Case("empty-params", "prepare", "is empty; it needs the sections", ""),
    Case("yaml-syntax", "prepare", "params.yaml: YAML syntax error at line 3, column 1",
         "base:\n  model: [resnet20\n"),
    Case("yaml-tab", "prepare", "YAML syntax error", "prepare:\n\tcalib_size: 3\n"),
    Case("params-a-list", "prepare", "must be a mapping of sections, got list", "- prepare\n"),
    Case("unknown-section", "prepare", "unknown section; did you mean 'prepare'?", "prepair: {}\n"),
    Case("params-missing", "prepare", "params file not found", setup=missing("--params", "none.yaml")),
    Case("section-a-list", "prepare", "prepare must be a mapping of keys", {"prepare": [1, 2]}),
    # unknown keys
    Case("unknown-key", "prepare", "unknown key prepare.calib_sise; did you mean 'calib_size'?",
         {"prepare": {"calib_sise": 3}}),
    Case("unknown-key-base", "features", "unknown key base.modle; did you mean 'model'?",
         {"base": {"modle": "resnet20"}}),
    Case("unknown-key-recon", "reconstruct", "unknown key reconstruct.drop_prob; did you mean 'keep_prob'?",
         {"reconstruct": {"drop_prob": 0.5}}),
    Case("unknown-key-bits", "quantize", "unknown key quantize.bits.x.wbits",
         {"quantize": {"bits": {"x": {"wbits": 4, "act_bits": 4}}}}),
    # wrong types
    Case("int-as-string", "prepare", "prepare.calib_size must be an integer, got 'many'",
         {"prepare": {"calib_size": "many"}}),
    Case("int-as-float", "prepare", "prepare.calib_size must be an integer, got 2.5",
         {"prepare": {"calib_size": 2.5}}),
    Case("int-as-bool", "prepare", "prepare.calib_size must be an integer, got True",
         {"prepare": {"calib_size": True}}),
    Case("float-as-string", "quantize", "quantize.p must be a number, got 'two'", {"quantize": {"p": "two"}}),
    Case("bool-as-string", "reconstruct", "reconstruct.lsq_grad_scale must be true or false",
         {"reconstruct": {"lsq_grad_scale": "yes"}}),
    Case("list-as-string", "reconstruct", "reconstruct.targets must be a list, got 'w2a4'",
         {"reconstruct": {"targets": "w2a4"}}),
    Case("mapping-as-list", "quantize", "quantize.bits must be a mapping", {"quantize": {"bits": [4, 4]}}),
    Case("string-as-int", "features", "base.model must be a string, got 20", {"base": {"model": 20}}),
    # out of range: bits
    Case("weight-bits-0", "quantize", "quantize.bits.x.weight_bits must be an integer in 2..8, got 0",
         {"quantize": {"bits": {"x": {**W, "weight_bits": 0}}}}),
    Case("weight-bits-1", "quantize", "quantize.bits.x.weight_bits must be an integer in 2..8, got 1",
         {"quantize": {"bits": {"x": {**W, "weight_bits": 1}}}}),
    Case("weight-bits-9", "quantize", "quantize.bits.x.weight_bits must be an integer in 2..8, got 9",
         {"quantize": {"bits": {"x": {**W, "weight_bits": 9}}}}),
    Case("act-bits-9", "quantize", "quantize.bits.x.act_bits must be an integer in 2..8, got 9",
         {"quantize": {"bits": {"x": {**W, "act_bits": 9}}}}),
    Case("act-bits-3.5", "quantize", "quantize.bits.x.act_bits must be an integer, got 3.5",
         {"quantize": {"bits": {"x": {**W, "act_bits": 3.5}}}}),
    Case("first-last-bits-1", "quantize", "quantize.first_last_weight_bits must be an integer in 2..8, got 1",
         {"quantize": {"first_last_weight_bits": 1}}),
    Case("bits-required", "quantize", "quantize.bits.x.act_bits is required",
         {"quantize": {"bits": {"x": {"weight_bits": 4}}}}),
    Case("bits-name", "quantize", "quantize.bits.a/b: names may hold letters, digits",
         {"quantize": {"bits": {"a/b": W}}}),
    Case("bits-empty", "quantize", "quantize.bits must name at least one configuration", {"quantize": {"bits": {}}}),
    # out of range: other keys
    Case("keep-prob-1.5", "reconstruct", "reconstruct.keep_prob must be in [0, 1], got 1.5",
         {"reconstruct": {"keep_prob": 1.5}}),
    Case("keep-prob-neg", "reconstruct", "reconstruct.keep_prob must be in [0, 1], got -0.1",
         {"reconstruct": {"keep_prob": -0.1}}),
    Case("iters-neg", "reconstruct", "reconstruct.iters must be >= 1, got -5", {"reconstruct": {"iters": -5}}),
    Case("act-iters-0", "reconstruct", "reconstruct.act_iters must be >= 1, got 0", {"reconstruct": {"act_iters": 0}}),
    Case("lr-0", "reconstruct", "reconstruct.weight_lr must be > 0, got 0.0", {"reconstruct": {"weight_lr": 0}}),
    Case("warmup-1", "reconstruct", "reconstruct.warmup must be in [0, 1), got 1.0", {"reconstruct": {"warmup": 1}}),
    Case("beta-order", "reconstruct", "reconstruct.need beta_start >= beta_end > 0",
         {"reconstruct": {"beta_start": 1, "beta_end": 2}}),
    Case("pd-weight-neg", "reconstruct", "reconstruct.pd_weight must be >= 0 (0: no prediction difference), got -1.0",
         {"reconstruct": {"pd_weight": -1}}),
    Case("dc-iters-neg", "reconstruct", "reconstruct.dc_iters must be >= 0 (0: no distribution correction), got -2",
         {"reconstruct": {"dc_iters": -2}}),
    Case("pd-with-brecq", "reconstruct", "they need method qdrop, got brecq",
         {"reconstruct": {"method": "brecq", "pd_weight": 5}}),
    Case("calib-size-0", "prepare", "prepare.calib_size must be >= 1, got 0", {"prepare": {"calib_size": 0}}),
    Case("calib-size-neg", "prepare", "prepare.calib_size must be >= 1, got -1", {"prepare": {"calib_size": -1}}),
    Case("calib-above-dataset", "prepare", "prepare.calib_size must be in [1, 48] (the train split's size), got 49",
         {"prepare": {"calib_size": 49}}),
    Case("batch-size-0", "features", "features.batch_size must be >= 1, got 0", {"features": {"batch_size": 0}}),
    Case("shard-not-multiple", "features", "features.shard_size must be a multiple of chunk_size",
         {"features": {"shard_size": 10}}),
    Case("budget-below-minimum", "select",
         "select.budget avg_bits = 1 is infeasible; the smallest feasible avg_bits is 2",
         {"select": {"budget": {"kind": "avg_bits", "value": 1.0}}}),
    Case("budget-size-below-minimum", "select",
         "select.budget size_mb = 0.001 is infeasible; the smallest feasible size_mb is",
         {"select": {"budget": {"kind": "size_mb", "value": 0.001}}}),
    Case("budget-kind", "select", "select.budget.kind must be one of 'size_mb', 'avg_bits', 'bitops'",
         {"select": {"budget": {"kind": "latency", "value": 1.0}}}),
    Case("budget-negative", "select", "select.budget.value must be > 0, got -1.0",
         {"select": {"budget": {"kind": "avg_bits", "value": -1}}}),
    Case("select-base-unknown", "select", "select.base: 'w5a5' is not a quantize.bits entry; allowed: ['w2a4']",
         {"select": {"base": "w5a5"}}),
    Case("front-missing", "select", "is not a search front (FileNotFoundError); rerun dvc repro search",
         setup=missing("--front", "front.json")),
    Case("plan-reference-unknown", "plan", "plan.reference: 'w9a9' is not a quantize.bits entry; allowed: ['w2a4']",
         {"plan": {"reference": "w9a9"}}),
    Case("plan-ratio", "plan", "plan.ratio must be in [0, 1] or null, got 1.5", {"plan": {"ratio": 1.5}}),
    Case("plan-form", "plan", "plan.form must be one of 'data_dependent', 'data_free', 'stage_boundary'",
         {"plan": {"form": "random"}}),
    Case("plan-k-negative", "plan", "plan.k must be >= 0, got -1", {"plan": {"k": -1}}),
    Case("search-cost", "search", "search.costs[0] must be one of 'size', 'bitops'",
         {"search": {"costs": ["latency"]}}),
    Case("search-pop", "search", "search.pop_size must be >= 4, got 2", {"search": {"pop_size": 2}}),
    Case("search-algorithm", "search", "search.algorithm must be one of 'exact', 'nsga2'",
         {"search": {"algorithm": "ga"}}),
    Case("sens-bits-9", "sensitivity", "must be an integer in 2..8, got 9",
         {"sensitivity": {"candidate_bits": [2, 9]}}),
    Case("sens-bits-order", "sensitivity", "sensitivity.candidate_bits must be strictly increasing",
         {"sensitivity": {"candidate_bits": [4, 2]}}),
    Case("sens-metric", "sensitivity", "sensitivity.metric must be one of 'fisher', 'mse', 'kl'; got 'kld'",
         {"sensitivity": {"metric": "kld"}}),
    Case("predict-batch-0", "predict", "predict.batch_size must be >= 1, got 0", {"predict": {"batch_size": 0}}),
    Case("eval-topk-no-1", "evaluate", "evaluate.topk must be distinct integers >= 1 including 1",
         {"evaluate": {"topk": [5]}}),
    Case("eval-predictions-missing", "evaluate", "is not a valid predict output", setup=missing("--predictions", "p")),
    Case("quant-calib-0", "quantize", "quantize.calib_size must be >= 1, got 0", {"quantize": {"calib_size": 0}}),
    Case("quant-p-5", "quantize", "quantize.p must be in [1, 4], got 5.0", {"quantize": {"p": 5}}),
    # enumerations
    Case("device", "features", "base.device must be one of 'auto', 'cpu', 'cuda'; got 'tpu'",
         {"base": {"device": "tpu"}}),
    Case("kernels", "quantize", "base.kernels must be one of 'portable', 'native'; got 'fast'",
         {"base": {"kernels": "fast"}}),
    Case("threads-0", "quantize", "base.threads must be 'auto' or an integer >= 1; got 0", {"base": {"threads": 0}}),
    Case("threads-word", "quantize", "base.threads must be 'auto' or an integer >= 1; got 'many'",
         {"base": {"threads": "many"}}),
    Case("dtype", "features", "features.dtype must be one of 'float32', 'float16'; got 'int8'",
         {"features": {"dtype": "int8"}}),
    Case("convention", "quantize", "quantize.convention must be one of 'brecq', 'qdrop'",
         {"quantize": {"convention": "mqbench"}}),
    Case("softmax", "quantize", "quantize.softmax must be one of 'uniform', 'log2'; got 'twin'",
         {"quantize": {"softmax": "twin"}}),
    Case("bias", "quantize", "quantize.bias must be one of 'int32', 'float'; got 'int16'",
         {"quantize": {"bias": "int16"}}),
    Case("scheme", "quantize", "quantize.scheme must be one of 'asymmetric', 'symmetric'; got 'affine'",
         {"quantize": {"scheme": "affine"}}),
    Case("method", "reconstruct", "reconstruct.method must be one of 'brecq', 'qdrop'; got 'adaquant'",
         {"reconstruct": {"method": "adaquant"}}),
    Case("granularity", "reconstruct", "reconstruct.granularity must be one of 'layer', 'block', 'stage', 'net'",
         {"reconstruct": {"granularity": "unit"}}),
    Case("loss", "reconstruct", "reconstruct.loss must be one of 'mse', 'fisher'", {"reconstruct": {"loss": "l1"}}),
    Case("memory", "reconstruct", "base.memory must be one of 'device', 'cpu', 'stream'; got 'disk'",
         {"base": {"memory": "disk"}}),
    Case("fisher-without-grads", "reconstruct",
         "reconstruct.loss: fisher needs the FP output gradients, and the feature store",
         {"reconstruct": {"loss": "fisher"}}),
    Case("sens-fisher-without-grads", "sensitivity", "store.zarr has none: set features.grads: true",
         {"sensitivity": {"metric": "fisher"}}),
    Case("targets-empty", "reconstruct", "reconstruct.targets must name at least one",
         {"reconstruct": {"targets": []}}),
    Case("target-unknown", "reconstruct",
         "reconstruct.targets: 'w3a3' is not a quantize.bits entry or selected model; allowed: ['w2a4']",
         {"reconstruct": {"targets": ["w3a3"]}}),
    Case("target-path", "reconstruct", "reconstruct.targets: '../w2a4' is not a quantize.bits entry",
         {"reconstruct": {"targets": ["../w2a4"]}}),
    # models and weights
    Case("model-unknown", "features",
         "unknown model 'resnet99'; allowed: ['mobilenetv2_s', 'mobilenetv3_s', 'resnet20', 'vit_s'], "
         "'torchvision.<name>'",
         {"base": {"model": "resnet99"}}),
    Case("model-torchvision-unknown", "predict", "unknown model 'torchvision.resnet7'",
         {"base": {"model": "torchvision.resnet7"}}),
    Case("weights-missing", "features", "weights file not found: ", {"base": {"weights": "{case}/none.pt"}}),
    # models the graph rules cannot quantize (issue "Any model", item 6)
    Case("float-leaf-unknown", "features", "base.float_leaves entry 'layer9' is not a submodule of ResNetCifar",
         {"base": {"float_leaves": ["layer9"]}}),
    Case("model-untraceable", "features", "model Net cannot be traced with torch.fx: ",
         {"base": {"model": "ptqflow_case_untraceable:factory", "weights": "{case}/w.pt"}}, user_model("untraceable")),
    Case("op-unplaceable", "features",
         "function special_erfcx produces the input of module conv (Conv2d) and is in no placement table",
         {"base": {"model": "ptqflow_case_unplaceable:factory", "weights": "{case}/w.pt"}}, user_model("unplaceable")),
    Case("weights-wrong-arch", "features", "does not match the model architecture: ",
         {"base": {"weights": "{case}/w.pt"}}, mobilenet_weights),
    Case("weights-garbage", "quantize", "weights file {case}/w.pt cannot be loaded safely",
         {"base": {"weights": "{case}/w.pt"}}, garbage_file("w.pt")),
    Case("weights-not-state-dict", "predict", "does not hold a state_dict",
         {"base": {"weights": "{case}/w.pt"}}, tensor_list),
    # dataset files
    Case("data-root-missing", "prepare", "dataset file not found: /nonexistent/fm/train-images-idx3-ubyte.gz",
         {"prepare": {"data_root": "/nonexistent/fm"}}),
    Case("idx-missing", "prepare", "dataset file not found: {case}/fm/t10k-images-idx3-ubyte.gz",
         {"prepare": {"data_root": "{case}/fm"}}, missing_idx),
    Case("idx-truncated", "prepare", "train-images-idx3-ubyte.gz is truncated or padded",
         {"prepare": {"data_root": "{case}/fm"}}, truncated_idx),
    Case("idx-not-gzip", "prepare", "t10k-labels-idx1-ubyte.gz is not a readable gzip file",
         {"prepare": {"data_root": "{case}/fm"}}, not_gzip_idx),
    Case("idx-cut-gzip", "prepare", "train-labels-idx1-ubyte.gz is not a readable gzip file",
         {"prepare": {"data_root": "{case}/fm"}}, cut_gzip),
    Case("idx-count-mismatch", "prepare", "holds 48 images but",
         {"prepare": {"data_root": "{case}/fm"}}, fewer_labels),
    Case("calibration-missing", "features", "calibration.pt not found; run the prepare stage first",
         setup=missing("--calibration", "calibration.pt")),
    Case("calibration-garbage", "features", "split.pt is not a valid prepare output",
         setup=garbage_split("--calibration")),
    Case("test-garbage", "predict", "split.pt is not a valid prepare output", setup=garbage_split("--test")),
    Case("test-wrong-kind", "predict", "split.pt is not a valid prepare output", setup=split_of_wrong_kind),
    # feature store
    Case("store-missing", "quantize",
         "feature store not found or incomplete at {case}/none.zarr; rerun the features stage",
         setup=missing("--features", "none.zarr")),
    Case("store-old-version", "quantize", "has format version 1, this ptqflow reads 3; rerun the features stage",
         setup=old_version_store),
    Case("store-garbled-json", "reconstruct", "store.zarr is unreadable (", setup=garbled_store_json),
    Case("store-not-ptqflow", "quantize", "store.zarr is not a ptqflow feature store", setup=not_a_store),
    Case("store-unclosed", "reconstruct", "was not closed (no manifest)", setup=unclosed_store),
    Case("store-reshaped", "reconstruct",
         "array units/head/output is float32[16, 11], its manifest says float32[16, 10]",
         setup=reshaped_array),
    Case("store-shard-deleted", "quantize",
         "array input shard 0 is missing or unreadable (FileNotFoundError); rerun the features stage "
         "(dvc repro features)", setup=delete_shard),
    Case("store-shard-truncated", "reconstruct", "array units/layer1.0/output shard 0 fails its checksum; rerun",
         setup=truncate_shard),
    Case("store-flipped-byte", "reconstruct", "array units/layer1.0/output shard 1 ", setup=flip_byte),
    # quantized models
    Case("rtn-garbage", "reconstruct", "rtn/w2a4.pt cannot be loaded safely (weights_only=True)", setup=garbage_rtn),
    Case("rtn-state-dict", "predict", "rtn/w2a4.pt is not a ptqflow quantized model", setup=state_dict_as_rtn),
    Case("rtn-future-version", "reconstruct", "rtn/w2a4.pt has format version 99; this ptqflow reads 1",
         setup=future_rtn),
    Case("rtn-missing-key", "predict", "rtn/w2a4.pt does not fit model resnet20: ", setup=mismatched_rtn),
    Case("models-empty", "predict", "no quantized models (*.pt) in {case}/none", setup=empty_models),
    Case("export-opset", "export", "export.opset must be an integer in 13..23, got 11", {"export": {"opset": 11}}),
    Case("export-int4-opset", "export", "containers 'int4' needs opset >= 21",
         {"export": {"opset": 17, "containers": "int4"}}),
    Case("export-unknown-key", "export", "did you mean 'opset'", {"export": {"opsett": 21}}),
    Case("export-agreement", "export", "percentages in [0, 100]", {"export": {"min_agreement": 120}}),
    Case("export-garbage-model", "export", "rtn/w2a4.pt cannot be loaded safely (weights_only=True)",
         setup=export_models(lambda p: p.write_bytes(b"\x00garbage" * 50))),
    Case("export-state-dict", "export", "rtn/w2a4.pt is not a ptqflow quantized model",
         setup=export_models(lambda p: torch.save(build_model("resnet20").state_dict(), p))),
    Case("export-empty", "export", "no quantized models (*.pt) in {case}/none",
         setup=lambda ws, case: (case / "none").mkdir() or {"--models": str(case / "none")}),
    Case("export-test-garbage", "export", "split.pt is not a valid prepare output", setup=garbage_split("--test")),
    Case("models-option", "predict", "--models takes METHOD=FOLDER", setup=bad_models_option),
    # unit plans
    Case("plan-order", "reconstruct", "unit plan does not match the model",
         setup=plan([[u] for u in reversed(UNITS)])),
    Case("plan-missing-unit", "reconstruct", "unit plan does not match the model",
         setup=plan([[u] for u in UNITS[:-1]])),
    Case("plan-not-json", "reconstruct", "plan.json is not a JSON file with a 'groups' list", setup=plan("{groups: ")),
    Case("plan-empty-group", "reconstruct", "'groups' must be a list of non-empty lists", setup=plan([[], UNITS])),
    Case("plan-missing", "reconstruct", "is not a JSON file with a 'groups' list (FileNotFoundError)",
         setup=missing("--plan", "p.json")),
]  # fmt: skip

OUTPUTS = {  # every declared output of each stage, relative to the case folder
    "prepare": ["out/prepare"],
    "features": ["out/store.zarr"],
    "quantize": ["out/quantize"],
    "reconstruct": ["out/reconstruct", "out/plots", "out/reconstruct.resume"],
    "sensitivity": ["out/sens", "out/sens-plots"],
    "search": ["out/search", "out/search-plots"],
    "select": ["out/select"],
    "plan": ["out/plan", "out/plan-plots"],
    "predict": ["out/predict"],
    "evaluate": ["out/evaluate.json", "out/eval-plots"],
    "export": ["out/export", "out/export.json"],
}


def _stage_args(stage: str, ws: Path, case: Path) -> dict[str, str]:
    out = case / "out"
    return {
        "prepare": {"--out": str(out / "prepare")},
        "features": {"--calibration": str(ws / "prepare" / "calibration.pt"), "--out": str(out / "store.zarr")},
        "quantize": {"--features": str(ws / "store.zarr"), "--out": str(out / "quantize")},
        "reconstruct": {
            "--features": str(ws / "store.zarr"),
            "--rtn": str(ws / "quantize"),
            "--out": str(out / "reconstruct"),
            "--plots": str(out / "plots"),
        },
        "sensitivity": {
            "--features": str(ws / "store.zarr"),
            "--rtn": str(ws / "quantize"),
            "--out": str(out / "sens"),
            "--plots": str(out / "sens-plots"),
        },
        "search": {
            "--tables": str(ws / "sens" / "tables.json"),
            "--out": str(out / "search"),
            "--plots": str(out / "search-plots"),
        },
        "select": {
            "--front": str(ws / "search" / "front.json"),
            "--rtn": str(ws / "quantize"),
            "--out": str(out / "select"),
        },
        "plan": {
            "--modcap": str(ws / "sens" / "modcap.json"),
            "--out": str(out / "plan"),
            "--plots": str(out / "plan-plots"),
        },
        "predict": {
            "--test": str(ws / "prepare" / "test.pt"),
            "--models": f"rtn={ws / 'quantize'}",
            "--out": str(out / "predict"),
        },
        "evaluate": {
            "--predictions": str(ws / "predict"),
            "--out": str(out / "evaluate.json"),
            "--plots": str(out / "eval-plots"),
        },
        "export": {
            "--models": str(ws / "quantize"),
            "--test": str(ws / "prepare" / "test.pt"),
            "--out": str(out / "export"),
            "--metrics": str(out / "export.json"),
        },
    }[stage]


#: base.model_code of the workspace: the embedded models' file, wherever the tests run from.
MODEL_CODE = str(Path(__file__).resolve().parents[2] / "src" / "ptqflow" / "models.py")


def _base_params(ws: Path) -> dict[str, Any]:
    return {
        "base": {
            "model": "resnet20",
            "weights": str(ws / "r20.pt"),
            "seed": 0,
            "device": "cpu",
            "model_code": MODEL_CODE,
        },
        "prepare": {"data_root": str(ws / "fm"), "calib_size": 16, "seed": 1},
        "features": {"batch_size": 16, "chunk_size": 4, "shard_size": 8},
        "quantize": {"bits": {"w2a4": {"weight_bits": 2, "act_bits": 4}}, "calib_size": 16},
        "reconstruct": {"targets": ["w2a4"], "iters": 2, "act_iters": 1, "batch_size": 8},
        "sensitivity": {"samples": 8, "batch_size": 8, "metric": "kl"},
        "search": {"pop_size": 8, "generations": 2},
        "select": {"base": "w2a4", "budget": {"kind": "avg_bits", "value": 3.0}},
        "plan": {"reference": "w2a4", "k": 1},
        "predict": {"batch_size": 10},
        "evaluate": {"topk": [1, 5]},
        "export": {"opset": 21},
    }


def _substitute(value: Any, case: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{case}", str(case))
    if isinstance(value, dict):
        return {k: _substitute(v, case) for k, v in value.items()}
    return value


def _params_text(ws: Path, case: Path, override: dict[str, Any] | str | None) -> str:
    if isinstance(override, str):
        return override
    params = _base_params(ws)
    for name, values in _substitute(override or {}, case).items():
        params[name] = {**params[name], **values} if isinstance(values, dict) else values
    return yaml.safe_dump(params, sort_keys=False)


def _invoke(args: list[str]) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output, result.exception


def _argv(params: Path, stage: str, options: dict[str, str]) -> list[str]:
    args = ["--params", str(params), stage]
    for option, value in options.items():
        args += [option, value]
    return args


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fake Fashion-MNIST (48 train, 20 test), random ResNet-20 weights, and the outputs of prepare,
    features (2 shards of 8) and quantize (w2a4), made by the CLI."""
    ws = tmp_path_factory.mktemp("ws")
    write_fake_fashion_mnist(ws / "fm", train=48, test=20)
    torch.manual_seed(0)
    torch.save(build_model("resnet20").state_dict(), ws / "r20.pt")
    (ws / "params.yaml").write_text(_params_text(ws, ws, None))
    for stage, options in (
        ("prepare", {"--out": str(ws / "prepare")}),
        ("features", {"--calibration": str(ws / "prepare" / "calibration.pt"), "--out": str(ws / "store.zarr")}),
        ("quantize", {"--features": str(ws / "store.zarr"), "--out": str(ws / "quantize")}),
        (
            "sensitivity",
            {
                "--features": str(ws / "store.zarr"),
                "--rtn": str(ws / "quantize"),
                "--out": str(ws / "sens"),
                "--plots": str(ws / "sens-plots"),
            },
        ),
        (
            "search",
            {
                "--tables": str(ws / "sens" / "tables.json"),
                "--out": str(ws / "search"),
                "--plots": str(ws / "search-plots"),
            },
        ),
        (
            "predict",
            {
                "--test": str(ws / "prepare" / "test.pt"),
                "--models": f"rtn={ws / 'quantize'}",
                "--out": str(ws / "predict"),
            },
        ),
    ):
        code, out, _ = _invoke(_argv(ws / "params.yaml", stage, options))
        assert code == 0, out
    return ws


def test_the_catalogue_is_large_and_unique() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, workspace: Path, tmp_path: Path) -> None:
    case_dir = tmp_path
    options = _stage_args(case.stage, workspace, case_dir)
    overrides = case.setup(workspace, case_dir) if case.setup else {}
    params = case_dir / "params.yaml"
    params.write_text(_params_text(workspace, case_dir, case.params))
    if "--params" in overrides:
        params = Path(overrides.pop("--params"))
    options.update({k: v for k, v in overrides.items() if k in options or k == "--plan"})
    before, ws_before = _snapshot(case_dir), _snapshot(workspace)

    code, out, exc = _invoke(_argv(params, case.stage, options))

    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2 and isinstance(exc, SystemExit), f"exit {code}, {exc!r}:\n{out}"
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    assert case.expect.replace("{case}", str(case_dir)) in lines[0], out
    assert "Traceback" not in out
    if case.id.startswith("store-"):  # a damaged store names the stage that rebuilds it
        assert lines[0].endswith("rerun the features stage (dvc repro features)"), out
    assert _snapshot(case_dir) == before, "a file was written or changed"
    assert not [p for p in case_dir.rglob(".*") if p.name.endswith((".tmp", ".old"))], "temporaries left behind"
    assert _snapshot(workspace) == ws_before, "an input was changed"
    for output in OUTPUTS[case.stage]:
        assert not (case_dir / output).exists(), output


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU exists here")
def test_cuda_without_a_gpu(workspace: Path, tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(_params_text(workspace, tmp_path, {"base": {"device": "cuda"}}))
    code, out, _ = _invoke(_argv(tmp_path / "p.yaml", "features", _stage_args("features", workspace, tmp_path)))
    assert code == 2 and "base.device is 'cuda' but no CUDA device is available; allowed: auto, cpu, cuda" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("stage", "extra", "expect"),
    [
        ("features", {}, ["Error: features: the store needs up to ", " bytes uncompressed and ", " has 1,000 free"]),
        (
            "reconstruct",
            {"base": {"memory": "stream"}},
            ["Error: base.memory: stream needs up to ", "0.0 GB are free"],
        ),
    ],
)
def test_a_full_disk_stops_the_stage_before_any_work(
    stage: str,
    extra: dict[str, Any],
    expect: list[str],
    workspace: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store's uncompressed size (features) or stream's spill files (reconstruct) against the free
    bytes: one line with both figures, exit 2, nothing written."""
    full = shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000)  # type: ignore[attr-defined]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full)
    (tmp_path / "p.yaml").write_text(_params_text(workspace, tmp_path, extra))
    code, out, _ = _invoke(_argv(tmp_path / "p.yaml", stage, _stage_args(stage, workspace, tmp_path)))
    assert code == 2 and out.count("\n") == 1, out
    assert all(fragment in out for fragment in expect), out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.id in ("yaml-syntax", "store-flipped-byte")], ids=lambda c: c.id
)
def test_real_command_prints_one_line_on_stderr(case: Case, workspace: Path, tmp_path: Path) -> None:
    """The installed ``ptqflow`` command, not click's test runner: stdout empty, one stderr line, exit 2."""
    options = _stage_args(case.stage, workspace, tmp_path)
    options.update(case.setup(workspace, tmp_path) if case.setup else {})
    (tmp_path / "params.yaml").write_text(_params_text(workspace, tmp_path, case.params))
    command = [str(Path(sys.executable).parent / "ptqflow"), *_argv(tmp_path / "params.yaml", case.stage, options)]
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONWARNINGS": ""}
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: "), result.stderr
    assert case.expect in result.stderr


# --- untrusted files: a checkpoint whose unpickling would run code is refused without running it -------


class _RunsCode:
    """Unpickling this runs ``touch <marker>`` (what a malicious shared checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _evil(path: Path, content: dict[str, Any]) -> Path:
    """Save ``content`` plus a code-running object, and prove it runs when loaded without weights_only."""
    marker = path.parent / "PWNED"
    torch.save({**content, "payload": _RunsCode(marker)}, path)
    torch.load(path, weights_only=False)  # the control: unpickling this file does run code
    assert marker.exists()
    marker.unlink()
    return path


def evil_weights(ws: Path, case: Path) -> dict[str, str]:
    _evil(case / "w.pt", dict(torch.load(ws / "r20.pt", weights_only=True)))
    return {}


def evil_split(option: str, name: str) -> Setup:
    def setup(ws: Path, case: Path) -> dict[str, str]:
        _evil(case / "split.pt", torch.load(ws / "prepare" / name, weights_only=True))
        return {option: str(case / "split.pt")}

    return setup


def evil_rtn(ws: Path, case: Path) -> dict[str, str]:
    rtn = _rtn_copy(ws, case)
    _evil(rtn / "w2a4.pt", torch.load(rtn / "w2a4.pt", weights_only=True))
    return {"--rtn": str(rtn), "--models": f"rtn={rtn}"}


def evil_resume_state(ws: Path, case: Path) -> dict[str, str]:
    """A state.pt exactly where reconstruct looks for its resume checkpoint of target w2a4."""
    from ptqflow.features import FeatureStore
    from ptqflow.quant.model import load_quant_file
    from stages.params import load_params, section
    from stages.reconstruct import ReconstructConfig, _resume_key, unit_groups

    config = section(load_params(case / "params.yaml"), "reconstruct", ReconstructConfig)
    rtn = ws / "quantize" / "w2a4.pt"
    model = load_quant_file(rtn, build_model)[0]
    key = _resume_key(
        config, "w2a4", rtn, FeatureStore.open(ws / "store.zarr"), unit_groups(model.names, "block", None)
    )
    folder = case / "out" / "reconstruct.resume" / key
    folder.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    _evil(folder / "state.pt", {"state_dict": state, "next_step": 1, "rows": "[]"})
    return {}


def evil_store(ws: Path, case: Path) -> dict[str, str]:
    """A feature store whose array asks for numcodecs' pickle codec and holds a pickle payload chunk."""
    import pickle

    store = _store_copy(ws, case)
    _edit_json(store / "input" / "zarr.json", lambda m: m.update(codecs=[{"name": "numcodecs.pickle"}]))
    for shard in [p for p in (store / "input" / "c").rglob("*") if p.is_file()]:
        shard.write_bytes(pickle.dumps(_RunsCode(case / "PWNED")))
    return {"--features": str(store)}


UNTRUSTED = [
    Case("fp-weights", "features", "w.pt cannot be loaded safely (weights_only=True)",
         {"base": {"weights": "{case}/w.pt"}}, evil_weights),
    Case("calibration-split", "features", "split.pt is not a valid prepare output",
         setup=evil_split("--calibration", "calibration.pt")),
    Case("test-split", "predict", "split.pt is not a valid prepare output", setup=evil_split("--test", "test.pt")),
    Case("rtn-model", "reconstruct", "w2a4.pt cannot be loaded safely (weights_only=True)", setup=evil_rtn),
    Case("evaluated-model", "predict", "w2a4.pt cannot be loaded safely (weights_only=True)", setup=evil_rtn),
    Case("resume-state", "reconstruct", "state.pt cannot be loaded safely (weights_only=True)",
         setup=evil_resume_state),
    Case("feature-store", "quantize", "array input is missing or unreadable (UnknownCodecError)", setup=evil_store),
]  # fmt: skip


@pytest.mark.parametrize("case", UNTRUSTED, ids=lambda c: c.id)
def test_code_in_a_file_never_runs(case: Case, workspace: Path, tmp_path: Path) -> None:
    """Every loader a user can point at refuses a code-running payload: exit 2, one line, marker absent."""
    (tmp_path / "params.yaml").write_text(_params_text(workspace, tmp_path, case.params))
    options = _stage_args(case.stage, workspace, tmp_path)
    options.update({k: v for k, v in (case.setup(workspace, tmp_path) if case.setup else {}).items() if k in options})
    code, out, exc = _invoke(_argv(tmp_path / "params.yaml", case.stage, options))
    assert code == 2 and isinstance(exc, SystemExit), out
    assert out.count("\n") == 1 and case.expect in out, out
    assert not (tmp_path / "PWNED").exists(), "the payload ran"
    for output in OUTPUTS[case.stage]:
        if output != "out/reconstruct.resume":
            assert not (tmp_path / output).exists(), output


#: Cases of the catalogue that only the stage itself can find: their problem is in data a stage writes
#: (the search front), or in the body of a dataset file (check reads headers, not 60,000 images).
FOUND_BY_THE_STAGE_ONLY = {"budget-below-minimum", "budget-size-below-minimum", "idx-cut-gzip", "idx-truncated"}
#: Where check words it differently (it sees the params, not the stage's inputs).
CHECK_SAYS = {
    "fisher-without-grads": "reconstruct.loss: fisher needs the FP output gradients, and features.grads is false",
    "sens-fisher-without-grads": "sensitivity.metric: fisher needs the FP output gradients, and features.grads is",
    "target-unknown": "reconstruct.targets: 'w3a3' is not a quantize.bits entry or selected model; allowed:",
    "idx-count-mismatch": "train-labels-idx1-ubyte.gz disagree on the sample count",
}
PARAMS_CASES = [c for c in CASES if c.id not in FOUND_BY_THE_STAGE_ONLY]


@pytest.mark.parametrize("case", PARAMS_CASES, ids=lambda c: c.id)
def test_check_finds_it_before_any_stage(case: Case, workspace: Path, tmp_path: Path) -> None:
    """The pipeline's first stage, ``check``, stops on every bad params value or params-named file of the
    catalogue with the stage's own line, so under ``dvc repro`` no other stage's outputs are removed first.
    Cases whose problem is in a stage's input (a store, a model folder: a CLI option) pass the check."""
    overrides = case.setup(workspace, tmp_path) if case.setup else {}
    params = tmp_path / "params.yaml"
    params.write_text(_params_text(workspace, tmp_path, case.params))
    if "--params" in overrides:
        params = Path(overrides.pop("--params"))
    before = _snapshot(tmp_path)
    code, out, _ = _invoke(["--params", str(params), "check", "--out", str(tmp_path / "out" / "check")])
    if overrides:  # a stage input given on the command line: not the check's business
        assert code == 0, out
        return
    lines = [line for line in out.splitlines() if line.strip()]
    expect = CHECK_SAYS.get(case.id, case.expect).replace("{case}", str(tmp_path))
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: ") and expect in lines[0], out
    assert _snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_check_passes_good_params_and_warns_about_small_calibration(workspace: Path, tmp_path: Path) -> None:
    text = _params_text(workspace, tmp_path, {"quantize": {"calib_size": 256}, "reconstruct": {"batch_size": 32}})
    (tmp_path / "params.yaml").write_text(text)
    code, out, _ = _invoke(["--params", str(tmp_path / "params.yaml"), "check", "--out", str(tmp_path / "check")])
    assert code == 0, out
    assert "quantize.calib_size is 256 but prepare.calib_size is 16: all 16 images are used" in out
    assert "reconstruct.batch_size is 32 but prepare.calib_size is 16" in out
    assert json.loads((tmp_path / "check" / "check.json").read_text()) == {"sections": sorted(_base_params(workspace))}
