"""The allow-list of what one run may change, against the shipped params.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks.errors import ConfigError
from tasks.overrides import check_overrides

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "inputs").mkdir()
    return tmp_path


ALLOWED = [
    {"train.epochs": 2, "train.strategy": "lora", "train.learning_rate": 3e-5},
    {"ingest.split.seed": 7, "ingest.split.holdout_fraction": 0.3, "ingest.deduplicate": False},
    {"model.max_length": 128},
    {"shift.on_severe": "block", "shift.severe_ratio": 2.0, "shift.alpha": 0.1},
    {"gate.on_inconclusive": "reject", "gate.worst_group.floor": 0.4, "gate.disparity.max_gap": 0.3},
    {"gate.floors": [{"split": "target_holdout", "metric": "macro_f1", "min": 0.5},
                     {"split": "target_holdout", "metric": "accuracy", "min": 0.55},
                     {"split": "source_holdout", "metric": "macro_f1", "min": 0.35},
                     {"split": "source_holdout", "metric": "accuracy", "min": 0.5}]},
    {"validate.rows.train_min": 100, "validate.min_rows_per_class": 10},
]


@pytest.mark.parametrize("overrides", ALLOWED)
def test_a_run_may_change_training_the_split_and_tighten_policies(project, overrides):
    check_overrides(project, overrides)


def test_a_run_may_name_other_data_files_inside_the_project(project):
    from tasks.config import write_overrides

    # Reading files instead of the demo is the project's own choice, made in params.yaml.
    write_overrides(project / "params.yaml", {"ingest.source": "files", "ingest.split.by": "files",
                                              "ingest.source_files": ["inputs/a.csv"], "ingest.target_files": ["inputs/b.csv"]})
    params = check_overrides(project, {"ingest.target_files": ["inputs/2026-11.jsonl"]})
    assert [str(p) for p in params.ingest.target_files] == ["inputs/2026-11.jsonl"]


REFUSED = [
    ({"paths.shift_plots": ".regraft"}, "paths.shift_plots: not a key a run may change"),
    ({"serve.port": 80}, "serve.port: not a key a run may change"),
    ({"schedule.lock_timeout_seconds": 0}, "schedule.lock_timeout_seconds: not a key a run may change"),
    ({"model.base": "/somewhere/else"}, "model.base: not a key a run may change"),
    ({"evaluate.min_group_size": 1}, "evaluate.min_group_size: not a key a run may change"),
    ({"gate.floors": []}, "the floor target_holdout macro_f1 >= 0.4 would be dropped or lowered"),
    ({"gate.floors": [{"split": "target_holdout", "metric": "macro_f1", "min": 0.1}]}, "would be dropped or lowered"),
    ({"gate.worst_group.floor": 0.1}, "gate.worst_group.floor=0.1 is lower than params.yaml's 0.3"),
    ({"gate.non_inferiority.delta": 0.5}, "is higher than params.yaml's 0.03"),
    ({"gate.on_inconclusive": "approve"}, "a run may only set it to 'reject'"),
    ({"shift.on_severe": "warn", "shift.severe_ratio": 10}, "shift.severe_ratio=10 is higher than"),
    ({"validate.rows.train_min": 1}, "is lower than params.yaml's 50"),
    ({"gate.worst_group.metrics": ["macro_f1"]}, "a run may only add metrics"),
    ({"ingest.target_files": ["/etc/passwd"]}, "is outside the project"),
    ({"ingest.target_files": [".regraft/bentoml/x.csv"]}, "is inside .regraft, which regraft writes"),
    ({"ingest.target_files": ["../elsewhere.csv"]}, "is outside the project"),
    ({"train.epochs": 0}, "train.epochs: Input should be greater than or equal to 1"),
    # Bounded by the machine and by the config, each with its reason; every number finite.
    ({"train.nproc": 100000}, "train.nproc=100000: this machine has"),
    ({"train.threads": 100000}, "train.threads=100000: this machine has"),
    ({"train.batch_size": 100000000}, "train.batch_size: Input should be less than or equal to 4096"),
    ({"train.grad_accum": 1000000000}, "train.grad_accum: Input should be less than or equal to 1024"),
    ({"train.target_weight": float("inf")}, "train.target_weight: Input should be a finite number"),
    ({"train.learning_rate": float("nan")}, "train.learning_rate: Input should be a finite number"),
    ({"train.auto_race_epochs": 1000000}, "train.auto_race_epochs: Input should be less than or equal to 1000"),
    ({"train.seed": 2**40}, "train.seed: Input should be less than or equal to 4294967295"),
    ({"ingest.target_files": [".git/config"]}, "is inside .git, which git or DVC keeps"),
    ({"ingest.target_files": [".dvc/cache/files/md5/ab/cdef"]}, "is inside .dvc, which git or DVC keeps"),
    ({"ingest.target_files": ["reports/evaluate/confusion_target_holdout.csv"]}, "which regraft writes"),
]


@pytest.mark.parametrize("overrides,message", REFUSED)
def test_anything_else_is_refused_naming_the_key(project, overrides, message):
    before = (project / "params.yaml").read_bytes()
    with pytest.raises(ConfigError) as refused:
        check_overrides(project, overrides)
    assert message in str(refused.value)
    assert (project / "params.yaml").read_bytes() == before


@pytest.mark.parametrize("key,value,message", [
    ("paths.shift_plots", ".regraft", "shift_plots (.regraft) overlaps state (.regraft)"),
    ("paths.reports", ".", "overlaps state"),
    ("paths.model", "models/production", "model (models/production) overlaps champion"),
    ("paths.splits.source_train", "/tmp/x.parquet", "must be a relative path inside the project"),
    ("paths.data_docs", "../docs", "must be a relative path inside the project"),
])
def test_params_yaml_keeps_outputs_apart_from_what_regraft_guards(project, key, value, message):
    from tasks.config import load_params

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_params(project / "params.yaml", {key: value})


def test_a_bad_override_is_refused_at_once_while_another_run_holds_the_project(project, monkeypatch):
    from flows.retrain import retrain
    from flows.run_form import RetrainParameters
    from tasks.config import load_params, write_overrides
    from tasks.locking import project_lock

    # Were the check behind the lock, this run would wait its 2 s and fail as busy instead.
    write_overrides(project / "params.yaml", {"schedule.lock_timeout_seconds": 2})
    monkeypatch.setenv("REGRAFT_PROJECT", str(project))
    state = project / load_params(project / "params.yaml").paths.state
    with project_lock(state, "retrain run holder", 5), pytest.raises(ConfigError, match="train.nproc=100000"):
        retrain.fn(RetrainParameters(overrides=["train.nproc=100000"]))


def test_a_run_holding_the_project_does_not_judge_the_next_runs_stricter_override_with_its_own(project):
    from tasks.config import load_params, write_overrides
    from tasks.locking import project_lock
    from tasks.overrides import check_overrides_before_lock

    state = project / load_params(project / "params.yaml").paths.state
    with project_lock(state, "retrain run holder", 5):
        # The holder tightened the gate in params.yaml for its own run; the file goes back when it ends.
        write_overrides(project / "params.yaml", {"gate.forgetting.max_drop": 0.01})
        check_overrides_before_lock(project, {"gate.forgetting.max_drop": 0.02})
        with pytest.raises(ConfigError, match="train.nproc=100000"):
            check_overrides_before_lock(project, {"train.nproc": 100000})
    # Nobody holds it: params.yaml's values are the project's own, and a looser one is refused at once.
    with pytest.raises(ConfigError, match="is higher than params.yaml's 0.01"):
        check_overrides_before_lock(project, {"gate.forgetting.max_drop": 0.02})
