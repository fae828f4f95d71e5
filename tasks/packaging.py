"""Packaging: a model into the BentoML store with its lineage, a Bento around it, and the smoke test
that serves the Bento for real before the model may be registered (the InfraValidator idea)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from tasks.config import Params
from tasks.errors import CheckFailed
from tasks.files import crash_point, keep_private
from tasks.processes import NotHealthy, free_port, stop_process_group, wait_until_healthy
from tasks.reports import Decision, FinetuneReport, Verdict, read_report


def bentoml_environment(params: Params) -> dict[str, str]:
    """The environment every BentoML call and `bentoml serve` of this project uses."""
    return {"BENTOML_HOME": str(Path(params.paths.bentoml_home).resolve()), "BENTOML_DO_NOT_TRACK": "true"}


def lineage(params: Params, verdict: Verdict, decision: Decision) -> dict:
    """Where the model came from: data hashes from dvc.lock, git commit, parameters, metrics, verdict, decision."""
    lock = yaml.safe_load(Path("dvc.lock").read_text(encoding="utf-8")) if Path("dvc.lock").is_file() else {}
    # The data files the model learned from and was judged on, where params.yaml puts them.
    data_files = {str(path) for path in (*params.paths.splits.model_dump().values(), params.paths.shift_weights)}
    data = {}
    for stage in ("finetune", "evaluate"):
        for dep in (lock.get("stages", {}).get(stage, {}) or {}).get("deps", []):
            if dep["path"] in data_files:
                data[dep["path"]] = dep.get("md5")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    metrics_file = params.paths.metrics
    return {
        "data_md5": data,
        "git_commit": commit.stdout.strip() if commit.returncode == 0 else None,
        "params": {"model": params.model.model_dump(mode="json"), "train": params.train.model_dump(mode="json")},
        "metrics": json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else None,
        "verdict": {"verdict": verdict.verdict, "decision": decision.model_dump(),
                    "failed": verdict.failed, "inconclusive": verdict.inconclusive},
    }


def save_model(params: Params, origin: dict, digests: dict[str, str], card: str | None = None,
               serving: dict | None = None) -> str:
    """Copy the candidate's HF directory (safetensors only; no pickle) into the BentoML model store."""
    import shutil

    import bentoml

    source = params.paths.model
    if not (source / "model.safetensors").is_file():
        raise CheckFailed(f"{source}: no model.safetensors; refusing to package a model in another format")
    finetune = params.report_file("finetune")
    labels = {"verdict": origin["verdict"]["verdict"], "git_commit": origin["git_commit"] or "none",
              "strategy": read_report(finetune, FinetuneReport).strategy if finetune.is_file() else "unknown"}
    with bentoml.models.create(params.package.model_name, labels=labels,
                               metadata=store_safe({**origin, "sha256": digests, "serving": serving or {}})) as model:
        shutil.copytree(source, model.path, dirs_exist_ok=True)
        crash_point("package:model-copied")
        if card is not None:  # finetune's card, completed by the package stage (tasks/model_card.py)
            Path(model.path, "README.md").write_text(card, encoding="utf-8")
    return str(model.tag)


