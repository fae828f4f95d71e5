"""Reports as Markdown and text, for Prefect artifacts, the HTML page and the terminal.

Renderers read the JSON reports the stages write; this module imports nothing heavy (no torch, no
stage logic), so the flow and the CLI can show every report without loading a model.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from tasks.reports import (LABEL_SHIFT, Calibration, Decision, EvaluateReport, EvidenceLadder, FinetuneReport,
                           IngestReport, PackageReport, ShiftAnalysis, ShiftReport, StrategyEvidence,
                           ServedPerformance, ShadowReport, ValidateReport, Verdict, parse_report)


def ingest_markdown(report: IngestReport) -> str:
    """The ingest report as a Markdown table: rows and label mix per split."""
    lines = ["# Ingest", "", "| split | rows | labels | time range |", "|---|---:|---|---|"]
    for name, split in report.splits.items():
        labels = ", ".join(f"{k}: {v}" for k, v in split.labels.items())
        span = " to ".join(split.time_range) if split.time_range else "-"
        lines.append(f"| {name} | {split.rows} | {labels} | {span} |")
    return "\n".join(lines) + "\n"


def validate_markdown(report: ValidateReport) -> str:
    """The validation result as Markdown: one row per split, then every failure in plain words."""
    verdict = "passed" if report.success else "FAILED"
    lines = [f"# Validation {verdict}", "", "| split | rows | expectations | failed |", "|---|---:|---:|---:|"]
    for name, split in report.splits.items():
        lines.append(f"| {name} | {split.rows} | {split.expectations} | {split.failed} |")
    if report.failures:
        lines += ["", "## Failures", ""] + [f"- {m}" for m in report.failures]
    lines += ["", f"Data Docs: `{report.data_docs}`"]
    return "\n".join(lines) + "\n"


def print_validation_outcome(report: ValidateReport) -> int:
    """Print the outcome in plain words; failures go to stderr and return 1 (the suite said no)."""
    if report.success:
        print(validate_markdown(report))
        return 0
    print("validation failed:", file=sys.stderr)
    for message in report.failures:
        print(f"  - {message}", file=sys.stderr)
    print(f"details: {report.data_docs}", file=sys.stderr)
    return 1


def shift_markdown(report: ShiftAnalysis) -> str:
    """The shift report as Markdown: verdict, reasons, one row per test."""
    lines = [f"# Domain shift: {report.verdict}", "", *[f"- {r}" for r in report.reasons], "",
             "| test | effect | cut-off | p-value | flagged |", "|---|---:|---:|---:|---|"]
    for t in report.tests:
        # A statistic that is not finite is None in the report: shown as "-", like a missing cut-off.
        effect, cutoff, p_value = ("-" if v is None else f"{v:.3g}" for v in (t.effect, t.cutoff, t.p_value))
        flag = "severe" if t.severe else ("yes" if t.flagged else "no")
        lines.append(f"| {t.name} ({t.effect_name}) | {effect} | {cutoff} | {p_value} | {flag} |")
    label = report.test(LABEL_SHIFT)
    if label:
        d = label.priors
        lines += ["", "| class | source prior | target (labelled) | target (estimated, 95% interval) |", "|---|---:|---:|---:|"]
        for i, name in enumerate(d.labels):
            labelled = d.labelled_target_prior
            lines.append(f"| {name} | {d.source_prior[i]:.3f} | {labelled[i]:.3f} | " if labelled else
                         f"| {name} | {d.source_prior[i]:.3f} | - | ")
            if d.estimated_target_prior is not None:
                lines[-1] += (f"{d.estimated_target_prior[i]:.3f} ({d.estimated_interval_95[0][i]:.3f}-"
                              f"{d.estimated_interval_95[1][i]:.3f}) |")
            else:
                lines[-1] += "- |"
        if d.note:
            lines += ["", f"Estimated target priors: {d.note}."]
    return "\n".join(lines) + "\n"


def performance_markdown(performance: ServedPerformance, history: list[dict]) -> str:
    """The production model's estimated performance on serving traffic, each method's estimate, and the history of
    estimates with the realized performance where labels have arrived."""
    drop = performance.drop
    pct = f"{performance.confidence:.0%}"
    lines = [f"# Estimated performance on serving traffic: {performance.verdict}", "",
             f"- validated {drop.metric}: {drop.validated:.3f} on {performance.validated['rows']} holdout rows",
             f"- estimated on {performance.target_rows} served texts: {_interval(drop.estimated, drop.interval)} "
             f"({pct} interval); drop {drop.drop:+.3f}, limit {drop.max_drop:.3f}: "
             + ("**degraded**" if drop.degraded else "not shown to exceed the limit"),
             *[f"- {note}" for note in performance.notes], "",
             f"| method | accuracy ({pct} interval) | macro-F1 ({pct} interval) | note |", "|---|---|---|---|"]
    for name, m in performance.methods.items():
        detail = m.detail
        note = (f"effective rows {detail['effective_sample_size']:.0f}" + ("" if detail.get("used") else ", not used")
                if "effective_sample_size" in detail else "")
        lines.append(f"| {name} | {_interval(m.accuracy, m.accuracy_interval)} | "
                     f"{_interval(m.macro_f1, m.macro_f1_interval)} | {note} |")
    realized = {row["estimate_id"]: row for row in history if row.get("kind") == "realized"}
    estimates = [row for row in history if row.get("kind") == "estimate"][-20:]
    if estimates:
        lines += ["", "## History (latest 20)", "", "| time | model | served | estimated accuracy | realized accuracy (labelled rows) |",
                  "|---|---|---:|---|---|"]
        for row in estimates:
            done = realized.get(row["id"])
            truth = f"{done['realized']['accuracy']:.3f} ({done['labelled_rows']})" if done else "no labels yet"
            acc = row["estimated"]["accuracy"]
            lines.append(f"| {row['time']} | {row['production_model']} | {row['served_rows']} | "
                         f"{_interval(acc['estimate'], acc['interval'])} | {truth} |")
    return "\n".join(lines) + "\n"


def interval_text(values: list | tuple | None, signed: bool = False, missing: str = "n/a") -> str:
    """An interval as every report shows it: [low, high] to three decimals, signed for differences; `missing` when
    either end is unknown."""
    if not values or None in values:
        return missing
    spec = "+.3f" if signed else ".3f"
    return f"[{values[0]:{spec}}, {values[1]:{spec}}]"


def ladder_text(ladder: EvidenceLadder | None) -> str:
    """auto's last choice (tasks/served_choice.py evidence_ladder): each step up from the lexical model, taken or not."""
    if not ladder:
        return ""
    steps = "; ".join(f"{step.below} -> {step.to} on {step.rows} rows {step.difference:+.3f} "
                      f"{interval_text(step.interval, signed=True)} {'taken' if step.taken else 'not taken'}"
                      for step in ladder.steps if step.interval[0] is not None)
    return (f"Served the cheapest model no costlier one clearly beats ({ladder.confidence:.0%} paired intervals of "
            f"the macro-F1 gain): {ladder.served}" + (f" ({steps})" if steps else ""))


