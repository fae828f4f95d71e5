"""Stage validate: a Great Expectations suite per split, run as Checkpoints, with Data Docs.

Each split is validated as a whole-dataframe batch with two derived columns that let stock GX
expectations express what a row-level expectation cannot:
- `text_sha1`: the text's hash, checked against the hashes of every train split's texts (leakage);
- `label_rows`: how many rows of the split share the row's label (minimum rows per class);
- `text_labels`: how many labels the row's text has in the split (label conflicts).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.config import Columns, Params, ValidateConfig
from tasks.reports import ValidateReport, parse_report

SCHEMA_TYPES = {"id": "str", "text": "str", "label": "str"}
UNDECODABLE = "\ufffd"


@dataclass(frozen=True)
class SplitRules:
    """What one split is checked against, beyond the shared configuration."""

    name: str
    min_rows: int
    train_text_hashes: frozenset[str] = field(default_factory=frozenset)


def text_hash(text: object) -> str | None:
    return hashlib.sha1(text.encode("utf-8")).hexdigest() if isinstance(text, str) else None


def with_derived_columns(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    if "text" in out:
        out["text_sha1"] = out["text"].map(text_hash).astype("str")
    if "label" in out:
        out["label_rows"] = out.groupby("label", dropna=False)["label"].transform("size").astype("int64")
    if {"text", "label"} <= set(out.columns):
        labels_per_text = out.groupby("text_sha1", dropna=False)["label"].transform("nunique")
        out["text_labels"] = labels_per_text.fillna(1).astype("int64")
    return out


def build_expectations(frame: pd.DataFrame, rules: SplitRules, cfg: ValidateConfig,
                       columns: Columns, labels: list[str]) -> list[Any]:
    """The suite for one split. Column-level expectations are added only for columns that
    exist; a missing column is reported once, by its existence expectation."""
    import great_expectations.expectations as gxe

    inputs = {"id": columns.id, "text": columns.text, "label": columns.label, "timestamp": columns.time,
              **{g: g for g in columns.groups}}
    # `meta` carries the user's own column name into error messages.
    expectations: list[Any] = [
        gxe.ExpectColumnToExist(column=c, meta={"input_column": source} if source else None)
        for c, source in inputs.items()
    ]
    expectations.append(gxe.ExpectTableRowCountToBeBetween(min_value=rules.min_rows, max_value=cfg.rows.max))
    present = set(frame.columns)
    for column, type_ in SCHEMA_TYPES.items():
        if column in present:
            expectations.append(gxe.ExpectColumnValuesToBeOfType(column=column, type_=type_))
    if "id" in present:
        expectations.append(gxe.ExpectColumnValuesToBeUnique(column="id"))
    if "text" in present:
        expectations += [
            gxe.ExpectColumnValuesToNotBeNull(column="text"),
            gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=cfg.text_min_chars,
                                                    max_value=cfg.text_max_chars),
            gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=UNDECODABLE),
        ]
        if rules.train_text_hashes:
            expectations.append(
                gxe.ExpectColumnValuesToNotBeInSet(column="text_sha1", value_set=sorted(rules.train_text_hashes))
            )
    if "label" in present:
        expectations += [
            gxe.ExpectColumnValuesToNotBeNull(column="label"),
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(labels)),
            gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=list(labels)),
            gxe.ExpectColumnValuesToBeBetween(column="label_rows", min_value=cfg.min_rows_per_class),
        ]
    if {"text", "label"} <= present:
        expectations += [
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["text", "label"]),
            gxe.ExpectColumnValuesToBeBetween(column="text_labels", max_value=1,
                                              mostly=1.0 - cfg.max_label_conflict_fraction),
        ]
    for group in columns.groups:
        if group in present:
            expectations.append(
                gxe.ExpectColumnValuesToNotBeNull(column=group, mostly=1.0 - cfg.max_group_null_fraction)
            )
    return expectations


def split_rules(splits: dict[str, pd.DataFrame], cfg: ValidateConfig) -> list[SplitRules]:
    """Holdouts must share no text with any train split; train and holdout have their own row floors."""
    train_hashes = frozenset(
        h for name, frame in splits.items() if name.endswith("_train") and "text" in frame
        for h in frame["text"].map(text_hash).dropna()
    )
    rules = []
    for name in splits:
        if name.endswith("_holdout"):
            rules.append(SplitRules(name, cfg.rows.holdout_min, train_hashes))
        else:
            rules.append(SplitRules(name, cfg.rows.train_min))
    return rules


def open_context(project_dir: Path, docs_dir: Path):
    """A fresh file-backed GX project whose Data Docs site is written to `docs_dir`."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # The suite is derived from params.yaml and the data on every run, so old state is discarded.
    shutil.rmtree(project_dir, ignore_errors=True)
    project_dir.mkdir(parents=True)
    context = gx.get_context(mode="file", project_root_dir=str(project_dir))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.variables.save()
    for site in list(context.get_config().data_docs_sites or {}):
        context.delete_data_docs_site(site)
    context.add_data_docs_site(
        site_name="regraft",
        site_config={
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    return context


def run_checkpoint(context, name: str, frame: pd.DataFrame, expectations: list[Any], examples: int) -> list[dict]:
    """Run one split's suite as a Checkpoint that updates Data Docs; one entry per expectation."""
    import great_expectations as gx

    source = context.data_sources.add_or_update_pandas("regraft")
    batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(f"{name}_whole")
    suite = context.suites.add(gx.ExpectationSuite(name=f"regraft_{name}", expectations=expectations))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"regraft_{name}",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")],
            result_format={"result_format": "COMPLETE",
                           "unexpected_index_column_names": ["id"] if "id" in frame else []},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    entries = []
    for run in result.run_results.values():
        for item in run.results:
            entries.append(describe_result(name, item.to_json_dict(), frame, examples))
    return sorted(entries, key=lambda e: (e["success"], e["expectation"], e.get("column") or ""))


def describe_result(split: str, item: dict, frame: pd.DataFrame, examples: int) -> dict:
    """Turn a GX result into a report entry with a sentence a person can act on."""
    config = item["expectation_config"]
    # Leakage sets hold thousands of hashes: keep them out of the report.
    kwargs = {k: v for k, v in config["kwargs"].items()
              if k != "batch_id" and not (k == "value_set" and len(v) > 50)}
    result = item.get("result") or {}
    column = kwargs.get("column") or kwargs.get("column_list")
    observed = result.get("observed_value")
    if config["type"] == "expect_column_distinct_values_to_contain_set" and column in frame:
        # GX leaves observed_value empty here; the distinct labels are what a person needs to see.
        observed = sorted(str(v) for v in frame[column].dropna().unique())
    entry = {
        "split": split,
        "expectation": config["type"],
        "column": column,
        "kwargs": kwargs,
        "success": bool(item["success"]),
        "observed": observed,
        "unexpected_count": result.get("unexpected_count"),
        "unexpected_percent": result.get("unexpected_percent"),
        "examples": offending_examples(config["type"], result, frame, examples),
    }
    exception = item.get("exception_info") or {}
    if exception.get("raised_exception"):
        entry["success"] = False
        entry["error"] = exception.get("exception_message")
    entry["input_column"] = (config.get("meta") or {}).get("input_column")
    entry["message"] = explain(entry)
    return entry


def shorten(value: object, width: int = 80) -> object:
    """Long texts cut to `width` characters, inside dicts too (compound-column results)."""
    if isinstance(value, dict):
        return {k: shorten(v, width) for k, v in value.items()}
    if isinstance(value, str) and len(value) > width:
        return value[:width] + "..."
    return value


def offending_examples(kind: str, result: dict, frame: pd.DataFrame, limit: int) -> list:
    """A few offending values; for hashed or derived columns, the rows' own text and label."""
    ids = [row.get("id") for row in result.get("partial_unexpected_index_list") or [] if isinstance(row, dict)]
    if kind in ("expect_column_values_to_not_be_in_set", "expect_column_values_to_be_between") and ids:
        rows = frame[frame["id"].isin(ids[:limit])]
        keep = [c for c in ("id", "label", "text") if c in rows]
        return [shorten(r) for r in rows[keep].head(limit).to_dict("records")]
    values = result.get("partial_unexpected_list") or []
    shown = [shorten(value) for value in values[:limit]]
    if ids and shown:
        return [{"id": i, "value": v} for i, v in zip(ids, shown, strict=False)]
    return shown


PLAIN = {
    "expect_column_to_exist": "column {column!r} is missing (input column {input_column!r})",
    "expect_table_row_count_to_be_between": "has {observed} rows; expected {min_value} to {max_value}",
    "expect_column_values_to_be_of_type": "column {column!r} has type {observed}; expected {type_}",
    "expect_column_values_to_be_unique": "column {column!r} has {unexpected_count} repeated values",
    "expect_column_values_to_not_be_null": "column {column!r} has {unexpected_count} missing values "
                                           "({unexpected_percent:.1f}%; allowed {allowed:.1f}%)",
    "expect_column_value_lengths_to_be_between": "{unexpected_count} texts are shorter than {min_value} or "
                                                 "longer than {max_value} characters",
    "expect_column_values_to_not_match_regex": "{unexpected_count} texts contain bytes that are not valid "
                                               "UTF-8 (shown as \ufffd)",
    "expect_column_values_to_not_be_in_set": "{unexpected_count} texts also appear in a train split "
                                             "(train/holdout leakage)",
    "expect_column_values_to_be_in_set": "column 'label' has {unexpected_count} values outside the "
                                         "configured labels",
    "expect_column_distinct_values_to_contain_set": "labels {missing} have no rows",
    "expect_column_values_to_be_between": "{unexpected_count} rows belong to a label with fewer than "
                                          "{min_value} rows",
    "expect_compound_columns_to_be_unique": "{unexpected_count} rows are duplicates (same text and label)",
}


# Where one expectation type checks different things, the column says which.
PLAIN_BY_COLUMN = {
    ("expect_column_values_to_be_between", "text_labels"):
        "label conflict: {unexpected_count} rows ({unexpected_percent:.1f}%; allowed {allowed:.1f}%) have a text "
        "that also appears with another label",
}


def explain(entry: dict) -> str:
    """One sentence: which split, what failed, with the numbers."""
    if entry["success"]:
        return f"{entry['split']}: {entry['expectation']} passed"
    if entry.get("error"):
        return f"{entry['split']}: {entry['expectation']} could not run: {entry['error']}"
    fields = {**entry["kwargs"], "observed": entry["observed"],
              "unexpected_count": entry["unexpected_count"] or 0,
              "unexpected_percent": entry["unexpected_percent"] or 0.0,
              "allowed": 100.0 * (1.0 - (entry["kwargs"].get("mostly") or 1.0)),
              "column": entry["column"], "input_column": entry.get("input_column")}
    for bound in ("min_value", "max_value"):
        if isinstance(fields.get(bound), float) and fields[bound].is_integer():
            fields[bound] = int(fields[bound])
    if entry["expectation"] == "expect_column_distinct_values_to_contain_set":
        observed = set(entry["observed"] or [])
        wanted = entry["kwargs"].get("value_set") or []
        fields["missing"] = sorted(set(wanted) - observed) or "some configured labels"
    template = PLAIN_BY_COLUMN.get((entry["expectation"], str(entry["column"]))) \
        or PLAIN.get(entry["expectation"], entry["expectation"] + " failed")
    try:
        text = template.format(**fields)
    except (KeyError, ValueError, TypeError):
        text = entry["expectation"] + " failed"
    if entry["examples"]:
        text += f"; e.g. {entry['examples']}"
    return f"{entry['split']}: {text}"


def validate_splits(splits: dict[str, pd.DataFrame], cfg: ValidateConfig, columns: Columns,
                    labels: list[str], gx_dir: Path, docs_dir: Path,
                    rules: list[SplitRules] | None = None) -> ValidateReport:
    """Validate every split with its own Checkpoint; returns the report (success, one entry per expectation)."""
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = open_context(gx_dir, docs_dir)
    entries: list[dict] = []
    summary = {}
    for rule in rules or split_rules(splits, cfg):
        frame = with_derived_columns(splits[rule.name])
        expectations = build_expectations(frame, rule, cfg, columns, labels)
        results = run_checkpoint(context, rule.name, frame, expectations, cfg.examples)
        entries += results
        summary[rule.name] = {"rows": len(frame), "success": all(r["success"] for r in results),
                              "failed": sum(not r["success"] for r in results), "expectations": len(results)}
    return parse_report(ValidateReport, {
        "stage": "validate",
        "success": all(s["success"] for s in summary.values()),
        "splits": summary,
        "failures": [e["message"] for e in entries if not e["success"]],
        "data_docs": str(docs_dir / "index.html"),
        "expectations": entries,
    }, "the validation report")


def validate_file(params: Params, path: Path, columns_spec: str | None = None) -> ValidateReport:
    """`regraft validate PATH [--columns ...]`: the same suite on one file (column mapping: see
    tasks.ingest.columns_for_file). It is checked as a train split (no holdout, so no leakage check)."""
    from tasks.ingest import read_with_columns

    frame, columns, origin = read_with_columns(path, params.ingest.columns, columns_spec, params.ingest.time_format)
    name = path.stem.replace(".", "_") or "file"
    report = validate_splits(
        {name: frame}, params.validate_, columns, params.ingest.labels,
        gx_dir=params.paths.state / "gx-file", docs_dir=params.paths.state / "data_docs_file",
        rules=[SplitRules(name, params.validate_.rows.train_min)],
    )
    return report.model_copy(update={"columns": {"from": origin, **columns.model_dump()}})
