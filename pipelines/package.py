"""DVC stage `package`: a candidate that passed the gate -> BentoML model (with lineage) + Bento,
smoke-tested on a real `bentoml serve`, then registered as a candidate for promotion.

Fails closed: no verdict, a FAIL, or an unapproved INCONCLUSIVE packages nothing; a model whose served
predictions differ from its offline ones is not registered, so it cannot be promoted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from pipelines.stage_io import report_path, run_stage, write_json
from tasks.config import Params
from tasks.errors import RegraftError
from tasks.gate import promotable
from tasks.packaging import bentoml_environment, build_bento, lineage, offline_labels, save_model, smoke_test
from tasks.registry import file_digests, register


def main(params: Params) -> int:
    os.environ.update(bentoml_environment(params))
    verdict_file = report_path(params, "verdict")
    verdict = json.loads(verdict_file.read_text(encoding="utf-8")) if verdict_file.is_file() else None
    if not promotable(verdict):
        state = "missing" if verdict is None else verdict["verdict"] + (" (rejected)" if verdict.get("decision") else "")
        raise RegraftError(f"{verdict_file}: gate verdict is {state}; only a PASS or an approved INCONCLUSIVE "
                           "candidate is packaged")
    origin = lineage(params, verdict)
    digests = file_digests(params.paths.model)
    model_tag = save_model(params, origin, digests)
    bento_tag = build_bento(params, model_tag)
    holdout = pd.read_parquet(params.paths.splits.target_holdout).head(params.package.smoke_examples)
    texts = holdout["text"].astype("str").tolist()
    import bentoml

    stored = Path(bentoml.models.get(model_tag).path)
    smoke = smoke_test(params, bento_tag, model_tag, texts, offline_labels(stored, texts, params.model.max_length))
    register(params.paths.registry, model_tag, {
        "bento": bento_tag, "verdict": verdict["verdict"], "decision": verdict.get("decision"), "sha256": digests,
        "metrics": origin["metrics"], "data_md5": origin["data_md5"], "git_commit": origin["git_commit"],
        "smoke_test": smoke,
    })
    report = {"stage": "package", "model": model_tag, "bento": bento_tag, "verdict": verdict["verdict"],
              "smoke_test": smoke, "registry": str(params.paths.registry), "lineage": origin,
              "promote": f"regraft promote {model_tag}"}
    write_json(report_path(params, "package"), report)
    print(f"packaged {model_tag} as Bento {bento_tag}; smoke test on {smoke['url']}: {smoke['examples']} "
          f"examples, labels equal to offline predictions, {smoke['seconds']} s")
    print(f"promote it with: regraft promote {model_tag}")
    return 0


if __name__ == "__main__":
    run_stage(main)