def calibration_text(calibration: Calibration) -> str:
    """The served model's temperature (tasks/calibration.py), with the validation ECE before and after or why not."""
    text = f"T = {calibration.temperature:.3f}"
    if calibration.validation_ece_after is not None:
        return text + (f", validation ECE {calibration.validation_ece_before:.3f} -> "
                       f"{calibration.validation_ece_after:.3f}")
    return text + f" ({calibration.note})"


def evidence_text(row: StrategyEvidence) -> str:
    """One model of auto's evidence, with its uncertainty, as the card and the run's report show it."""
    interval = interval_text(row.interval, missing="")
    interval = interval and f" {interval}"
    versus = ""
    if (paired := row.paired) and paired[0] != row.model and paired[1].interval[0] is not None:
        versus = f"; minus {paired[0]} {paired[1].estimate:+.3f} {interval_text(paired[1].interval, signed=True)}"
    crossed = row.cross_fitted
    across = "" if not crossed or crossed.interval[0] is None else (
        f"; on all {crossed.rows} target rows {crossed.macro_f1:.3f} {interval_text(crossed.interval)}")
    return (f"{row.model}: validation macro-F1 {row.validation_macro_f1:.3f}{interval}{versus}{across} "
            f"({row.how}, {row.seconds:.0f} s)")


def finetune_markdown(report: FinetuneReport) -> str:
    """The finetune report as Markdown: strategy and why, hardware, speed, validation metrics."""
    validation = ", ".join(f"{k} {v:.3f}" for k, v in report.validation.items())
    rows = [
        ("strategy", f"{report.strategy}: {report.reason}"),
        *[(f"evidence: {row.model}", evidence_text(row).split(": ", 1)[1]) for row in report.strategy_evidence],
        ("base model", report.base_model),
        ("hardware", f"{report.hardware}, {report.precision}, {report.threads} threads, "
                     f"{report.processes} process(es)"),
        ("data", f"{report.train_rows} train rows, {report.validation_rows} validation rows"),
        ("epochs", f"{report.epochs_run} run, best {report.best_epoch}"),
        ("speed", f"{report.samples_per_second} samples/s, {report.train_seconds} s"),
        ("validation", validation or "-"),
        ("served as", report.lexical_companion.served_as),
        ("resumed", str(report.resumed_from_step or "no")),
        ("model", f"`{report.model_dir}`"),
    ]
    return "# Finetune\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def _interval(value, interval=None) -> str:
    """0.713 [0.639, 0.796]; "-" for a missing value."""
    if value is None:
        return "-"
    text = f"{value:.3f}"
    if interval and interval[0] is not None:
        text += f" {interval_text(interval)}"
    return text


