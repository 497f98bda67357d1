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
        assert header == "step\tphase\tunit\tseconds\titer_ms\titers\tpeak_rss_mb"
        assert not list(out.glob("*.scratch")) and not list(out.rglob(".ptqflow-*"))


def test_pd_quant_runs_through_the_stage(repo: Path, tmp_path: Path) -> None:
    """reconstruct.pd_weight and dc_iters from params: the stage reads the FP model's BN statistics
    (base.model, base.weights) and writes another model than plain QDrop's."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["reconstruct"].update(pd_weight=5.0, dc_iters=3, targets=["w2a4"])
    (tmp_path / "pd.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = tmp_path / "pd"
    cmd = ["ptqflow", "--params", str(tmp_path / "pd.yaml"), "reconstruct", "--features", "data/features/store.zarr"]
    plots = tmp_path / "plots"
    cmd += ["--rtn", "data/quantize", "--plan", "data/plan/plan.json", "--out", str(out), "--plots", str(plots)]
    _run(cmd, repo)
    assert (out / "w2a4.pt").read_bytes() != (repo / "data/reconstruct/w2a4.pt").read_bytes()
    loss = (plots / "w2a4.tsv").read_text().splitlines()[1:]
    assert loss and all(float(row.split("\t")[4]) >= 0 for row in loss)


def test_repro_reruns_only_what_changed(repo: Path, cold_run: ColdRun) -> None:
    log = cold_run.log  # the session's cold run of this repo (conftest.py)
    assert _ran(log) == [
        "check",
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
    header, row = (repo / "plots/select/selected.tsv").read_text().splitlines()  # the point select picked
    chosen = dict(zip(header.split("\t"), row.split("\t"), strict=True))
    budget = yaml.safe_load((repo / "params.yaml").read_text())["select"]["budget"]
    assert chosen["selected"] == "1" and chosen["label"] == f"selected: mp ({budget['kind']} <= {budget['value']:g})"
    assert float(chosen["size_mb"]) == pytest.approx(metrics["rtn"]["mp"]["size_mb"], abs=1e-4)
    models = (repo / "plots/evaluate/models.tsv").read_text().splitlines()
    assert models[0].endswith("\tlabel")  # each model's legend entry: its name and top-1
    assert any(
        m.startswith("recon w2a4\t") and m.split("\t")[-1] == f"recon w2a4 {m.split(chr(9))[6]}" for m in models
    )
    assert not (repo / "data/reconstruct.resume").exists()
    assert 0 <= metrics["fp"]["top1"] <= 100 and metrics["rtn"]["w3a4"]["size_mb"] < metrics["fp"]["size_mb"]
    exported = json.loads((repo / "metrics/export.json").read_text())
    assert exported["w2a4"]["agreement"] >= 99.5 and (repo / "data/export/w2a4.onnx").is_file()
    lock = (repo / "dvc.lock").read_text()
    assert str(repo) not in lock  # no absolute path into the repo (the data root lives outside it)

    assert _ran(_run(["dvc", "repro"], repo)) == ["check"]  # no-op but the check (always run; its memo)

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["base"]["threads"] = "auto"  # not a declared param of any computing stage: the same bytes for any
    params["base"]["memory"] = "stream"  # count and any mode (test above); only the check sees the whole section
    params["evaluate"]["topk"] = [1, 3]  # a reporting key: only the cheap half reruns
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(["dvc", "repro"], repo)) == ["check", "evaluate"]
    assert set(json.loads((repo / "metrics/evaluate.json").read_text())["fp"]) == {"top1", "top3", "size_mb"}

    edited = (repo / "params.yaml").read_text()
    params["reconstruct"]["iters"] = 3  # not features, quantize, sensitivity, search or plan
    params["select"]["budget"]["value"] = 2.0  # the all-2-bit point: search and sensitivity are not rerun
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # --dry names the stages whose own params or deps changed (not yet what their new outputs would rerun):
    # everything else (features, quantize, sensitivity, search, plan) is upstream of them or beside them
    assert _ran(_run(["dvc", "repro", "--dry"], repo)) == ["check", "reconstruct", "select"]
    (repo / "params.yaml").write_text(edited)

    params = yaml.safe_load(edited)
    params["quantize"]["bits"]["w3a4"]["act_bits"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(["dvc", "repro", "sensitivity"], repo)) == ["check", "quantize", "sensitivity"]
    # search is not stale: the act bits move only the ModCap file, not the loss tables it reads (sensitivity
    # reran and wrote the same tables); what reads the new RTN models or ModCap file is
    stale = _stale(_run(["dvc", "status"], repo))
    assert "search" not in stale and {"plan", "select", "reconstruct", "predict"} <= stale, stale
    # back to the committed act bits: both stages come back from DVC's run-cache, nothing else reruns
    (repo / "params.yaml").write_text(edited)
    log = _run(["dvc", "repro"], repo)
    assert _ran(log) == ["check"] and "Stage 'sensitivity' is cached" in log, log


def _stale(status: str) -> set[str]:
    """The stages ``dvc status`` lists (its unindented ``name:`` lines)."""
    lines = status.splitlines()
    return {line.rstrip(":") for line in lines if line.endswith(":") and not line.startswith((" ", "\t"))}


def _lock_without_timing(repo: Path) -> dict:
    """dvc.lock minus the timing outputs (wall seconds, the only nondeterministic ones)."""
    return lock_without_timing(yaml.safe_load((repo / "dvc.lock").read_text()))


@pytest.mark.slow  # the default run covers this across two repos (test_sharing.py)
def test_cold_reruns_are_byte_identical(repo: Path) -> None:
    first = _lock_without_timing(repo)
    _run(["dvc", "repro", "--force"], repo)
    assert _lock_without_timing(repo) == first


def _outputs(repo: Path) -> dict[str, bytes]:
    """Every output file of the pipeline in the workspace (data/, metrics/, plots/), by path."""
    files = [p for top in ("data", "metrics", "plots") for p in sorted((repo / top).rglob("*")) if p.is_file()]
    return {str(p.relative_to(repo)): p.read_bytes() for p in files if not p.is_relative_to(repo / "data" / "check")}


def test_a_params_typo_or_a_missing_file_loses_no_output(repo: Path) -> None:
    """DVC removes a stage's outputs right before running it; the check stage runs first and stops the run
    on a mistyped key, a bad value or a missing weights file, so every output stays in place and the line
    the user reads is ptqflow's (with its hint), not DVC's ``[Errno 2]``."""
    good = (repo / "params.yaml").read_text()
    before = _outputs(repo)
    assert any(k.startswith("data/reconstruct/") for k in before) and "metrics/timing.json" in before
    for section, key, value, says in (
        ("reconstruct", "iter", 300, "unknown key reconstruct.iter; did you mean 'iters'?"),
        ("base", "weights", "weights/missing.pt", "weights file not found: weights/missing.pt; for resnet20,"),
    ):
        params = yaml.safe_load(good)
        params[section][key] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        log = run(["dvc", "repro"], repo, check=False)
        assert _ran(log) == ["check"] and says in log, log
        assert "Errno" not in log
        assert _outputs(repo) == before, f"{section}.{key}: an output was removed or changed"
    (repo / "params.yaml").write_text(good)
    assert _ran(_run(["dvc", "repro"], repo)) == ["check"]  # and nothing after it
    assert (repo / "data/check/check.json").is_file()
    # the same params, a file gone: the check (always run) names it before DVC meets the stage reading it
    data_root = Path(yaml.safe_load(good)["prepare"]["data_root"])
    for path, says in (
        (data_root, f"dataset file not found: {data_root}/train-images-idx3-ubyte.gz; install Debian's package"),
        (repo / "weights/r20.pt", "weights file not found: weights/r20.pt"),
    ):
        path.rename(path.with_name(path.name + ".away"))
        try:
            log = run(["dvc", "repro"], repo, check=False)
        finally:
            path.with_name(path.name + ".away").rename(path)
        assert _ran(log) == ["check"] and says in log and "Errno" not in log, log
        assert _outputs(repo) == before, f"{path.name} missing: an output was removed or changed"
    assert _ran(_run(["dvc", "repro"], repo)) == ["check"]


@pytest.mark.slow  # the installed layout's twin runs by default: tests/stages/test_init.py
def test_editing_an_entry_point_model_reruns_what_it_builds(repo: Path) -> None:
    """A user's model named by an entry point is a tracked dependency (``base.model_code``): editing its
    source reruns features and every later stage that builds the model; the check refuses a
    ``model_code`` that does not hold the entry point's module."""
    good = (repo / "params.yaml").read_text()
    (repo / "usernets.py").write_text(
        "from ptqflow.models import build_model\n\n\ndef resnet20():\n    return build_model('resnet20')\n"
    )
    params = yaml.safe_load(good)
    params["base"].update(model="usernets:resnet20", model_code="src/ptqflow/models.py")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {"PYTHONPATH": str(repo)}
    log = run(["dvc", "repro", "features"], repo, check=False, env=env)
    assert "base.model_code: src/ptqflow/models.py does not hold usernets (usernets.py)" in log, log
    params["base"]["model_code"] = "usernets.py"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(run(["dvc", "repro", "features"], repo, env=env)) == ["check", "features"]
    with (repo / "usernets.py").open("a") as fh:
        fh.write("# edited\n")
    status = run(["dvc", "status"], repo, env=env)
    builders = ["features", "quantize", "sensitivity", "select", "reconstruct", "predict", "export"]
    for stage in builders:
        block = status.split(f"{stage}:\n", 1)[1].split("\n\n", 1)[0] if f"{stage}:\n" in status else ""
        assert "usernets.py" in block, (stage, status)
    assert _ran(run(["dvc", "repro", "features"], repo, env=env)) == ["check", "features"]
    (repo / "params.yaml").write_text(good)
    (repo / "usernets.py").unlink()
    assert _ran(_run(["dvc", "repro"], repo)) == ["check"]  # back to the cold run's params and code: run-cached
