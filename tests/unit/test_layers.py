"""Layering that a refactor could quietly undo: the control plane (the flow, the CLI, the renderers) loads
no model code, and the UI's run form is derived from the configuration, not declared twice."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("module", ["flows.retrain", "flows.cli", "flows.operations", "flows.deployments", "tasks.render"])
def test_the_control_plane_imports_no_torch(module):
    # A fresh interpreter: this test process has torch loaded already.
    code = f"import sys, {module}; heavy = [m for m in ('torch', 'transformers', 'bentoml') if m in sys.modules]; print(heavy)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", f"importing {module} loads {done.stdout.strip()}"


def test_the_run_form_takes_type_bounds_and_help_from_the_config():
    from flows.run_form import FORM_FIELDS, RetrainParameters
    from tasks.config import config_field

    schema = RetrainParameters.model_json_schema()["properties"]
    for name, key in FORM_FIELDS.items():
        field = config_field(key)
        assert schema[name]["description"].startswith(field.description)
        assert schema[name]["param"] == key
    # epochs: the config allows up to 1000 (the form once said 100).
    assert schema["epochs"]["anyOf"][0]["maximum"] == config_field("train.epochs").metadata[-1].le == 1000
    assert RetrainParameters(epochs=1000).as_overrides() == {"train.epochs": 1000}
    with pytest.raises(ValueError, match="holdout_fraction"):
        RetrainParameters(holdout_fraction=1.5)
    # A form field wins over the same key typed as a free-form override.
    assert RetrainParameters(epochs=3, overrides=["train.epochs=9"]).as_overrides() == {"train.epochs": 3}
