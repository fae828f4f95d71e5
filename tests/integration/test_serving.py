"""Package, promote, roll back and serve for real: the package stage with its smoke test on `bentoml
serve`, `regraft promote/rollback/models/serve` as subprocesses, bad requests, 2,000 requests under load,
and promotions while serving without a failed request."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tasks.processes import free_port, stop_process_group, wait_until_healthy
from tests.conftest import LABELS, make_project, package, processes_in, run, save_candidate, write_verdict

pytestmark = pytest.mark.integration
REGRAFT = str(Path(sys.executable).parent / "regraft")


FLOOD_LIMIT = 24  # serve.max_in_flight of the module's server: above the load tests' 16 clients
SERVERS: dict[str, subprocess.Popen] = {}  # the `regraft serve` process behind each served URL


@pytest.fixture(scope="module")
def served_project(tmp_path_factory, tiny_bert):
    """A project with two packaged tiny models, A in production, served by `regraft serve`."""
    from tasks.config import write_overrides

    base = tmp_path_factory.mktemp("serving")
    project = make_project(base / "project", base / "remote")
    run([sys.executable, "-m", "pipelines.ingest"], project)
    port = free_port()
    # One worker: /healthz's shadow and canary counts are the answering worker's own.
    write_overrides(project / "params.yaml", {"model.max_length": 64, "serve.port": port, "serve.workers": 1,
                                              "serve.max_in_flight": FLOOD_LIMIT, "serve.body_timeout_seconds": 8})
    tags = [package(project, tiny_bert, seed) for seed in (1, 2)]
    run([REGRAFT, "promote", tags[0], "--reason", "first"], project)
    # The server logs every request: to a file, since an undrained pipe would fill and stall it.
    log = (base / "serve.log").open("w")
    server = subprocess.Popen([REGRAFT, "serve"], cwd=project, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    SERVERS[url] = server
    try:
        wait_until_healthy(f"{url}/healthz", server, 180, base / "serve.log")
        yield project, url, tags
    finally:
        stop_process_group(server, grace_seconds=30)
        log.close()


def test_package_refuses_a_candidate_without_a_pass(tmp_path, tiny_bert):
    project = make_project(tmp_path / "project", tmp_path / "remote")
    save_candidate(project, tiny_bert, 0)
    for verdict in ("FAIL", "INCONCLUSIVE"):
        write_verdict(project, verdict)
        failed = run([sys.executable, "-m", "pipelines.package"], project, check=False)
        assert failed.returncode == 1
        assert f"gate verdict {verdict}, not approved by " in failed.stderr
    # A decision is about one verdict: a verdict changed after the decision packages nothing.
    write_verdict(project, "PASS")
    (project / "reports" / "verdict.json").write_text(json.dumps(
        {"stage": "gate", "verdict": "PASS", "champion": False, "criteria": [], "failed": [], "inconclusive": [],
         "insufficient_data": [], "notes": ["a verdict written after the decision"]}))
    stale = run([sys.executable, "-m", "pipelines.package"], project, check=False)
    assert stale.returncode == 1 and "decides about another verdict" in stale.stderr
    assert not (project / "registry" / "registry.json").exists()


def test_health_and_predictions_carry_the_model_version(served_project):
    project, url, tags = served_project
    from tasks.serving import serving_precision

    health = httpx.get(f"{url}/healthz").json()
    # Packaging checked each reduced precision this machine offers against fp32 on the target holdout and recorded
    # the choice; the service serves in it where this machine runs it too.
    serving = json.loads((project / "registry" / "registry.json").read_text())["models"][tags[0]]["serving"]
    assert serving["precision"] in ("fp32", *serving["variants"]) and serving["rows"] > 0 and serving["reason"]
    assert all({"agreement", "interval", "speedup", "faithful"} <= set(v) for v in serving["variants"].values())
    assert health == {"status": "ok", "model_version": tags[0], "labels": LABELS,
                      "precision": serving_precision(serving)[0]}
    rows = httpx.post(f"{url}/predict", json={"texts": ["works well", "terrible headache"]}).json()
    assert [r["model_version"] for r in rows] == [tags[0]] * 2
    assert all(r["label"] in LABELS and abs(sum(r["probabilities"].values()) - 1) < 1e-3 for r in rows)
    assert "bentoml_service_request_total" in httpx.get(f"{url}/metrics").text
    # The API is typed in the served OpenAPI document, limits included.
    spec = httpx.get(f"{url}/docs.json").json()
    post = spec["paths"]["/predict"]["post"]
    texts = post["requestBody"]["content"]["application/json"]["schema"]["properties"]["texts"]
    plain, grouped = texts["items"]["anyOf"]  # a text, or a text with its group values
    assert (texts["minItems"], texts["maxItems"], plain["maxLength"]) == (1, 64, 5000)
    assert spec["components"]["schemas"][grouped["$ref"].split("/")[-1]]["required"] == ["text", "groups"]
    answer = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer == {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"}}
    assert set(spec["components"]["schemas"]["Prediction"]["required"]) == {"label", "probabilities", "model_version"}
    logged = [json.loads(line) for line in (project / ".regraft" / "predictions.jsonl").read_text().splitlines()]
    assert logged and "text_sha256" in logged[-1] and "text" not in logged[-1]


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"texts": 5}', 422, "texts must be a list of strings"),
    (b'{"texts": []}', 422, "texts is empty"),
    (b'{"texts": [null]}', 422, "texts[0] is NoneType"),
    (json.dumps({"texts": ["a"] * 65}).encode(), 413, "65 texts in one request; the limit is 64"),
    (json.dumps({"texts": ["a" * 5001]}).encode(), 413, "texts[0] has 5001 characters"),
    (json.dumps({"texts": ["a" * 4000] * 300}).encode(), 413, "request body is larger than the limit"),
    (b'{"texts": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", 400, "nested too deeply"),
    (json.dumps({"texts": [{"text": "a", "groups": {"drug": "x"}}]}).encode(), 422,
     "texts[0].groups names ['drug'], not group columns of this project (ingest.columns.groups: ['condition'])"),
])
def test_bad_requests_get_a_4xx_with_a_message(served_project, body, status, message):
    _, url, _ = served_project
    response = httpx.post(f"{url}/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def server_log_since(project: Path, offset: int) -> str:
    """What the module's `regraft serve` logged after byte `offset`."""
    return (project.parent / "serve.log").read_bytes()[offset:].decode("utf-8", "replace")


