"""What one run may change (`regraft run --set`, the UI's run form, a deployment's parameters): an explicit
allow-list, checked against the project's own params.yaml before anything runs.

- Training knobs, the holdout split and the pretrained model's input length: any valid value.
- Training knobs within what this machine has: no more processes than its GPUs (or its usable cores
  without one), no more threads than its usable cores; every number finite and within the bounds that
  tasks/config.py gives with their reasons.
- The data files to ingest: any files inside the project, outside git's and DVC's own folders (`.git/`,
  `.dvc/`) and everything regraft writes or guards (the state folder, the registry, the production model,
  every stage output).
- Validation, shift and gate policies: only in the direction that makes the run stricter (a higher floor,
  a smaller allowed gap, blocking on a severe shift, rejecting an undecided verdict).
Everything else (`paths.*`, `serve.*`, `package.*`, `schedule.*`, `evaluate.*`, the base model, ...) is a
change to the project's configuration: edit params.yaml and commit it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import Params, load_params
from tasks.errors import ConfigError
from tasks.locking import current_holder

# Keys (or sections, ending in ".") a run may set to any valid value.
FREE = ("train.", "ingest.split.", "ingest.deduplicate", "model.max_length", "validate.examples")
# Lists of input files: allowed inside the project, never inside what regraft writes or guards.
DATA_FILES = ("ingest.files", "ingest.source_files", "ingest.target_files")
# Policies a run may only tighten: "up" means a larger value is stricter, "down" a smaller one.
STRICTER = {
    "validate.text_min_chars": "up", "validate.text_max_chars": "down", "validate.min_rows_per_class": "up",
    "validate.max_group_null_fraction": "down", "validate.max_label_conflict_fraction": "down", "validate.rows.train_min": "up", "validate.rows.holdout_min": "up",
    "validate.rows.max": "down",
    "shift.alpha": "up", "shift.severe_ratio": "down",
    "gate.non_inferiority.delta": "down", "gate.worst_group.floor": "up", "gate.disparity.max_gap": "down",
    "gate.disparity.max_increase": "down", "gate.forgetting.max_drop": "down", "gate.baselines.margin": "down",
}
# Choices a run may only move to the strict one.
STRICT_CHOICE = {"shift.on_severe": "block", "gate.on_inconclusive": "reject"}
# Keys judged against params.yaml's current values.
RELATIVE = {*STRICTER, *STRICT_CHOICE, "gate.floors", "gate.worst_group.metrics"}


def check_overrides(project: Path, overrides: dict[str, Any], relative: bool = True) -> Params:
    """The project's params with `overrides` applied, or ConfigError naming the first key a run may not set
    (or may not set that way). Nothing is written. With `relative` False, what depends on params.yaml's
    current policy values (stricter-only keys) is left for a later check."""
    current = load_params(project / "params.yaml")
    for key, value in overrides.items():
        check_override(key, value, current, project, relative)
    return load_params(project / "params.yaml", overrides)


def check_overrides_before_lock(project: Path, overrides: dict[str, Any]) -> None:
    """Refuse a bad override before waiting for the project lock. A run that holds the lock has written its own
    overrides into params.yaml (DVC's stages read them there), so while one does, "stricter than params.yaml"
    would be judged against that run's values: then only what does not depend on them is checked here, and the
    rest again under the lock."""
    try:
        check_overrides(project, overrides)
    except ConfigError:
        # Asked after the read: a run that changed params.yaml under us still holds the lock now.
        if current_holder(project / load_params(project / "params.yaml").paths.state) is None:
            raise
        check_overrides(project, overrides, relative=False)


def check_override(key: str, value: Any, current: Params, project: Path, relative: bool = True) -> None:
    if any(key == free or (free.endswith(".") and key.startswith(free)) for free in FREE):
        if key in MACHINE_BOUND:
            check_machine_bound(key, value)
        return
    if key in DATA_FILES:
        check_data_files(key, value, current, project)
        return
    if not relative and key in RELATIVE:
        return  # types and bounds are still checked by load_params
    if key in STRICTER:
        check_stricter(key, value, current_value(current, key), STRICTER[key])
        return
    if key in STRICT_CHOICE:
        if value != STRICT_CHOICE[key] and value != current_value(current, key):
            raise ConfigError(f"{key}={value!r}: a run may only set it to {STRICT_CHOICE[key]!r} (stricter); "
                              "change params.yaml to loosen it")
        return
    if key == "gate.floors":
        check_floors(value, current)
        return
    if key == "gate.worst_group.metrics":
        if not isinstance(value, list) or not set(current.gate.worst_group.metrics) <= set(value):
            raise ConfigError(f"{key}={value!r}: a run may only add metrics to {current.gate.worst_group.metrics}")
        return
    raise ConfigError(f"{key}: not a key a run may change (allowed: training, the holdout split, the data files, "
                      "stricter validation, shift and gate policies); change params.yaml itself and commit it")


def check_machine_bound(key: str, value: Any) -> None:
    """A run asks for at most what the machine has: one UI user must not start 100,000 processes."""
    if isinstance(value, bool) or not isinstance(value, int):
        return  # the config's own type check names it
    limit, what = MACHINE_BOUND[key]()
    if value > limit:
        raise ConfigError(f"{key}={value}: this machine has {limit} {what}; a run may ask for at most that many")


def process_limit() -> tuple[int, str]:
    # tasks.devices imports torch (seconds): paid only when a run asks for processes or threads.
    from tasks.devices import gpu_count, usable_cores

    gpus = gpu_count()
    return (gpus, "GPUs") if gpus else (usable_cores(), "usable CPU cores (and no GPU)")


def thread_limit() -> tuple[int, str]:
    from tasks.devices import usable_cores

    return usable_cores(), "usable CPU cores"


# Training knobs whose sane maximum is the machine's own size, read when a run asks.
MACHINE_BOUND = {"train.nproc": process_limit, "train.threads": thread_limit}
# Folders no input file may come from: git's and DVC's own (their objects and caches are not data files).
TOOL_FOLDERS = (".git", ".dvc")


def current_value(params: Params, key: str) -> Any:
    node: Any = params.model_dump(mode="json", by_alias=True)
    for part in key.split("."):
        node = node[part]
    return node


def check_stricter(key: str, value: Any, current: Any, direction: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r}: expected a number")
    looser = value < current if direction == "up" else value > current
    if looser:
        word = "lower" if direction == "up" else "higher"
        raise ConfigError(f"{key}={value!r} is {word} than params.yaml's {current!r}: a run may only make it stricter")


def check_floors(value: Any, current: Params) -> None:
    """A run may raise floors and add new ones, never drop or lower one."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"gate.floors={value!r}: expected a list of {{split, metric, min}}")
    for floor in current.gate.floors:
        kept = [v for v in value if v.get("split") == floor.split and v.get("metric") == floor.metric]
        if not kept or max(float(v.get("min", 0)) for v in kept) < floor.min:
            raise ConfigError(f"gate.floors: the floor {floor.split} {floor.metric} >= {floor.min} would be dropped "
                              "or lowered; a run may only raise floors or add new ones")


def check_data_files(key: str, value: Any, current: Params, project: Path) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}={value!r}: expected a list of file paths")
    root = project.resolve()
    named = current.paths.model_dump()
    guarded = [*TOOL_FOLDERS, *named.pop("splits").values(), *named.values()]
    for raw in value:
        path = (root / raw).resolve()
        if root not in path.parents:
            raise ConfigError(f"{key}: {raw} is outside the project {root}; copy the file into the project")
        for inside in guarded:
            guard = (root / inside).resolve()
            if path == guard or guard in path.parents:
                owner = "git or DVC keeps" if str(inside) in TOOL_FOLDERS else "regraft writes"
                raise ConfigError(f"{key}: {raw} is inside {inside}, which {owner}; keep inputs elsewhere")
