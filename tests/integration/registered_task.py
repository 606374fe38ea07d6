"""A registered (bring-your-own) task for integration tests: the README's breast-cancer ladder
(30 features, 2 classes; four scikit-learn models exported with skl2onnx), registered with
int8 quantization into a models directory of its own, with a policy that
``cascade policy calibrate`` fitted to it. Nothing here is specific to the task's code path:
the tiers, calibrate, the drift alarm and the bench see it only through the model repository."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from tests.conftest import ROOT

TASK = "cancer"
TASK_YAML = """\
input: {kind: features, length: 30}
classes: [benign, malignant]
tiers:
  endpoint:    {file: endpoint.onnx, algorithm: "LR(C=0.002)"}
  edge-node:   {file: edge-node.onnx, algorithm: "MLP(8)"}
  edge-server: {file: edge-server.onnx, algorithm: "MLP(32,16)"}
  cloud:       {file: cloud.onnx, algorithm: "RF(100)", quantize: false}
"""


@dataclass(frozen=True)
class RegisteredTask:
    models_dir: Path
    policy: Path


def register_cancer(root: Path) -> RegisteredTask:
    """Train, export, register (``--quantize int8``) and calibrate (``accuracy>=top``)."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cascade.cli import app
    from cascade.models.register import RegisterRequest, register_task

    folder = root / "byo" / TASK
    folder.mkdir(parents=True)
    data = load_breast_cancer()
    x, y = data.data.astype(np.float32), data.target_names[data.target]
    x_train, x_held, y_train, y_held = train_test_split(
        x, y, test_size=0.5, stratify=y, random_state=0)
    ladder = {"endpoint": LogisticRegression(C=0.002),
              "edge-node": MLPClassifier((8,), max_iter=2000, random_state=0),
              "edge-server": MLPClassifier((32, 16), max_iter=2000, random_state=0),
              "cloud": RandomForestClassifier(100, random_state=0)}
    for tier, estimator in ladder.items():
        model = make_pipeline(StandardScaler(), estimator).fit(x_train, y_train)
        onx = to_onnx(model, x_train[:1], options={"zipmap": False})
        (folder / f"{tier}.onnx").write_bytes(onx.SerializeToString())
    (folder / "task.yaml").write_text(TASK_YAML)
    heldout = root / "byo" / "heldout.npz"
    np.savez(heldout, x=x_held, y=y_held)
    models_dir = root / "models"
    register_task(RegisterRequest(folder=folder, heldout=heldout, models_dir=models_dir,
                                  quantize="int8"))
    policy = root / "policies" / f"{TASK}.yaml"
    policy.parent.mkdir()
    done = CliRunner().invoke(app, [
        "policy", "calibrate", "--models-dir", str(models_dir), "--task", TASK,
        "--goal", "accuracy>=top", "--base", str(ROOT / "policies/default.yaml"),
        "--out", str(policy)])
    assert done.exit_code == 0, done.output
    return RegisteredTask(models_dir=models_dir, policy=policy)
