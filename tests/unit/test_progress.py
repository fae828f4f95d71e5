"""Training progress as data: the finetune loop appends JSON-lines records (tasks/progress.py) that the flow
reads back for its terminal bar, instead of parsing the printed progress line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.progress import PROGRESS_FILE_ENV, append_progress, progress_file, read_progress

pytestmark = pytest.mark.unit


def row(step: int) -> dict:
    return {"step": step, "epoch": 1, "loss": 1.0986, "learning_rate": 1e-4, "samples_per_second": 21.5}


def test_records_are_read_back_in_order_and_only_once(tmp_path):
    path = tmp_path / "finetune.jsonl"
    append_progress(path, {"step": 1, "total": 4})
    append_progress(path, {"step": 2, "total": 4})
    records, offset = read_progress(path)
    assert records == [{"step": 1, "total": 4}, {"step": 2, "total": 4}]
    assert read_progress(path, offset) == ([], offset)
    append_progress(path, {"step": 3, "total": 4})
    assert read_progress(path, offset)[0] == [{"step": 3, "total": 4}]
    assert len(path.read_text().splitlines()) == 3  # one line per record


def test_a_partial_last_line_waits_for_its_end(tmp_path):
    path = tmp_path / "finetune.jsonl"
    append_progress(path, {"step": 1})
    whole = path.read_bytes()
    with open(path, "ab") as out:  # a record caught half written
        out.write(b'{"step": 2, "tot')
    records, offset = read_progress(path)
    assert records == [{"step": 1}] and offset == len(whole)
    with open(path, "ab") as out:
        out.write(b'al": 4}\n')
    assert read_progress(path, offset)[0] == [{"step": 2, "total": 4}]


def test_a_missing_file_holds_no_progress(tmp_path):
    assert read_progress(tmp_path / "none.jsonl") == ([], 0)
    assert read_progress(tmp_path / "none.jsonl", 17) == ([], 17)


def test_a_damaged_line_is_skipped(tmp_path):
    path = tmp_path / "finetune.jsonl"
    path.write_text('not json\n[1, 2]\n{"step": 5}\n')
    assert read_progress(path)[0] == [{"step": 5}]


def test_nan_is_written_as_null(tmp_path):
    path = tmp_path / "finetune.jsonl"
    append_progress(path, {"step": 1, "loss": float("nan"), "eta_seconds": float("inf")})
    assert json.loads(path.read_text()) == {"step": 1, "loss": None, "eta_seconds": None}


@pytest.mark.parametrize("value,expected", [(None, None), ("", None), ("/tmp/p.jsonl", Path("/tmp/p.jsonl"))])
def test_the_file_comes_from_the_environment(monkeypatch, value, expected):
    monkeypatch.delenv(PROGRESS_FILE_ENV, raising=False)
    if value is not None:
        monkeypatch.setenv(PROGRESS_FILE_ENV, value)
    assert progress_file() == expected


def test_the_training_loop_appends_a_record_at_each_progress_point_and_still_prints(tmp_path, monkeypatch, capsys):
    from tasks.progress import Progress

    path = tmp_path / "finetune.jsonl"
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(path))
    progress = Progress(total=5, every=2, enabled=True)
    for step in range(1, 6):
        progress.update(step, row(step))
    progress.close()
    records, _ = read_progress(path)
    assert [r["step"] for r in records] == [2, 4, 5]  # every 2 steps and the last
    assert set(records[0]) == {"step", "total", "epoch", "loss", "learning_rate", "samples_per_second",
                               "eta_seconds"}
    assert records[-1]["total"] == 5 and records[-1]["samples_per_second"] == 21.5
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("finetune: step ")]
    assert len(printed) == 3 and "21.5 samples/s" in printed[0]


def test_without_the_variable_or_off_rank_0_nothing_is_written(tmp_path, monkeypatch):
    from tasks.progress import Progress

    monkeypatch.delenv(PROGRESS_FILE_ENV, raising=False)
    Progress(total=2, every=1, enabled=True).update(1, row(1))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(tmp_path / "finetune.jsonl"))
    Progress(total=2, every=1, enabled=False).update(1, row(1))  # another rank, or progress off
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_progress_file_does_not_stop_training(tmp_path, monkeypatch, capsys):
    from tasks.progress import Progress

    monkeypatch.setenv(PROGRESS_FILE_ENV, str(tmp_path / "missing" / "finetune.jsonl"))
    progress = Progress(total=3, every=1, enabled=True)
    for step in range(1, 4):
        progress.update(step, row(step))
    out = capsys.readouterr().out
    assert out.count("no more progress records") == 1 and out.count("finetune: step ") == 3


def test_the_flows_bar_follows_the_records(tmp_path):
    from flows.dvc_stage import TerminalProgress

    path = tmp_path / "finetune.jsonl"
    progress = TerminalProgress(enabled=True, path=path, name="finetune")
    progress.poll()
    assert progress.bar is None  # no file yet: no progress
    append_progress(path, {"step": 3, "total": 40, "samples_per_second": 21.5})
    append_progress(path, {"step": 7, "total": 40, "samples_per_second": 22.0})
    with open(path, "a") as out:
        out.write('{"step": 9, "total"')  # still being written
    progress.poll()
    assert (progress.bar.n, progress.bar.total) == (7, 40)
    progress.close()
    quiet = TerminalProgress(enabled=False, path=path, name="finetune")
    quiet.start()
    quiet.poll()
    quiet.close()
    assert quiet.bar is None


def test_the_flows_bar_reads_the_last_records_when_the_stage_ends(tmp_path):
    from flows.dvc_stage import TerminalProgress

    path = tmp_path / "finetune.jsonl"
    progress = TerminalProgress(enabled=True, path=path, name="finetune", interval=60)
    progress.start()
    append_progress(path, {"step": 40, "total": 40, "samples_per_second": 22.0})
    progress.close()  # the stage ended before the next poll: close polls once more
    assert progress.bar.n == 40 and not progress.follower.is_alive()