def evaluate_markdown(report: EvaluateReport) -> str:
    """Models x splits with intervals, the transfer gain, and the per-group table of the decision split."""
    lines = ["# Evaluate", "", f"{report.confidence:.0%} bootstrap intervals ({report.bootstrap} resamples, "
             "stratified by group; Wilson for small groups' accuracy).", ""]
    for split, entry in report.splits.items():
        lines += [f"## {split} ({entry.n} rows)", "", "| model | accuracy | macro-F1 | ECE |", "|---|---|---|---|"]
        for model, result in entry.models.items():
            o = result.overall
            lines.append(f"| {model} | {_interval(o.accuracy, o.intervals['accuracy'])} | "
                         f"{_interval(o.macro_f1, o.intervals['macro_f1'])} | {_interval(o.ece, o.intervals.get('ece'))} |")
        lines.append("")
    gain = report.transfer_gain
    lines.append(f"**Transfer gain** (candidate - TF-IDF, {gain.metric}, target_holdout): "
                 f"{_interval(gain.estimate, gain.interval)}")
    if gain.negative_transfer:
        lines.append("\n**Negative transfer:** the fine-tuned model is worse than TF-IDF + logistic regression.")
    elif gain.below_zero:
        lines.append("\nThe candidate scores below TF-IDF here, though the interval includes zero.")
    decision = report.splits["target_holdout"]
    for column, info in decision.group_columns.items():
        lines += ["", f"## Groups by {column} (target_holdout)", "",
                  "| group | n | model | accuracy | macro-F1 | judged |", "|---|---|---|---|---|---|"]
        for group in sorted(info.sizes, key=lambda g: -info.sizes[g]):
            for model, result in decision.models.items():
                g = result.groups[column].groups[group]
                judged = "yes" if g.eligible else f"insufficient data (n < {info.min_group_size})"
                label = f"{group} (merged)" if g.merged else group
                lines.append(f"| {label} | {g.n} | {model} | {_interval(g.accuracy, g.judged_interval('accuracy'))} | "
                             f"{_interval(g.macro_f1, g.intervals['macro_f1'])} | {judged} |")
        if info.merged_into_other:
            shown = ", ".join(f"{g} ({n})" for g, n in list(info.merged_into_other.items())[:12])
            more = len(info.merged_into_other) - 12
            lines.append(f"\nInsufficient data: {len(info.merged_into_other)} groups with fewer than "
                         f"{info.min_group_size} rows were merged into \"other\": {shown}"
                         + (f" and {more} more" if more > 0 else "") + ".")
        for model, result in decision.models.items():
            d = result.groups[column].disparity["accuracy"]
            if d.gap is not None:
                lines.append(f"- {model}: accuracy gap {_interval(d.gap, d.gap_interval)}, ratio {_interval(d.ratio)}, "
                             f"worst group {d.worst_group} ({_interval(d.worst_value)})")
    return "\n".join(lines) + "\n"


def _signed(value) -> str:
    """Three decimals, a sign only when negative; "-" for a missing value."""
    return "-" if value is None else f"{value:+.3f}" if value < 0 else f"{value:.3f}"


def verdict_markdown(verdict: Verdict) -> str:
    """The verdict as a Markdown table: one row per criterion with value, interval, threshold, margin."""
    lines = [f"# Gate: {verdict.verdict}", "",
             "| criterion | status | value | interval | threshold | margin | detail |", "|---|---|---|---|---|---|---|"]
    for c in verdict.criteria:
        interval = interval_text(c.interval, missing="-")
        threshold = "-" if c.threshold is None else f"{c.direction} {c.threshold:.3f}"
        lines.append(f"| {c.name} | {c.status} | {_signed(c.value)} | {interval} | {threshold} | "
                     f"{_signed(c.margin)} | {c.detail} |")
    by_column: dict[str, list] = {}
    for row in verdict.insufficient_data:
        by_column.setdefault(row.column, []).append(row)
    for column, rows in by_column.items():
        shown = ", ".join(f"{r.group} (n={r.n})" for r in rows[:8])
        more = f" and {len(rows) - 8} more" if len(rows) > 8 else ""
        lines.append(f"| worst group: {column}, {len(rows)} small groups | insufficient data | - | - | - | - | "
                     f"{shown}{more}: {rows[0].detail} |")
    lines += [""] + [f"- {note}" for note in verdict.notes]
    return "\n".join(lines) + "\n"


