"""The one-page HTML report shows values from the data and people's text as text, never as markup."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit
ATTACK = "<img src=x onerror=alert(1)>"


def test_group_values_and_a_reviewers_reason_are_escaped(tmp_path):
    from tasks.report import html_report

    criterion = f"worst group: condition={ATTACK} accuracy"
    verdict = {"stage": "gate", "verdict": "INCONCLUSIVE", "champion": False, "criteria": [
        {"name": criterion, "status": "INCONCLUSIVE", "value": 0.5, "interval": [0.3, 0.7], "threshold": 0.5,
         "direction": ">=", "margin": -0.2, "p_meets": 0.2, "p_violates": 0.3, "detail": "n=12"}],
        "failed": [], "inconclusive": [criterion],
        "insufficient_data": [{"column": "condition", "group": ATTACK, "n": 3, "detail": "fewer than 10 rows"}],
        "notes": [f"note {ATTACK}"]}
    decision = {"verdict": "INCONCLUSIVE", "verdict_sha256": "0" * 64, "approved": True,
                "by": "<script>alert(2)</script>", "reason": f"looked fine {ATTACK}", "undecided": [criterion],
                "at": "2026-11-25T00:00:00+00:00"}
    page = html_report([("verdict", verdict), ("decision", decision)], {}, f"run {ATTACK}", tmp_path / "no-log.csv")
    assert "<img" not in page and "<script>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;script&gt;" in page


def test_the_page_shows_estimated_against_realized_performance_once_there_is_history(tmp_path):
    from tasks.report import html_report
    from tests.unit.test_monitoring import estimated

    history = [estimated((0, 9)), {"kind": "realized", "estimate_id": "e0", "realized": {"accuracy": 0.75}}]
    assert "id='production-performance'" not in html_report([], {}, "run", tmp_path / "no-log.csv")
    page = html_report([], {}, "run", tmp_path / "no-log.csv", history)
    assert "id='production-performance'" in page and "data:image/png;base64," in page
