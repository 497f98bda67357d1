"""``ptqflow init`` in a user's own git repository: the files it writes, what it refuses, and the pipeline it
writes run end to end on a tiny entry-point model and a generated image folder."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import write_fake_image_folder
from tiny_repo import GIT_ENV, ROOT, ran_stages, run

from ptqflow.errors import ConfigError
from stages import init
from stages.template import FULL, PLOT_FILES, PLOT_PAGE, UNIFORM

#: The user's model file, copied into the project as nets/cnn.py.
NET = (Path(__file__).resolve().parents[1] / "support" / "user_project_net.py").read_text()


def _git_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=path, check=True, env={**GIT_ENV, "PATH": "/usr/bin:/bin"})
    return path


def test_init_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not the top of a git repository"):
        init.run(tmp_path, model="resnet20", weights="w.pt", data="imagefolder:/data")
    repo = _git_repo(tmp_path / "repo")
    with pytest.raises(ConfigError, match="ptqflow init needs --weights, --data"):
        init.run(repo, model="resnet20")
    with pytest.raises(ConfigError, match="--data must be imagefolder:PATH"):
        init.run(repo, model="resnet20", weights="w.pt", data="/data/imagenet")
    with pytest.raises(ConfigError, match="--preset: unknown preset 'imagenet-resnet19'; allowed: imagenet-mnas"):
        init.run(repo, preset="imagenet-resnet19")
    with pytest.raises(ConfigError, match="--model and --preset exclude each other"):
        init.run(repo, preset="imagenet-resnet18", model="resnet20")
    assert sorted(p.name for p in repo.iterdir()) == [".git"]  # nothing written by a refusal
    (repo / "params.yaml").write_text("mine: 1\n")
    with pytest.raises(ConfigError, match="params.yaml already exist in .*; pass --force to overwrite"):
        init.run(repo, model="resnet20", weights="w.pt", data="imagefolder:/data")
    assert (repo / "params.yaml").read_text() == "mine: 1\n" and not (repo / "dvc.yaml").exists()


def test_init_from_a_preset_keeps_its_settings_and_takes_the_data(tmp_path: Path) -> None:
    repo = _git_repo(tmp_path / "repo")
    init.run(repo, preset="imagenet-resnet18", weights="/models/r18.pth", data="imagefolder:/data/in1k")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["base"]["model"] == "torchvision.resnet18" and params["base"]["weights"] == "/models/r18.pth"
    assert params["prepare"]["data_root"] == "/data/in1k" and params["reconstruct"]["iters"] == 20000
    assert "model_code" not in params["base"]  # the checkout layout's key: init fingerprints the code instead
    assert "# Published ImageNet top-1" in (repo / "params.yaml").read_text()  # the comments come along
    assert list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]) == list(UNIFORM)
    assert (repo / ".dvc").is_dir()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_image_folder(tmp_path_factory.mktemp("images"), classes=3, train_per_class=4, val_per_class=2)


def _initialised(tmp_path: Path, images: Path) -> tuple[Path, dict[str, Any]]:
    """A fresh git repo with an entry-point model of its own, after ``ptqflow init``, params shrunk."""
    repo = _git_repo(tmp_path / "repo")
    (repo / "nets").mkdir()
    (repo / "nets" / "__init__.py").write_text("")
    (repo / "nets" / "cnn.py").write_text(NET)
    (repo / "weights").mkdir()
    namespace: dict[str, Any] = {}
    exec(compile(NET, "nets/cnn.py", "exec"), namespace)  # the user's file, without importing it here
    torch.manual_seed(0)
    torch.save(namespace["build"]().state_dict(), repo / "weights" / "cnn.pt")
    out = run(
        ["ptqflow", "init", "--model", "nets.cnn:build", "--weights", "weights/cnn.pt", "--data",
         f"imagefolder:{images}", "--image-size", "32"], repo,
    )  # fmt: skip
    assert "wrote" in out and (repo / ".dvc").is_dir()
    for name in PLOT_FILES:  # the plot templates and the page with a charset, as this checkout has them
        assert (repo / ".dvc" / "plots" / name).read_bytes() == (ROOT / ".dvc" / "plots" / name).read_bytes()
    assert run(["dvc", "config", "plots.html_template"], repo).strip() == PLOT_PAGE
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["base"]["model"] == "nets.cnn:build" and params["prepare"]["image_size"] == 32
    params["base"]["device"] = "cpu"
    params["prepare"]["calib_size"] = 12
    params["features"].update(batch_size=6, chunk_size=6, shard_size=6)
    params["quantize"].update(calib_size=6, batch_size=6)
    params["quantize"]["bits"] = {k: params["quantize"]["bits"][k] for k in ("w3a4", "w2a4")}
    params["sensitivity"].update(samples=6, batch_size=6)
    params["reconstruct"].update(targets=["w2a4", "mp"], iters=2, act_iters=1, batch_size=4)
    params["predict"]["batch_size"] = 3
    params["export"]["batch_size"] = 3
    params["evaluate"]["topk"] = [1]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo, params


def test_an_initialised_repo_runs_its_first_stages_and_follows_the_model_code(tmp_path: Path, images: Path) -> None:
    """The default run's share of the end-to-end test below (its first three stages): a params edit that is
    not upstream of a stage leaves it alone, one that is reruns it, and so does an edit of the model's
    source (through the check stage's fingerprints)."""
    repo, params = _initialised(tmp_path, images)
    assert ran_stages(run(["dvc", "repro", "features"], repo)) == ["check", "features", "prepare"]
    assert ran_stages(run(["dvc", "repro", "features"], repo)) == ["check"]
    params["quantize"]["p"] = 2.0  # downstream of features only
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran_stages(run(["dvc", "repro", "features"], repo)) == ["check"]
    with (repo / "nets" / "cnn.py").open("a") as fh:
        fh.write("# edited\n")
    assert ran_stages(run(["dvc", "repro", "features"], repo)) == ["check", "features"]  # not prepare


@pytest.mark.slow  # about 90 s: bench/installed_project.sh measures the same from a wheel
def test_an_initialised_repo_runs_and_reruns_only_what_changed(tmp_path: Path, images: Path) -> None:
    """init in a fresh git repo with an entry-point model of the repo, `dvc repro` (every stage, mixed
    precision and export on the image folder), a params edit reruns only its downstream, an edit of the
    model's source reruns every stage that builds the model (through the check stage's fingerprints)."""
    repo, params = _initialised(tmp_path, images)
    assert ran_stages(run(["dvc", "repro"], repo)) == sorted(FULL)
    metrics = yaml.safe_load((repo / "metrics" / "export.json").read_text())
    assert metrics["samples"] == 6 and {"w2a4", "mp"} <= set(metrics)
    assert ran_stages(run(["dvc", "repro"], repo)) == ["check"]  # the check always runs; nothing after it

    params["evaluate"]["topk"] = [1, 2]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran_stages(run(["dvc", "repro"], repo)) == ["check", "evaluate"]

    with (repo / "nets" / "cnn.py").open("a") as fh:
        fh.write("# edited\n")
    run(["dvc", "repro", "check"], repo)
    status = run(["dvc", "status"], repo)
    stale = {line.rstrip(":") for line in status.splitlines() if line and not line.startswith(("\t", " "))}
    assert stale == {"check", "features", "quantize", "sensitivity", "select", "reconstruct", "predict", "export"}
    assert "modified:           data/check/code/features.json" in status or "data/check/code/features.json" in status