def package_markdown(report: PackageReport) -> str:
    """The packaged model, its Bento, the smoke test and how to promote it."""
    smoke = report.smoke_test
    rows = [("model", f"`{report.model}`"), ("Bento", f"`{report.bento}`"), ("verdict", report.verdict),
            ("smoke test", f"{smoke.examples} target_holdout texts served on {smoke.url}: labels equal to "
                           f"offline predictions ({smoke.seconds} s)"),
            ("git commit", str(report.lineage.git_commit)),
            ("promote", f"`{report.promote}`")]
    return "# Package\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def models_text(record: dict) -> str:
    """Versions, stages, headline metrics and history, for the terminal."""
    shadow = record.get("shadow")
    lines = [f"production: {record.get('production') or '(none)'}"]
    if shadow:
        lines.append(f"shadow:     {shadow['tag']} (beside {shadow['beside']} since {shadow['since']})")
    canary = record.get("canary")
    if canary:
        lines.append(f"canary:     {canary['tag']} answers {canary['fraction']:g} of the requests (beside "
                     f"{canary['beside']} since {canary['since']}; {canary['passed']} of {canary['windows']} windows "
                     "shown not worse)")
    lines += ["", f"{'model':40s} {'stage':11s} {'verdict':13s} {'target macro-F1':>15s}  registered"]
    for tag, entry in sorted(record["models"].items(), key=lambda kv: kv[1].get("registered", "")):
        metric = ((entry.get("metrics") or {}).get("target_holdout") or {}).get("candidate", {}).get("macro_f1")
        verdict = entry.get("verdict") or "-"
        if (entry.get("decision") or {}).get("approved"):
            verdict += " (approved)"
        lines.append(f"{tag:40s} {entry['stage']:11s} {verdict:13s} "
                     f"{'-' if metric is None else f'{metric:.3f}':>15s}  {entry.get('registered', '-')}")
    lines += ["", "history:"]
    for event in record["history"]:
        lines.append(f"  {event['at']}  {event['action']:9s} {event['tag']}"
                     + (f" (was {event['previous']})" if event.get("previous") else "")
                     + f"  by {event.get('by')}: {event.get('reason')}")
    return "\n".join(lines)


def shadow_change_text(event: dict) -> str:
    """A shadow's start or end (a history entry), for the terminal and the promote flow's log."""
    if event["action"] == "shadow":
        return (f"shadow: {event['tag']} now predicts beside {event['beside']} on every serving host that follows the "
                "registry, off the response path (its predictions: serve.shadow_log)")
    if event["action"] == "shadow-off":
        return f"shadow-off: {event['tag']} no longer shadows production ({event['reason']})"
    return canary_change_text(event)


def canary_judgement_text(window: dict, change: dict | None) -> str:
    """A judged window, and the rollback or promotion it caused."""
    lines = [canary_change_text(window)]
    if change and change["action"] == "promote":
        lines.append(f"promote: {change['tag']} is now in production (was {change['previous']}): {change['reason']}")
    elif change:
        lines.append(canary_change_text(change))
    return "\n".join(lines)


def canary_change_text(event: dict) -> str:
    """A canary's start, judged window or end (a history entry), for the terminal and the flows' logs."""
    action, tag = event["action"], event["tag"]
    if action == "canary":
        return (f"canary: {tag} now answers {event['fraction']:g} of the requests (the same texts on every serving "
                f"host that follows the registry), {event['beside']} the rest; promoted after {event['windows']} "
                "judged windows that show it not worse, rolled back at the first that shows it worse")
    if action == "canary-window":
        return (f"canary {tag}: {event['verdict']} ({event['reason']}); {event['passed']} of {event['windows']} "
                "windows shown not worse")
    if action == "canary-rolled-back":
        return f"canary-rolled-back: {tag} answers nothing any more, {event['beside']} answers all ({event['reason']})"
    return f"canary-off: {tag} answers nothing any more ({event['reason']})"


