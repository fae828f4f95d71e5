"""The finetune stage as DVC runs it: killed and resumed, and data-parallel over two gloo processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from flows.dvc_stage import stage_environment
from tasks.config import write_overrides
from tests.conftest import make_project, run

pytestmark = pytest.mark.integration
STAGE = [sys.executable, "-m", "pipelines.finetune"]


def training_project(base: Path, tiny_bert: Path, **train) -> Path:
    project = make_project(base / "project", base / "remote")
    run([sys.executable, "-m", "pipelines.ingest"], project)
    settings = {"model.base": str(tiny_bert), "model.max_length": 64, "train.strategy": "full", "train.epochs": 2,
                "train.batch_size": 4, "train.data": "target", "train.precision": "fp32",
                "train.early_stopping_patience": 0, "train.checkpoint_every": 5, "train.log_every": 1,
                "train.learning_rate": 1e-3}
    write_overrides(project / "params.yaml", {**settings, **{f"train.{k}": v for k, v in train.items()}})
    return project


def model_weights(project: Path) -> dict:
    return load_file(project / "models" / "candidate" / "model.safetensors")


def test_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tmp_path, tiny_bert):
    killed = training_project(tmp_path / "killed", tiny_bert)
    process = subprocess.Popen(STAGE, cwd=killed, env=stage_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    checkpoint = killed / ".regraft" / "checkpoints" / "finetune" / "checkpoint.pt"
    for line in process.stdout:
        if line.startswith("finetune: step ") and int(line.split()[2].split("/")[0]) >= 23 and checkpoint.exists():
            process.send_signal(signal.SIGKILL)
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "models" / "candidate").exists()

    import torch

    saved_step = torch.load(checkpoint, weights_only=False)["step"]
    assert saved_step >= 20  # the last checkpoint before the kill, at step 23 or later: not only the first
    resumed = run(STAGE, killed)
    assert f"finetune: resuming from the checkpoint at step {saved_step}" in resumed.stdout
    report = json.loads((killed / "reports" / "finetune.json").read_text())
    assert report["resumed_from_step"] == saved_step
    assert not checkpoint.exists()  # a finished run leaves nothing to resume

    straight = training_project(tmp_path / "straight", tiny_bert)
    run(STAGE, straight)
    a, b = model_weights(killed), model_weights(straight)
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "a resumed run must end with the same weights"


def test_two_gloo_processes_end_with_identical_weights(tmp_path, tiny_bert):
    project = training_project(tmp_path, tiny_bert, nproc=2, epochs=1, threads=1)
    out = run(STAGE, project)
    assert "starting 2 processes" in out.stdout
    report = json.loads((project / "reports" / "finetune.json").read_text())
    assert report["processes"] == 2
    digests = report["rank_weight_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    card = (project / "models" / "candidate" / "README.md").read_text()
    # A local base is named in the text; the front matter's base_model is for hub ids only.
    assert card.startswith("---\n") and f"adapted from `{tiny_bert}`" in card
    assert "2 process(es)" in card


def test_stage_outputs_model_dir_card_and_log(tmp_path, tiny_bert):
    import csv

    from transformers import AutoConfig

    project = training_project(tmp_path, tiny_bert, strategy="gradual_unfreeze", grad_checkpointing=True)
    run(STAGE, project)
    model_dir = project / "models" / "candidate"
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= {p.name for p in model_dir.iterdir()}
    assert not list(model_dir.glob("*.bin"))
    assert [p.name for p in model_dir.parent.iterdir()] == ["candidate"]  # no staging or retired folder left
    assert AutoConfig.from_pretrained(model_dir).id2label == {0: "negative", 1: "neutral", 2: "positive"}
    rows = list(csv.DictReader((project / "reports" / "train_log.csv").open()))
    assert rows and set(rows[0]) == {"step", "epoch", "loss", "learning_rate", "samples_per_second"}
    assert int(rows[-1]["step"]) == len(rows)
    card = (model_dir / "README.md").read_text()
    assert "gradual_unfreeze" in card and "target_train" in card
    # The tiny random encoder is weak, so the lexical companion gets weight, and every reader of the model pools it.
    import numpy as np
    import pandas as pd

    from tasks.baselines import classifier_probabilities
    from tasks.lexical import read_companion
    from tasks.models import load_classifier, load_tokenizer, predict_proba

    lexical = json.loads((project / "reports" / "finetune.json").read_text())["lexical_companion"]
    assert lexical["weight"] > 0 and len(lexical["by_weight"]) == 5 and lexical["served_as"] in card
    texts = pd.read_parquet(project / "data" / "target_holdout.parquet")["text"].tolist()[:20]
    labels = ["negative", "neutral", "positive"]
    served = classifier_probabilities(model_dir, {"holdout": texts}, labels, 64, "candidate")["holdout"]
    encoder = predict_proba(load_classifier(model_dir, labels), load_tokenizer(model_dir), texts, 64).numpy()
    companion = read_companion(model_dir, 3)
    # The pool, then its own temperature (fitted on the validation rows): what is served is calibrated as a whole.
    assert companion.temperature == lexical["pool_temperature"]
    pooled = (1 - lexical["weight"]) * encoder + lexical["weight"] * companion.proba(texts)
    expected = np.exp(np.log(pooled) / companion.temperature)
    np.testing.assert_allclose(served, expected / expected.sum(axis=1, keepdims=True), atol=1e-5)


def test_champion_init_without_a_champion_is_explained(tmp_path, tiny_bert):
    project = training_project(tmp_path, tiny_bert, init="champion")
    failed = run(STAGE, project, check=False)
    assert failed.returncode == 2  # bad configuration
    assert "train.init=champion, but there is no production model at models/production" in failed.stderr
