"""Progress and logs: a tqdm bar on a terminal, plain periodic lines otherwise, silence under --quiet."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import write_fake_fashion_mnist
from tiny_repo import ROOT, tiny_params

from ptqflow.models import build_model
from stages.logs import track

SNIPPET = (
    "import logging, time\n"
    "from stages.logs import configure_logging, track\n"
    "configure_logging({verbosity})\n"
    "for _ in track(range(40), 40, 'work'):\n"
    "    time.sleep(0.01)\n"
    "logging.getLogger('ptqflow').info('done')\n"
)


def test_track_logs_about_every_tenth_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ptqflow")
    assert list(track(iter(range(50)), 50, "work")) == list(range(50))
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == [f"work: {i}/50" for i in range(5, 51, 5)]
    # each line carries the rate and the time left; the last one the elapsed time
    assert all(re.fullmatch(r"work: \d+/50, [\d.e+]+ (it/s|s/it), ETA \d+m\d\ds", line) for line in lines[:-1]), lines
    assert re.fullmatch(r"work: 50/50, [\d.e+]+ (it/s|s/it), [\d.]+s", lines[-1]), lines


def test_pace_reads_like_a_clock() -> None:
    from stages.logs import _pace

    began = time.perf_counter() - 10.0  # 10 s for 5 of 30 items: 2 s each, 50 s left
    assert _pace(5, 30, began).startswith("2 s/it, ETA 0m5") and _pace(0, 30, began) == "starting"
    assert _pace(6000, 8000, time.perf_counter() - 3000) == "2 it/s, ETA 16m40s"
    assert _pace(1, 10_000, time.perf_counter() - 1).endswith("ETA 2h46m")


def test_track_is_silent_below_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ptqflow")
    assert list(track(range(7), 7, "work")) == list(range(7))
    assert caplog.records == []


def _run_python(code: str, tty: bool) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    if not tty:
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return result.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO once the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    return b"".join(chunks).decode(errors="replace")


def test_terminal_gets_a_bar_pipe_gets_lines() -> None:
    piped = _run_python(SNIPPET.format(verbosity=0), tty=False)
    assert "INFO ptqflow: work: 4/40" in piped and "INFO ptqflow: work: 40/40" in piped
    assert "\r" not in piped and " [" not in piped  # no tqdm bar; the lines carry rate and ETA instead
    assert re.search(r"INFO ptqflow: work: 4/40, [\d.e+]+ it/s, ETA \d+m\d\ds", piped), piped
    terminal = _run_python(SNIPPET.format(verbosity=0), tty=True)
    assert "work:" in terminal and "/40 [" in terminal and "\r" in terminal  # tqdm redraws in place
    assert "INFO ptqflow: work: 4/40" not in terminal
    quiet = _run_python(SNIPPET.format(verbosity=-1), tty=True)
    assert "work" not in quiet and "done" not in quiet  # --quiet: no bar, no info lines


def test_stage_cli_progress_and_quiet(tmp_path: Path) -> None:
    """`ptqflow features` off a terminal logs batch progress; `ptqflow -q` prints nothing on success, `-v`
    adds debug lines."""
    data_root = write_fake_fashion_mnist(tmp_path / "fm", train=64, test=10)
    params = tiny_params(data_root)
    params["base"]["weights"] = str(tmp_path / "r20.pt")
    params["features"]["batch_size"] = 4  # 32 images: 8 batches
    torch.save(build_model("resnet20").state_dict(), tmp_path / "r20.pt")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def ptqflow(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = ["ptqflow", "--params", str(tmp_path / "params.yaml"), *args]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=True)

    verbose = ptqflow("-v", "prepare", "--out", "prep").stderr
    assert "DEBUG ptqflow: kernels " in verbose and "INFO ptqflow: " in verbose  # -v: debug lines too
    loud = ptqflow("features", "--calibration", "prep/calibration.pt", "--out", "store.zarr").stderr
    lines = [line for line in loud.splitlines() if "features: " in line and "/8" in line]
    assert [line.split(",")[0] for line in lines] == [f"INFO ptqflow: features: {i}/8" for i in range(1, 9)]
    assert all((" ETA " in line) == (i < 7) for i, line in enumerate(lines)), lines  # the last: elapsed
    quiet = ptqflow("-q", "features", "--calibration", "prep/calibration.pt", "--out", "store2.zarr")
    assert quiet.stderr == "" and quiet.stdout == ""