def store_safe(value):
    """BentoML metadata takes basic types only: None becomes "none"."""
    if isinstance(value, dict):
        return {str(k): store_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [store_safe(v) for v in value]
    return "none" if value is None else value


def build_bento(params: Params, model_tag: str) -> str:
    """Build the Bento described by deploy/bentofile.yaml around this model."""
    import bentoml

    options = yaml.safe_load(Path("deploy/bentofile.yaml").read_text(encoding="utf-8"))
    options["name"] = params.package.bento_name
    bento = bentoml.bentos.build(**options, models=[model_tag], build_ctx=".",
                                 labels={"model": model_tag.replace(":", "_")})
    # BentoML copies the source files with their modes (0644 in a git checkout), whatever the umask: the Bento lives
    # in the state folder, which is the owner's alone.
    keep_private([Path(bento.path)])
    return str(bento.tag)


def export_to_remote(remote, model_tag: str, bento_tag: str) -> dict:
    """Export the model and its Bento as archives into the shared remote; their keys and sha256 go into the
    registry record, so another host can import them and check every byte."""
    import bentoml

    from tasks.remote import scratch_folder, upload_archive

    exported = {"url": remote.url}
    with scratch_folder() as folder:
        for kind, tag, export in (("model", model_tag, bentoml.models.export_model),
                                  ("bento", bento_tag, bentoml.bentos.export_bento)):
            name, version = tag.split(":")
            # Plain tar: BentoML's default gzip took 64 s for the bundled model (73 s for its Bento) on this
            # machine, against 0.2 s, and safetensors weights shrink by only 10% under gzip.
            local = Path(export(tag, str(Path(folder) / f"{version}.tar"), output_format="tar"))
            exported[kind] = upload_archive(remote, local, f"{kind}s/{name}/{local.name}")
    return exported


def smoke_test(params: Params, bento_tag: str, model_tag: str, texts: list[str],
               expected_predictions: Callable[[], list[dict]], tie: float = 0.0) -> dict:
    """Serve the built Bento on a free loopback port, check /healthz and that served labels equal the
    offline ones (`expected_predictions()`, computed while the server starts), then stop the server. In a
    reduced-precision variant a text whose two most probable labels lie within `tie` of each other may be labelled
    either way (rounding with the batch's other texts: tasks/variants.py); in fp32 (tie 0) every label must match."""
    import httpx

    port = free_port()
    state = Path(params.paths.state).resolve() / "smoke"
    state.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **bentoml_environment(params), "REGRAFT_MODEL_TAG": model_tag,
           "REGRAFT_PREDICTION_LOG": str(state / "predictions.jsonl")}
    command = [sys.executable, "-m", "bentoml", "serve", bento_tag, "--host", "127.0.0.1", "--port", str(port)]
    started = time.perf_counter()
    log = (state / "server.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        expected = expected_predictions()
        try:
            health = json.loads(wait_until_healthy(f"{url}/healthz", server, params.package.smoke_timeout_seconds,
                                                   state / "server.log"))
        except NotHealthy as exc:
            raise CheckFailed(f"smoke test: {exc}") from None
        if health.get("model_version") != model_tag:
            raise CheckFailed(f"smoke test: /healthz reports model {health.get('model_version')!r}, not {model_tag!r}")
        served = []
        with httpx.Client(base_url=url, timeout=60) as client:
            for start in range(0, len(texts), 8):
                response = client.post("/predict", json={"texts": texts[start:start + 8]})
                if response.status_code != 200:
                    raise CheckFailed(f"smoke test: /predict answered {response.status_code}: {response.text[:300]}")
                served += [row["label"] for row in response.json()]
        mismatches = [i for i, (label, row) in enumerate(zip(served, expected))
                      if label != row["label"] and top_two_gap(row["probabilities"]) >= tie]
        if mismatches or len(served) != len(expected):
            raise CheckFailed(f"smoke test: served labels differ from offline predictions at rows {mismatches[:10]}")
        return {"url": url, "examples": len(texts), "mismatches": 0, "model_version": health["model_version"],
                "seconds": round(time.perf_counter() - started, 1)}
    finally:
        stop_process_group(server, grace_seconds=30)
        log.close()


def offline_predictions(model_dir: Path, texts: list[str], max_length: int, precision: str = "fp32") -> list[dict]:
    """What the model predicts in this process (label, probabilities), in the precision the service serves it in."""
    from tasks.serving import load_model, predict

    return predict(load_model(model_dir, "offline", max_length, precision), texts)


def top_two_gap(probabilities: dict[str, float]) -> float:
    first, second = sorted(probabilities.values(), reverse=True)[:2] if len(probabilities) > 1 else (1.0, 0.0)
    return first - second


def check_serving_variants(params: Params, model_dir: Path | None = None, holdout=None) -> dict:
    """The candidate (`model_dir`, default paths.model) in each reduced precision this machine offers, against fp32 on
    the whole target holdout (`holdout`, default the split's file; tasks/variants.py), held to the gate's
    non-inferiority margin. When the check cannot run, fp32 serves (the model as it was validated) and the record
    says why: the check only decides whether a faster variant may serve."""
    import pandas as pd

    from tasks.variants import check_variants, not_checked

    path = params.paths.splits.target_holdout
    try:
        holdout = pd.read_parquet(path) if holdout is None else holdout
        holdout = holdout[holdout["label"].astype("str").isin(params.ingest.labels)]
    except (OSError, KeyError, ValueError) as exc:
        return not_checked(f"no target holdout to check them on ({path}: {type(exc).__name__}: {exc})")
    if holdout.empty:
        return not_checked(f"no labelled rows in {path} to check them on")
    try:
        return check_variants(model_dir or params.paths.model, holdout["text"].astype("str").tolist(),
                              holdout["label"].astype("str").tolist(), params.ingest.labels, params.model.max_length,
                              params.gate.non_inferiority.delta, params.evaluate.confidence, params.evaluate.seed)
    except (OSError, ValueError, RuntimeError) as exc:  # a model the variants cannot be built from or run
        return not_checked(f"they could not be measured ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
