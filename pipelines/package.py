"""DVC stage `package`: a candidate that passed the gate -> BentoML model (with lineage) + Bento,
smoke-tested on a real `bentoml serve`, exported to the shared remote, then registered as a candidate for
promotion (in the remote's record too).

Fails closed: no verdict, a FAIL, or an unapproved INCONCLUSIVE packages nothing; a model whose served
predictions differ from its offline ones is not registered, so it cannot be promoted.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd

from pipelines.stage_io import report_path, run_stage
from tasks.config import Params
from tasks.errors import CheckFailed, ReportError
from tasks.files import sha256_of
from tasks.gate import promotable
from tasks.model_card import Packaged, model_card
from tasks.packaging import (bentoml_environment, build_bento, check_serving_variants, export_to_remote, lineage,
                             offline_predictions, save_model, smoke_test)
from tasks.remote import model_remote
from tasks.registry import file_digests, register
from tasks.serving import serving_precision
from tasks.variants import VARIANT_MAX_BATCH_SPREAD
from tasks.reports import Decision, EvaluateReport, FinetuneReport, PackageReport, Verdict, read_report, write_report


def read_decision(params: Params) -> tuple[Verdict, Decision]:
    """The verdict and the decision on exactly that verdict; anything missing, stale or not approved refuses."""
    verdict_file, decision_file = params.paths.verdict, params.paths.decision
    try:
        verdict = read_report(verdict_file, Verdict)
        decision = read_report(decision_file, Decision)
    except ReportError as exc:
        raise CheckFailed(f"no readable gate verdict and decision ({exc}); nothing is packaged without them") from None
    if decision.verdict_sha256 != sha256_of(verdict_file):
        raise CheckFailed(f"{decision_file} decides about another verdict than {verdict_file}; run the decide stage again")
    if not promotable(verdict.verdict, decision.approved):
        raise CheckFailed(f"gate verdict {verdict.verdict}, {'approved' if decision.approved else 'not approved'} "
                          f"by {decision.by}; only a PASS or an approved INCONCLUSIVE candidate is packaged")
    return verdict, decision


def main(params: Params) -> int:
    os.environ.update(bentoml_environment(params))
    verdict, decision = read_decision(params)
    origin = lineage(params, verdict, decision)
    # Which precision it may serve in, checked against fp32 before anything is packaged (tasks/variants.py).
    serving = check_serving_variants(params)
    print(f"serving precision: {serving['reason']}")
    finetune = report_path(params, "finetune")
    evaluation = report_path(params, "evaluate")
    card = model_card(params, read_report(finetune, FinetuneReport) if finetune.is_file() else None,
                      Packaged(params.package.model_name,
                               read_report(evaluation, EvaluateReport) if evaluation.is_file() else None,
                               verdict, decision, origin, serving))
    # The checksums are of the files as packaged: the completed card replaces finetune's README.md.
    digests = {**file_digests(params.paths.model), "README.md": hashlib.sha256(card.encode("utf-8")).hexdigest()}
    model_tag = save_model(params, origin, digests, card, serving)
    bento_tag = build_bento(params, model_tag)
    holdout = pd.read_parquet(params.paths.splits.target_holdout).head(params.package.smoke_examples)
    texts = holdout["text"].astype("str").tolist()
    import bentoml

    stored = Path(bentoml.models.get(model_tag).path)
    precision, _ = serving_precision(serving)  # as the smoke test's service decides from the same record
    smoke = smoke_test(params, bento_tag, model_tag, texts,
                       lambda: offline_predictions(stored, texts, params.model.max_length, precision),
                       tie=0.0 if precision == "fp32" else VARIANT_MAX_BATCH_SPREAD)
    remote = model_remote(params)
    exported = export_to_remote(remote, model_tag, bento_tag) if remote is not None else None
    register(params.paths.registry, model_tag, {
        "bento": bento_tag, "verdict": verdict.verdict, "decision": decision.model_dump(), "sha256": digests,
        "metrics": origin["metrics"], "data_md5": origin["data_md5"], "git_commit": origin["git_commit"],
        "smoke_test": smoke, "remote": exported, "serving": serving,
    }, remote=remote)
    report = PackageReport(stage="package", model=model_tag, bento=bento_tag, verdict=verdict.verdict, smoke_test=smoke,
                           registry=str(params.paths.registry), remote=exported, lineage=origin,
                           promote=f"regraft promote {model_tag}")
    write_report(report_path(params, "package"), report)
    print(f"packaged {model_tag} as Bento {bento_tag}; smoke test on {smoke['url']}: {smoke['examples']} "
          f"examples, labels equal to offline predictions, {smoke['seconds']} s")
    print(f"exported model and Bento to {exported['url']} (sha256 in the registry record there)" if exported
          else "no shared remote (package.remote or a DVC default remote): the model stays on this machine")
    print(f"promote it with: regraft promote {model_tag}")
    return 0


if __name__ == "__main__":
    run_stage(main)