def shadow_markdown(report: ShadowReport) -> str:
    """`regraft shadow`: the shadow candidate against production on the same served texts, and the verdict."""
    pct, rows, labels = f"{report.confidence:.0%}", report.served, report.labels
    lines = [f"# {report.stage.capitalize()} {report.candidate} beside {report.production_model}: {report.verdict}", "",
             f"- {report.reason}",
             f"- served since {report.since}: {rows['served']} texts, {rows['joined']} predicted by both; "
             f"{rows['without_shadow']} without the candidate's prediction (shed, failed or queued) left out",
             *[f"- {note}" for note in report.notes]]
    agreement = report.agreement
    if agreement:
        lines.append(f"- agreement: {_interval(agreement.share, agreement.interval)} ({pct} interval), "
                     f"{agreement.agreeing} of {report.rows} texts")
        lines += ["", "| production \\ candidate | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        lines += [f"| {label} | " + " | ".join(str(n) for n in row) + " |"
                  for label, row in zip(labels, report.confusion or [])]
    if report.estimated:
        realized = report.realized or {}
        lines += ["", "| model | estimated accuracy | estimated macro-F1 | realized accuracy | realized macro-F1 |",
                  "|---|---|---|---|---|"]
        for role in ("production", "candidate"):
            estimate, truth = report.estimated[role].estimate, realized.get(role)
            lines.append(f"| {role} | {_interval(estimate['accuracy'].estimate, estimate['accuracy'].interval)} | "
                         f"{_interval(estimate['macro_f1'].estimate, estimate['macro_f1'].interval)} | "
                         + (f"{_interval(truth.accuracy, truth.accuracy_interval)} ({truth.rows} labelled) | "
                            f"{truth.macro_f1:.3f} |" if truth else "no labels | no labels |"))
        lines.append("")
        for basis in ("estimated", "realized"):
            gap = getattr(report.difference, basis)
            if gap:
                f1, accuracy = gap.macro_f1, gap.accuracy
                lines.append(f"- {basis} macro-F1, candidate minus production: {f1.estimate:+.3f} "
                             f"{interval_text(f1.interval, signed=True)} (paired, {pct}); accuracy "
                             f"{accuracy.estimate:+.3f} {interval_text(accuracy.interval, signed=True)}")
    if report.groups:
        lines += ["", "| group | texts | agreement | estimated macro-F1, production / candidate | "
                      "realized macro-F1, production / candidate |", "|---|---:|---|---|---|"]
        for column, values in report.groups.items():
            for value, group in values.items():
                estimated = (" / ".join(_interval(group.estimated[role].estimate["macro_f1"].estimate,
                                                  group.estimated[role].estimate["macro_f1"].interval)
                                        for role in ("production", "candidate"))
                             if group.estimated else "too few texts or no holdout")
                realized = (" / ".join(f"{group.realized[role].macro_f1:.3f}" for role in ("production", "candidate"))
                            + f" ({group.realized['production'].rows} labelled)" if group.realized else "no labels")
                cell = f"{column} = {value}".replace("|", "\\|")  # values come from clients
                lines.append(f"| {cell} | {group.rows} | "
                             f"{_interval(group.agreement.share, group.agreement.interval)} | {estimated} | {realized} |")
    return "\n".join(lines) + "\n"


def decision_markdown(decision: Decision) -> str:
    """Who decided what about a verdict, and why."""
    state = "approved" if decision.approved else "rejected"
    return (f"# Decision: {state}\n\nThe gate's {decision.verdict} was {state} by {decision.by}: "
            f"{decision.reason} ({decision.at}).\n")


# Each report's model (tasks/reports.py) and renderer: checked against the model, then rendered from its attributes.
RENDERERS: dict[str, tuple[type, Callable]] = {
    "ingest": (IngestReport, ingest_markdown),
    "validate": (ValidateReport, validate_markdown),
    "shift": (ShiftReport, shift_markdown),
    "finetune": (FinetuneReport, finetune_markdown),
    "evaluate": (EvaluateReport, evaluate_markdown),
    "verdict": (Verdict, verdict_markdown),
    "decision": (Decision, decision_markdown),
    "package": (PackageReport, package_markdown),
    "shadow": (ShadowReport, shadow_markdown),
    "canary": (ShadowReport, shadow_markdown),
}


def render_report(name: str, report: dict) -> str:
    """The Markdown of a stage's report as read from its JSON file; a report without its own renderer is shown as
    JSON. A typed report that does not fit its model is a ReportError."""
    if name not in RENDERERS:
        return f"# {name}\n\n```json\n{json.dumps(report, indent=2)[:20000]}\n```\n"
    kind, render = RENDERERS[name]
    return render(parse_report(kind, report, f"the {name} report"))