def test_a_body_that_is_not_json_gets_a_415_and_no_traceback(served_project):
    """Only JSON reaches BentoML: multipart (with or without a boundary: a 500 from its form parser before) and
    text/plain get 415 naming what is accepted; no Content-Type is read as JSON."""
    project, url, tags = served_project
    offset = (project.parent / "serve.log").stat().st_size
    json_body = b'{"texts": ["works well"]}'
    refused = [httpx.post(f"{url}/predict", files={"texts": ("texts.txt", b"works well")}),
               httpx.post(f"{url}/predict", content=json_body, headers={"content-type": "multipart/form-data"}),
               httpx.post(f"{url}/predict", content=json_body,
                          headers={"content-type": "multipart/form-data; boundary=x"}),
               httpx.post(f"{url}/predict", content=b"works well", headers={"content-type": "text/plain"})]
    for response in refused:
        assert response.status_code == 415, response.text
        assert "send the body as application/json" in response.json()["error"]
    untyped = httpx.post(f"{url}/predict", content=json_body)
    assert untyped.status_code == 200 and untyped.json()[0]["model_version"] == tags[0]
    assert "Traceback" not in server_log_since(project, offset)


def load(url: str, requests: int, concurrency: int, seen: dict, failures: list) -> None:
    """Closed-loop load: `concurrency` clients, each sending its next request when the last one answered."""
    counter = iter(range(requests))
    lock = threading.Lock()

    def client():
        with httpx.Client(base_url=url, timeout=60) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                try:
                    response = http.post("/predict", json={"texts": [f"review number {i}", "it helped"][: 1 + i % 2]})
                    if response.status_code != 200:
                        failures.append((i, response.status_code, response.text[:200]))
                        continue
                    for row in response.json():
                        with lock:
                            seen[row["model_version"]] = seen.get(row["model_version"], 0) + 1
                except httpx.HTTPError as exc:
                    failures.append((i, type(exc).__name__, str(exc)))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_two_thousand_requests_without_a_failure(served_project):
    _, url, tags = served_project
    seen, failures = {}, []
    load(url, 2000, 16, seen, failures)
    assert failures == []
    assert sum(seen.values()) == 3000


