"""The root pipeline end to end through ``dvc repro``, on a tiny params variant in a temp git repo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_repo import ColdRun, lock_without_timing, ran_stages, run


def _run(cmd: list[str], cwd: Path) -> str:
    return run(cmd, cwd)


_ran = ran_stages


@pytest.fixture(scope="module")
def repo(cold_run: ColdRun) -> Path:
    return cold_run.repo


def test_every_memory_mode_reconstructs_the_same_bytes(repo: Path, tmp_path: Path) -> None:
    """base.memory is not a declared param, which is only right because stream (spill files read back with
    read-ahead) gives the bytes of the cold run's device mode; the timing metrics name the mode and
    its peak memory, and no spill file is left behind."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["base"]["memory"] == "device"
    for mode in ("stream",):  # cpu is device's code path on a CPU-only machine (test_cache.py covers both)
        params["base"]["memory"] = mode
        (tmp_path / f"{mode}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        out = tmp_path / mode
        cmd = ["ptqflow", "--params", str(tmp_path / f"{mode}.yaml"), "reconstruct"]
        cmd += ["--features", "data/features/store.zarr", "--rtn", "data/quantize", "--rtn", "data/select"]
        cmd += ["--plan", "data/plan/plan.json", "--out", str(out / "reconstruct"), "--plots", str(out / "plots")]
        _run([*cmd, "--timing", str(out / "timing.json"), "--unit-seconds", str(out / "units")], repo)
        for model in sorted((repo / "data/reconstruct").iterdir()):
            assert (out / "reconstruct" / model.name).read_bytes() == model.read_bytes(), (mode, model.name)
        timing = json.loads((out / "timing.json").read_text())["reconstruct"]
        assert timing["memory"] == mode and timing["peak_rss_mb"] > 0
        header = (out / "units" / "w2a4.tsv").read_text().splitlines()[0]
        assert header == "step\tphase\tunit\tseconds\titer_ms\tpeak_rss_mb"
        assert not list(out.glob("*.scratch")) and not list(out.rglob(".ptqflow-*"))


def test_repro_reruns_only_what_changed(repo: Path, cold_run: ColdRun) -> None:
    log = cold_run.log  # the session's cold run of this repo (conftest.py)
    assert _ran(log) == [
        "evaluate",
        "export",
        "features",
        "plan",
        "predict",
        "prepare",
        "quantize",
        "reconstruct",
        "search",
        "select",
        "sensitivity",
    ]
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    assert metrics["samples"] == 30 and set(metrics["rtn"]) == {"w2a4", "w3a4", "mp"}
    assert set(metrics["recon"]) == {"w2a4", "mp"}
    # the mixed model fits the size of uniform 3-bit weights (first conv and fc at 8 bits in both)
    assert metrics["rtn"]["mp"]["avg_weight_bits"] <= metrics["rtn"]["w3a4"]["avg_weight_bits"] + 1e-6
    assert (repo / "plots/reconstruct/w2a4.tsv").read_text().startswith("step\tphase\tunit")
    assert not (repo / "data/reconstruct.resume").exists()
    assert 0 <= metrics["fp"]["top1"] <= 100 and metrics["rtn"]["w3a4"]["size_mb"] < metrics["fp"]["size_mb"]
    exported = json.loads((repo / "metrics/export.json").read_text())
    assert exported["w2a4"]["agreement"] >= 99.5 and (repo / "data/export/w2a4.onnx").is_file()
    lock = (repo / "dvc.lock").read_text()
    assert str(repo) not in lock  # no absolute path into the repo (the data root lives outside it)

    assert _ran(_run(["dvc", "repro"], repo)) == []  # no-op

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["base"]["threads"] = "auto"  # not a declared param: outputs are the same bytes for any count
    params["base"]["memory"] = "stream"  # nor this: every mode gives the same bytes (test above)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(["dvc", "repro"], repo)) == []

    params["evaluate"]["topk"] = [1, 3]  # a reporting key: only the cheap half reruns
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(["dvc", "repro"], repo)) == ["evaluate"]
    assert set(json.loads((repo / "metrics/evaluate.json").read_text())["fp"]) == {"top1", "top3", "size_mb"}

    params["reconstruct"]["iters"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(["dvc", "repro"], repo)) == ["evaluate", "export", "predict", "reconstruct"]  # not features

    params["select"]["budget"]["value"] = 2.0  # the all-2-bit point: search and sensitivity are not rerun
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(["dvc", "repro"], repo)) == ["evaluate", "export", "predict", "reconstruct", "select"]

    params["quantize"]["bits"]["w3a4"]["act_bits"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # search is not rerun: the act bits move only the ModCap file, not the loss tables it reads
    assert _ran(_run(["dvc", "repro"], repo)) == [
        "evaluate",
        "export",
        "plan",
        "predict",
        "quantize",
        "reconstruct",
        "select",
        "sensitivity",
    ]


def _lock_without_timing(repo: Path) -> dict:
    """dvc.lock minus the timing outputs (wall seconds, the only nondeterministic ones)."""
    return lock_without_timing(yaml.safe_load((repo / "dvc.lock").read_text()))


@pytest.mark.slow  # the default run covers this across two repos (test_sharing.py)
def test_cold_reruns_are_byte_identical(repo: Path) -> None:
    first = _lock_without_timing(repo)
    _run(["dvc", "repro", "--force"], repo)
    assert _lock_without_timing(repo) == first
