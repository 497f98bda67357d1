#!/usr/bin/env bash
# ptqflow as a user gets it: a wheel in a new venv, no checkout on any path, `ptqflow init` in a fresh git
# repository with the user's own entry-point model and image folder, `dvc repro`, and a `pip install -U` of a
# release whose only change is one line of ptqflow/plan.py (only `check` and `plan` should rerun).
#
#   bash bench/installed_project.sh [WORKDIR]      # default: a new temporary folder; prints what ran
#
# Needs python3.11 and the package index (the venv installs torch, dvc, ... with the wheel).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK"
PY="${PYTHON:-python3.11}"

echo "== wheels (0.1.0 from this checkout; 0.1.1 = the same with one changed line in ptqflow/plan.py)"
"$PY" -m pip wheel -q --no-deps "$REPO" -w "$WORK/dist"
mkdir -p "$WORK/next"
(cd "$REPO" && git ls-files -z pyproject.toml README.md src stages | xargs -0 cp --parents -t "$WORK/next")
sed -i 's/^version = "\(.*\)"/version = "\1.post1"/' "$WORK/next/pyproject.toml"
echo "# the next release: a changed comment in the MRECG planner" >> "$WORK/next/src/ptqflow/plan.py"
"$PY" -m pip wheel -q --no-deps "$WORK/next" -w "$WORK/dist-next"
unzip -l "$WORK"/dist/ptqflow-*.whl | awk 'NR > 3 && $4 != "" {print $4}' | sed 's|/[^/]*$|/|' | sort | uniq -c

echo "== a new venv with the wheel and its export extra"
"$PY" -m venv "$WORK/venv"
WHEEL="$(ls "$WORK"/dist/ptqflow-*.whl)"
"$WORK/venv/bin/pip" install -q "$WHEEL[export]"
export PATH="$WORK/venv/bin:/usr/bin:/bin"
cd "$WORK"
time ptqflow --version

echo "== the user's project: an entry-point model of the repository, a generated image folder"
rm -rf project images && git init -q -b main project && cd project
git config user.email user@example.invalid && git config user.name user
mkdir nets weights
touch nets/__init__.py
cp "$REPO/tests/support/user_project_net.py" nets/cnn.py  # the same model file as tests/stages/test_init.py
python - <<'EOF'
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, ".")
from nets.cnn import build

torch.manual_seed(0)
torch.save(build().state_dict(), "weights/cnn.pt")
rng = np.random.default_rng(0)
for split, count in (("train", 6), ("val", 3)):
    for c in range(3):
        folder = Path("../images") / split / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
EOF
ptqflow init --model nets.cnn:build --weights weights/cnn.pt --data "imagefolder:$WORK/images" --image-size 32
python - <<'EOF'
import yaml

p = yaml.safe_load(open("params.yaml"))
p["base"]["device"] = "cpu"
p["prepare"]["calib_size"] = 16
p["features"].update(batch_size=8, chunk_size=8, shard_size=8)
p["quantize"].update(calib_size=8, batch_size=8)
p["sensitivity"].update(samples=8, batch_size=8)
p["reconstruct"].update(iters=4, act_iters=2, batch_size=4)
p["predict"]["batch_size"] = 4
p["export"]["batch_size"] = 4
p["evaluate"]["topk"] = [1]
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
EOF
git add -A && git commit -qm "ptqflow init"
echo "== dvc repro (cold)"
time dvc repro 2>&1 | grep -E "^Running stage|ERROR|^Error"
echo "== dvc repro (again)"
dvc repro 2>&1 | grep -E "^Running stage|ERROR|^Error"
echo "== pip install -U: the next release"
pip install -q -U --no-deps "$(ls "$WORK"/dist-next/ptqflow-*.whl)"
ptqflow --version
echo "== dvc repro (after the upgrade)"
dvc repro 2>&1 | grep -E "^Running stage|ERROR|^Error"
ptqflow report