def test_promotion_and_rollback_under_load_fail_no_request(served_project):
    project, url, tags = served_project
    seen, failures = {}, []
    loader = threading.Thread(target=load, args=(url, 4000, 8, seen, failures))
    loader.start()
    time.sleep(2)
    run([REGRAFT, "promote", tags[1], "--reason", "better"], project)
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/healthz").json()["model_version"] != tags[1] and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    run([REGRAFT, "rollback", "--reason", "undo"], project)
    loader.join()
    assert failures == []
    assert seen.get(tags[0], 0) > 0 and seen.get(tags[1], 0) > 0, seen
    models = run([REGRAFT, "models"], project).stdout
    assert f"production: {tags[0]}" in models
    assert f"rollback  {tags[0]} (was {tags[1]})" in models


def test_promote_refuses_unknown_and_tampered_models(served_project):
    project, url, tags = served_project
    unknown = run([REGRAFT, "promote", "regraft-classifier:doesnotexist"], project, check=False)
    assert unknown.returncode == 2 and "no such model in the registry" in unknown.stderr
    weights = stored_files(project, tags[1]) / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-8] + b"tampered")
    try:
        tampered = run([REGRAFT, "promote", tags[1]], project, check=False)
    finally:
        weights.write_bytes(original)
    assert tampered.returncode == 2 and "model.safetensors: checksum differs" in tampered.stderr
    assert httpx.get(f"{url}/healthz").json()["model_version"] == tags[0]


def wait_until(condition, seconds: float = 60):
    """The first true value of `condition()`, polled until `seconds` pass."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)
    return value


def test_a_shadow_candidate_changes_no_answer_and_predicts_every_served_text_off_the_response_path(served_project):
    """`regraft promote B --shadow` beside production A on the running server: every answer is byte for byte the one
    A gave without a shadow; B predicts each served text after the answer, logged under the prediction id of A's row,
    or the text is counted as shed in /healthz. `--shadow-off` ends it, and the history keeps both steps."""
    project, url, tags = served_project
    # Half the requests carry their texts' group values: the comparison is then also given per group.
    requests = [[f"shadow check {i}", "it helped"][: 1 + i % 2] for i in range(20)]
    requests = [[{"text": text, "groups": {"condition": "Acne" if i % 4 < 2 else "Pain"}} for text in texts]
                if i % 2 else texts for i, texts in enumerate(requests)]
    served_log, shadow_log = project / ".regraft" / "predictions.jsonl", project / ".regraft" / "shadow-predictions.jsonl"

    def answers() -> list[bytes]:
        with httpx.Client(base_url=url, timeout=30) as http:  # one at a time: each answer from a batch of its own
            return [http.post("/predict", json={"texts": texts}).content for texts in requests]

    def shadow_health() -> dict:
        return httpx.get(f"{url}/healthz").json().get("shadow") or {}

    without_shadow = answers()
    started = run([REGRAFT, "promote", tags[1], "--shadow", "--reason", "live check"], project)
    assert f"shadow: {tags[1]} now predicts beside {tags[0]}" in started.stdout
    wait_until(lambda: shadow_health().get("model_version") == tags[1])
    offset = len(served_log.read_text().splitlines())
    assert answers() == without_shadow
    texts = sum(len(batch) for batch in requests)
    health = wait_until(lambda: (h := shadow_health()) and h["predicted"] + h["shed"] + h["failed"] == texts and h)
    assert health["failed"] == 0 and health["queued_batches"] == 0
    served = [json.loads(line) for line in served_log.read_text().splitlines()[offset:]]
    assert len(served) == texts and {row["model_version"] for row in served} == {tags[0]}
    shadowed = {row["prediction_id"]: row for row in map(json.loads, shadow_log.read_text().splitlines())}
    missing = [row for row in served if row["prediction_id"] not in shadowed]
    assert len(missing) == health["shed"], (len(missing), health)
    for row in served:
        if row["prediction_id"] in shadowed:
            twin = shadowed[row["prediction_id"]]
            assert (twin["model_version"], twin["text_sha256"]) == (tags[1], row["text_sha256"])
            assert twin["label"] in LABELS and abs(sum(twin["probabilities"].values()) - 1) < 1e-3

    # `regraft shadow` reads and joins the real service's logs (a line it could not read would be named here); these
    # models were packaged without a dvc.lock, so no holdout rows are on record to estimate from: it says so, and
    # without labels for the texts the evidence is not enough (fail closed).
    compared = run([REGRAFT, "shadow", "--json"], project, check=False)
    assert compared.returncode == 0, compared.stderr
    report = json.loads(compared.stdout)
    assert report["verdict"] == "not enough evidence yet" and report["difference"]["basis"] is None, report
    assert any("lineage has no md5" in note for note in report["notes"]) and report["agreement"]["agreeing"] >= 0
    page = (project / "reports" / "shadow.html").read_text()  # the same comparison as a page to mail or attach
    assert page.startswith("<!doctype html>") and "agreement" in page and "condition = Acne" in page
    joined_groups = [row["groups"]["condition"] for row in served if "groups" in row and row["prediction_id"] in shadowed]
    assert {value: group["rows"] for value, group in report["groups"]["condition"].items()} == {
        value: joined_groups.count(value) for value in set(joined_groups)}, report["groups"]

    ended = run([REGRAFT, "promote", "--shadow-off", "--reason", "seen enough"], project)
    assert f"shadow-off: {tags[1]} no longer shadows production (seen enough)" in ended.stdout
    wait_until(lambda: "shadow" not in httpx.get(f"{url}/healthz").json())
    history = run([REGRAFT, "models"], project).stdout
    assert f"shadow    {tags[1]}  by" in history and f"shadow-off {tags[1]}  by" in history, history


def package_one_label(project: Path, tiny_bert: Path, label: str) -> str:
    """A candidate made worse on purpose: the tiny model with its head biased to answer `label` for every text."""
    import torch

    from tasks.models import load_classifier, load_tokenizer

    model = load_classifier(tiny_bert, LABELS)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([20.0 if name == label else 0.0 for name in LABELS]))
    model.save_pretrained(project / "models" / "candidate")
    load_tokenizer(tiny_bert).save_pretrained(project / "models" / "candidate")
    write_verdict(project, "PASS")
    run([sys.executable, "-m", "pipelines.package"], project)
    return json.loads((project / "reports" / "package.json").read_text())["model"]


def test_a_canary_answers_its_share_on_every_host_and_is_rolled_back_when_worse_or_promoted_when_not(
        served_project, tiny_bert, tmp_path):
    """`regraft promote C --canary 0.5` on the running server: each text is answered by the model its hash picks, the
    same on a second host started mid-canary and at every request, with no failed request; the other model predicts
    each text off the response path. Labels that production gets right: `regraft canary` shows the canary that answers
    one label for everything worse and rolls it back (exit 1, the evidence in the history, production answering
    all again); a canary with production's own weights is shown not worse and promoted after its two windows.
    A bad fraction, an unknown tag, a second canary: exit 2 naming the problem, the record unchanged."""
    from tasks.config import write_overrides
    from tasks.serving import canary_share

    project, url, tags = served_project
    registry = project / "registry" / "registry.json"
    texts = [f"canary check {i}: it {['helped', 'hurt', 'did nothing'][i % 3]}" for i in range(60)]

    def answers(at: str = url) -> dict[str, str]:
        with httpx.Client(base_url=at, timeout=30) as http:
            replies = [http.post("/predict", json={"texts": texts[i:i + 3]}) for i in range(0, len(texts), 3)]
        assert [r.status_code for r in replies] == [200] * len(replies), [r.text for r in replies if r.status_code != 200]
        return {text: row for reply, i in zip(replies, range(0, len(texts), 3))
                for text, row in zip(texts[i:i + 3], reply.json())}

    production_labels = {text: row["label"] for text, row in answers().items()}
    rarest = min(LABELS, key=lambda label: list(production_labels.values()).count(label))
    worse = package_one_label(project, tiny_bert, rarest)
    feedback = tmp_path / "labels.csv"
    feedback.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in production_labels.items()))
    write_overrides(project / "params.yaml", {"monitor.min_shadow_rows": 30, "monitor.canary_windows": 2})

    before = registry.read_bytes()
    for argv, message in ((["--canary", "0"], "must lie strictly between 0 and 1"),
                          (["--canary", "1.5"], "must lie strictly between 0 and 1"),
                          (["--canary", "nan"], "must lie strictly between 0 and 1"),
                          (["--canary", "half"], "invalid float value")):
        refused = run([REGRAFT, "promote", worse, *argv], project, check=False)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    unknown = run([REGRAFT, "promote", "regraft-classifier:nope", "--canary", "0.5"], project, check=False)
    assert unknown.returncode == 2 and "no such model in the registry" in unknown.stderr
    assert registry.read_bytes() == before

    started = run([REGRAFT, "promote", worse, "--canary", "0.5", "--reason", "half the traffic"], project)
    assert f"canary: {worse} now answers 0.5 of the requests" in started.stdout
    second = run([REGRAFT, "promote", tags[1], "--canary", "0.1"], project, check=False)
    assert second.returncode == 2 and f"{worse} is already in canary" in second.stderr
    wait_until(lambda: (httpx.get(f"{url}/healthz").json().get("canary") or {}).get("model_version") == worse)

    def off_path_total() -> int:
        """Texts this server has handed to the model that did not answer them (predicted, shed or failed)."""
        counts = httpx.get(f"{url}/healthz").json()["canary"]["off_path"]
        return sum(c["predicted"] + c["shed"] + c["failed"] for c in counts.values())

    before = off_path_total()
    expected = {text: worse if canary_share(text) < 0.5 else tags[0] for text in texts}
    assert 0 < list(expected.values()).count(worse) < len(texts)
    first = answers()
    assert {text: row["model_version"] for text, row in first.items()} == expected
    assert all(row["label"] == rarest for text, row in first.items() if expected[text] == worse)

    # A second serving host started mid-canary applies the same split.
    port = free_port()
    log = (tmp_path / "second-host.log").open("w")
    host = subprocess.Popen([REGRAFT, "serve", "--port", str(port)], cwd=project, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        other = f"http://127.0.0.1:{port}"
        wait_until_healthy(f"{other}/healthz", host, 180, tmp_path / "second-host.log")
        wait_until(lambda: "canary" in httpx.get(f"{other}/healthz").json())
        assert {text: row["model_version"] for text, row in answers(other).items()} == expected
    finally:
        stop_process_group(host, grace_seconds=30)
        log.close()

    wait_until(lambda: off_path_total() >= before + len(texts))
    judged = run([REGRAFT, "canary", "--feedback", str(feedback), "--columns", "text=text,label=label"], project,
                 check=False)
    assert judged.returncode == 1, judged.stdout + judged.stderr
    assert f"canary-rolled-back: {worse} answers nothing any more, {tags[0]} answers all" in judged.stdout
    record = json.loads(registry.read_text())
    assert record["canary"] is None and record["production"] == tags[0]
    window, ended = record["history"][-2:]
    assert (window["action"], window["verdict"], ended["action"]) == ("canary-window", "worse", "canary-rolled-back")
    assert ended["evidence"]["basis"] == "realized" and ended["evidence"]["macro_f1_difference"] < -0.05
    wait_until(lambda: "canary" not in httpx.get(f"{url}/healthz").json())
    assert {row["model_version"] for row in answers().values()} == {tags[0]}

    # The same weights as production, under a new tag: not worse in two windows, each on its own traffic, then
    # production. Judged again with no new traffic, a window is refused: no text counts twice.
    same = package(project, tiny_bert, 1)
    run([REGRAFT, "promote", same, "--canary", "0.5"], project)
    wait_until(lambda: (httpx.get(f"{url}/healthz").json().get("canary") or {}).get("model_version") == same)
    for window_number in (1, 2):
        before = off_path_total()
        answers()
        wait_until(lambda: off_path_total() >= before + len(texts))
        judged = run([REGRAFT, "canary", "--feedback", str(feedback), "--columns", "text=text,label=label"], project)
        assert f"canary {same}: not worse" in judged.stdout and f"{window_number} of 2 windows" in judged.stdout
        if window_number == 1:
            again = run([REGRAFT, "canary", "--feedback", str(feedback), "--columns", "text=text,label=label"], project,
                        check=False)
            assert again.returncode == 0 and "not enough evidence yet" in again.stdout, again.stdout + again.stderr
    assert f"promote: {same} is now in production (was {tags[0]})" in judged.stdout
    history = json.loads(registry.read_text())["history"]
    assert [e["verdict"] for e in history if e["action"] == "canary-window" and e["tag"] == same] == [
        "not worse", "not enough evidence yet", "not worse"]
    wait_until(lambda: httpx.get(f"{url}/healthz").json()["model_version"] == same)
    run([REGRAFT, "rollback", "--reason", "back to the module's production model"], project)
    wait_until(lambda: httpx.get(f"{url}/healthz").json()["model_version"] == tags[0])
    write_overrides(project / "params.yaml", {"monitor.min_shadow_rows": 200, "monitor.canary_windows": 3})


def stored_files(project: Path, tag: str) -> Path:
    """A packaged model's folder in the project's BentoML store."""
    name, version = tag.split(":")
    return project / ".regraft" / "bentoml" / "models" / name / version


def test_the_service_refuses_a_production_model_whose_files_were_changed(served_project):
    """The registry names a model whose config.json was changed after packaging (labels swapped, as an attacker
    with write access could): the service checks every file's recorded sha256 on loading, keeps the model it
    has, and logs which file differs. The same check runs at start (there: nothing served, /healthz 503)."""
    from tasks.files import write_atomically

    project, url, tags = served_project
    registry = project / "registry" / "registry.json"
    config = stored_files(project, tags[1]) / "config.json"
    original_config, original_record = config.read_text(), registry.read_text()
    swapped = json.loads(original_config)
    swapped["id2label"] = dict(zip(swapped["id2label"], reversed(swapped["id2label"].values())))
    record = json.loads(original_record)
    record["production"] = tags[1]
    offset = (project.parent / "serve.log").stat().st_size

    def write_record() -> None:
        write_atomically(registry, lambda tmp: tmp.write_text(json.dumps(record)))

    try:
        config.write_text(json.dumps(swapped))
        write_record()
        deadline, rewrites = time.monotonic() + 60, 0
        while "config.json: checksum differs" not in server_log_since(project, offset) and time.monotonic() < deadline:
            if json.loads(registry.read_text()).get("production") != tags[1]:
                # The service's follower of the remote may not have seen the last test's rollback yet: it then
                # mirrors the remote's record over this one, once, and is in step with the remote afterwards.
                rewrites += 1
                assert rewrites == 1, "the local record was replaced again: the service does not only follow changes"
                write_record()
            time.sleep(0.2)
        logged = server_log_since(project, offset)
        assert f"{tags[1]}: files in" in logged and "config.json: checksum differs" in logged, logged[-3000:]
        assert f"still serving {tags[0]}" in logged and "Traceback" not in logged
        assert httpx.get(f"{url}/healthz").json()["model_version"] == tags[0]
    finally:  # the record first, so the service never sees tags[1] in production with its files restored
        write_atomically(registry, lambda tmp: tmp.write_text(original_record))
        config.write_text(original_config)


def test_evaluate_and_gate_compare_the_candidate_with_the_promoted_champion(served_project):
    project, _, tags = served_project
    run([sys.executable, "-m", "pipelines.evaluate"], project)
    evaluation = json.loads((project / "reports" / "evaluate.json").read_text())
    assert evaluation["champion"] == "models/production"
    target = evaluation["splits"]["target_holdout"]
    assert set(target["models"]) == {"candidate", "champion", "frozen_encoder", "tfidf"}
    difference = target["comparisons"]["candidate-champion"]["overall|macro_f1"]
    assert difference["interval"][0] <= difference["estimate"] <= difference["interval"][1]
    gate = run([sys.executable, "-m", "pipelines.gate"], project, check=False)
    verdict = json.loads((project / "reports" / "verdict.json").read_text())
    assert "decision" not in verdict  # the verdict is evidence only; the decide stage decides
    names = {c["name"]: c["status"] for c in verdict["criteria"]}
    assert verdict["champion"] is True
    assert names["non-inferiority to champion: target_holdout macro_f1"] in {"PASS", "FAIL", "INCONCLUSIVE"}
    assert names["forgetting: source_holdout macro_f1"] in {"PASS", "FAIL", "INCONCLUSIVE"}
    # Two random tiny models are far below the demo's floors: the gate must not pass them.
    assert verdict["verdict"] != "PASS" and gate.returncode == 1


CRASH_POINTS = ["promote:journaled", "replace:built", "replace:old-moved-away", "promote:installed", "promote:recorded"]


def test_a_promotion_killed_at_any_step_is_never_trusted_half_done_and_is_completed(served_project):
    """Power cut mid-promotion, at each step: until it is completed, the production files are not trusted
    (evaluate fails closed instead of judging without a champion); the next promote or rollback completes it,
    and files and record agree again."""
    from tasks.registry import journal_file, production_problems, read_record, verify_files

    project, _, tags = served_project
    registry, champion = project / "registry" / "registry.json", project / "models" / "production"
    for point in CRASH_POINTS:
        killed = run([REGRAFT, "promote", tags[1], "--reason", "crash test"], project, check=False,
                     env_update={"REGRAFT_CRASH_AT": point})
        assert killed.returncode == -9, (point, killed.stdout, killed.stderr)
        assert journal_file(registry).is_file() and production_problems(registry, champion), point
        if point == "replace:old-moved-away":  # the files are gone: evaluate must stop, not drop the champion
            refused = run([sys.executable, "-m", "pipelines.evaluate"], project, check=False)
            assert refused.returncode == 1 and "cannot be compared with" in refused.stderr, refused.stderr
        # The rollback first completes the interrupted promotion of tags[1], then puts tags[0] back.
        run([REGRAFT, "rollback", "--reason", f"after a crash at {point}"], project)
        record = read_record(registry)
        assert record["production"] == tags[0], point
        assert verify_files(champion, record["models"][tags[0]]["sha256"]) == [], point
        assert not production_problems(registry, champion) and not list(champion.parent.glob(".production.*"))
        assert [e["tag"] for e in record["history"][-2:]] == [tags[1], tags[0]], point


def test_a_flood_of_slow_bodies_is_bounded_and_healthz_keeps_answering(served_project):
    """Three times the in-flight limit of connections from loopback each start a /predict and then trickle
    its body: the ones over the limit get 429 at once, the rest 408 once the body timeout passes, /healthz
    answers throughout, and afterwards a normal request is served."""
    import socket

    _, url, tags = served_project
    # The test before ends with a rollback; the service follows the registry within serve.reload_seconds.
    wait_until(lambda: httpx.get(f"{url}/healthz").json()["model_version"] == tags[0])
    port = int(url.rsplit(":", 1)[1])
    header = ("POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              "Content-Length: 5000\r\n\r\n").encode()
    flood = []
    for _ in range(3 * FLOOD_LIMIT):
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.sendall(header + b'{"texts": ["')
        flood.append(sock)
    try:
        for _ in range(5):
            health = httpx.get(f"{url}/healthz", timeout=10)
            assert health.status_code == 200 and health.json()["model_version"] == tags[0]
        busy = httpx.post(f"{url}/predict", json={"texts": ["fine"]}, timeout=10)
        assert busy.status_code == 429 and "the limit of this worker" in busy.json()["error"]
        statuses = []
        for sock in flood:
            statuses.append(int(sock.recv(4096).split(b" ", 2)[1]))
    finally:
        for sock in flood:
            sock.close()
    assert sorted(set(statuses)) == [408, 429], statuses
    assert statuses.count(408) == FLOOD_LIMIT, statuses
    assert httpx.post(f"{url}/predict", json={"texts": ["works well"]}, timeout=30).status_code == 200


def test_serve_stops_its_whole_server_on_sigterm(served_project):
    """Last in this module: stops the module's server as a process manager does, by SIGTERM to `regraft
    serve` alone; BentoML's processes go with it and the port is free again."""
    import socket

    project, url, _ = served_project
    server = SERVERS[url]
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) is not None
    leftovers = [p.info["cmdline"] for p in processes_in(project) if p.info["cmdline"]]
    assert not leftovers, f"regraft serve left processes behind: {leftovers}"
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", int(url.rsplit(":", 1)[1]))) != 0, "something still listens on the port"
