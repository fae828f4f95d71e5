"""Request checks of the service (each bad request a 4xx with a message that names the problem), the check of a
model's files against their recorded sha256 before it is served, and the prediction log."""

from __future__ import annotations

import json

import pytest

from tasks.config import ServeConfig
from tasks.serving import (ModelRefused, PredictionLog, RequestRejected, check_content_type, load_checked_model,
                           parse_predict_request, recorded_digests)

pytestmark = pytest.mark.unit
CFG = ServeConfig(host="127.0.0.1", port=3000, max_texts=3, max_chars=20, max_body_bytes=200, max_in_flight=4,
                  body_timeout_seconds=5, max_batch_size=8,
                  max_latency_ms=10, workers=1, log_texts="hash", prediction_log="p.jsonl", shadow_log="s.jsonl",
                  shadow_queue=2, reload_seconds=1)

BAD = [
    (b"not json", 400, "request body is not valid JSON"),
    (b"[1, 2]", 422, 'expected a JSON object {"texts"'),
    (b'{"text": ["a"]}', 422, 'expected a JSON object {"texts"'),
    (b'{"texts": ["a"], "extra": 1}', 422, "unknown field(s) ['extra']"),
    (b'{"texts": "a"}', 422, "texts must be a list of strings, not str"),
    (b'{"texts": []}', 422, "texts is empty"),
    (b'{"texts": ["a", 5]}', 422, "texts[1] is int, not a string"),
    (b'{"texts": ["a", "  "]}', 422, "texts[1] is empty"),
    (b'{"texts": ["a", "b", "c", "d"]}', 413, "4 texts in one request; the limit is 3"),
    (json.dumps({"texts": ["x" * 21]}).encode(), 413, "texts[0] has 21 characters; the limit is 20"),
    (json.dumps({"texts": ["x"] * 60}).encode(), 413, "request body is 311 bytes; the limit is 200"),
    ("{\"texts\": [\"caf\xe9\"]}".encode("latin-1"), 400, "request body is not valid JSON"),
]


BAD_GROUPS = [
    ({"text": "a", "groups": {"drug": "x"}}, 422, "texts[0].groups names ['drug'], not group columns of this project"),
    ({"text": "a", "groups": ["acne"]}, 422, "texts[0].groups must be an object"),
    ({"text": "a", "groups": {"condition": 3}}, 422, "texts[0].groups['condition'] must be a non-empty string"),
    ({"text": "a", "groups": {"condition": " "}}, 422, "texts[0].groups['condition'] must be a non-empty string"),
    ({"text": "a", "groups": {"condition": "x" * 201}}, 413, "has 201 characters; the limit is 200"),
    ({"text": "a"}, 422, "texts[0] is an object: it needs exactly the fields text and groups"),
    ({"text": "a", "groups": {}, "label": "b"}, 422, "(unknown: ['label'])"),
    ({"text": 5, "groups": {}}, 422, "texts[0] is int, not a string"),
    ({"text": "x" * 21, "groups": {}}, 413, "texts[0] has 21 characters; the limit is 20"),
    ({"text": "a", "groups": {"condition": "acne\n| x |"}}, 422, "holds a control character"),
]


@pytest.mark.parametrize("item,status,message", BAD_GROUPS, ids=[b[2][:30] for b in BAD_GROUPS])
def test_bad_group_values_are_rejected_with_a_clear_4xx(item, status, message):
    with pytest.raises(RequestRejected) as rejected:
        parse_predict_request(json.dumps({"texts": [item]}).encode(), CFG.model_copy(update={"max_body_bytes": 1000}),
                              ["condition"])
    assert rejected.value.status == status
    assert message in rejected.value.message


@pytest.mark.parametrize("body,status,message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_requests_are_rejected_with_a_clear_4xx(body, status, message):
    with pytest.raises(RequestRejected) as rejected:
        parse_predict_request(body, CFG, ["condition"])
    assert rejected.value.status == status
    assert message in rejected.value.message


def test_deeply_nested_json_is_a_400_not_a_crash():
    deep = b'{"texts": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(RequestRejected) as rejected:
        parse_predict_request(deep, CFG.model_copy(update={"max_body_bytes": 1_000_000}))
    assert rejected.value.status == 400 and "nested too deeply" in rejected.value.message


def test_a_text_may_carry_its_group_values_and_the_log_keeps_them(tmp_path):
    from tasks.serving import split_groups

    body = {"texts": ["plain", {"text": "grouped", "groups": {"condition": "acne"}}]}
    items = json.loads(json.dumps(body))["texts"]
    assert parse_predict_request(json.dumps(body).encode(), CFG, ["condition"]) == ["plain", "grouped"]
    texts, groups = split_groups(items)
    assert texts == ["plain", "grouped"] and groups == [None, {"condition": "acne"}]
    log = PredictionLog(tmp_path / "log.jsonl", "hash")
    log.append(texts, [{"label": "a", "probabilities": {"a": 0.6, "b": 0.4}, "model_version": "m:1"}] * 2,
               groups=groups)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert "groups" not in rows[0] and rows[1]["groups"] == {"condition": "acne"}


def test_a_good_request_gives_its_texts():
    assert parse_predict_request(b'{"texts": ["good", "bad"]}', CFG) == ["good", "bad"]


@pytest.mark.parametrize("mode", ["hash", "text"])
def test_prediction_log_keeps_the_text_or_only_its_hash(tmp_path, mode):
    log = PredictionLog(tmp_path / "log.jsonl", mode)
    results = [{"label": "positive", "probabilities": {"negative": 0.1, "positive": 0.9}, "model_version": "m:1"}]
    ids = log.append(["great drug"], results)
    row = json.loads((tmp_path / "log.jsonl").read_text())
    assert row["label"] == "positive" and row["confidence"] == 0.9 and row["model_version"] == "m:1" and row["time"]
    assert row["prediction_id"] == ids[0] and row["probabilities"] == results[0]["probabilities"]
    assert ("text" in row) is (mode == "text") and ("text_sha256" in row) is (mode == "hash")


def append_batches(path: str, worker: int) -> None:
    log = PredictionLog(path, "text")
    for batch in range(40):
        texts = [f"worker {worker} batch {batch} text {i} " + "long review " * 40 for i in range(64)]
        log.append(texts, [{"label": "a", "probabilities": {"a": 0.6, "b": 0.4}, "model_version": "m:1"}] * 64)


def test_the_workers_of_a_service_append_to_one_prediction_log_without_mixing_lines(tmp_path):
    """serve.workers processes share the prediction log: every batch (here 64 texts, about 40 KB) is one write, so
    two processes appending at once leave only whole lines."""
    import multiprocessing

    path = tmp_path / "log.jsonl"
    workers = [multiprocessing.get_context("spawn").Process(target=append_batches, args=(str(path), n)) for n in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2 * 40 * 64 and all(row["text"].startswith("worker ") for row in rows)


def test_auto_serves_with_one_worker_per_core_each_on_its_own_threads_and_one_on_a_gpu(monkeypatch):
    import torch
    from pydantic import ValidationError

    from tasks.serving import serving_workers, worker_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    auto = CFG.model_copy(update={"workers": "auto"})
    assert serving_workers(auto) == 4 and worker_threads(4) == 1 and worker_threads(2) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # the threads a machine's owner gives the service, shared by workers
    assert worker_threads(4) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    assert serving_workers(auto) == 8  # a bound on memory: each worker holds every model it serves
    assert serving_workers(CFG.model_copy(update={"workers": 3})) == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert serving_workers(auto) == 1
    for bad in (0, "many", -2):
        with pytest.raises(ValidationError, match="workers"):
            ServeConfig(**{**CFG.model_dump(), "workers": bad})


def test_the_shadow_queue_is_bounded_sheds_what_does_not_fit_and_counts_it(tmp_path, monkeypatch):
    """The shadow candidate never holds up a request: with its worker busy and its queue full, a served batch is
    shed at once and counted; the queued batches are predicted and logged with production's prediction ids."""
    import threading
    import time

    from tasks import serving
    from tasks.serving import LoadedModel, ShadowPredictor

    busy, release = threading.Event(), threading.Event()

    def slow_predict(loaded, texts, runtime=None):
        busy.set()
        release.wait(10)
        return [{"label": "positive", "probabilities": {"negative": 0.25, "positive": 0.75},
                 "model_version": loaded.version} for _ in texts]

    monkeypatch.setattr(serving, "predict", slow_predict)
    shadow = ShadowPredictor(PredictionLog(tmp_path / "shadow.jsonl", "hash"), capacity=2)
    assert shadow.submit(["before"], ["id-0"]) is False and shadow.status() is None  # no shadow: nothing queued
    shadow.swap(LoadedModel("cand:1", None, None, ["negative", "positive"], 64))
    assert shadow.submit(["first"], ["id-1"])
    assert busy.wait(10)  # the worker holds the first batch; the queue is empty again
    assert shadow.submit(["second", "third"], ["id-2", "id-3"]) and shadow.submit(["fourth"], ["id-4"])
    assert shadow.submit(["fifth", "sixth"], ["id-5", "id-6"]) is False  # full: shed, not waited for
    assert shadow.status() == {"model_version": "cand:1", "predicted": 0, "shed": 2, "failed": 0, "queued_batches": 2}
    release.set()
    deadline = time.monotonic() + 10
    while shadow.status()["predicted"] < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert shadow.status() == {"model_version": "cand:1", "predicted": 4, "shed": 2, "failed": 0, "queued_batches": 0}
    rows = [json.loads(line) for line in (tmp_path / "shadow.jsonl").read_text().splitlines()]
    assert [row["prediction_id"] for row in rows] == ["id-1", "id-2", "id-3", "id-4"]
    assert rows[0]["probabilities"] == {"negative": 0.25, "positive": 0.75} and rows[0]["model_version"] == "cand:1"
    assert "text" not in rows[0] and rows[0]["text_sha256"]
    shadow.swap(None)
    assert shadow.status() is None and shadow.submit(["later"], ["id-7"]) is False


def test_the_shadow_candidate_starts_a_batch_only_while_production_has_nothing_to_answer(tmp_path, monkeypatch):
    """While the worker holds requests the shadow's batches wait in the queue (shed when it is full); once production
    is idle they are predicted."""
    import time

    from tasks import serving
    from tasks.serving import LoadedModel, ShadowPredictor

    monkeypatch.setattr(serving, "predict", lambda loaded, texts, runtime=None: [
        {"label": "positive", "probabilities": {"negative": 0.25, "positive": 0.75}, "model_version": loaded.version}
        for _ in texts])
    answering = [True]
    shadow = ShadowPredictor(PredictionLog(tmp_path / "shadow.jsonl", "hash"), capacity=2, idle=lambda: not answering[0])
    shadow.swap(LoadedModel("cand:1", None, None, ["negative", "positive"], 64))
    sent = [shadow.submit(["text 0"], ["id-0"])]
    deadline = time.monotonic() + 10
    while shadow.status()["queued_batches"] and time.monotonic() < deadline:  # the worker takes it, then waits
        time.sleep(0.01)
    sent += [shadow.submit([f"text {i}"], [f"id-{i}"]) for i in range(1, 4)]
    time.sleep(0.3)
    # The worker took the first batch and waits with it; two more wait in the queue; the fourth found it full.
    assert sent == [True, True, True, False] and shadow.status()["predicted"] == 0 and shadow.status()["shed"] == 1
    answering[0] = False
    deadline = time.monotonic() + 10
    while shadow.status()["predicted"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert shadow.status()["predicted"] == 3 and shadow.status()["shed"] == 1


def test_the_shadow_predicts_a_batch_a_few_texts_at_a_time_each_while_production_is_idle(tmp_path, monkeypatch):
    """A request arriving while the shadow works waits for one chunk at most: the shadow stops between chunks while
    production answers, and goes on where it was once production is idle again."""
    import time

    from tasks import serving
    from tasks.serving import LoadedModel, ShadowPredictor

    chunks: list[int] = []
    answering = [False]

    def predict_and_get_busy(loaded, texts, runtime=None):
        chunks.append(len(texts))
        answering[0] = True  # a request arrives while this chunk is predicted
        return [{"label": "positive", "probabilities": {"negative": 0.25, "positive": 0.75},
                 "model_version": loaded.version} for _ in texts]

    monkeypatch.setattr(serving, "predict", predict_and_get_busy)
    shadow = ShadowPredictor(PredictionLog(tmp_path / "shadow.jsonl", "hash"), capacity=2, idle=lambda: not answering[0])
    shadow.swap(LoadedModel("cand:1", None, None, ["negative", "positive"], 64))
    assert shadow.submit([f"text {i}" for i in range(10)], [f"id-{i}" for i in range(10)])
    time.sleep(0.3)
    assert chunks == [ShadowPredictor.CHUNK_TEXTS] and shadow.status()["predicted"] == ShadowPredictor.CHUNK_TEXTS
    for _ in range(2):  # production idle again, for one chunk at a time
        answering[0] = False
        deadline = time.monotonic() + 10
        while not answering[0] and time.monotonic() < deadline:
            time.sleep(0.01)
    time.sleep(0.1)
    assert chunks == [4, 4, 2] and shadow.status()["predicted"] == 10
    logged = [json.loads(line)["prediction_id"] for line in (tmp_path / "shadow.jsonl").read_text().splitlines()]
    assert logged == [f"id-{i}" for i in range(10)]


def test_a_canary_answers_its_share_of_texts_the_same_on_every_call_and_the_other_model_predicts_off_the_path(
        tmp_path, monkeypatch):
    """Each text goes to the canary when its hash falls below the fraction: the same text to the same model at every
    call (and on every host: nothing but the text decides), about `fraction` of distinct texts; every answer is
    logged, and the model that did not answer a text predicts it off the response path under the same id."""
    import time

    from tasks import serving
    from tasks.serving import CanaryRoute, LoadedModel, ShadowPredictor, answer_with_canary, canary_share

    def fake_predict(loaded, texts, runtime=None):
        return [{"label": "positive", "probabilities": {"negative": 0.2, "positive": 0.8},
                 "model_version": loaded.version} for _ in texts]

    monkeypatch.setattr(serving, "predict", fake_predict)
    texts = [f"served text {i}" for i in range(2000)]
    shares = [canary_share(text) for text in texts]
    assert all(0 <= share < 1 for share in shares) and shares == [canary_share(text) for text in texts]
    assert abs(sum(share < 0.2 for share in shares) / len(texts) - 0.2) < 0.03  # about the fraction, by hash alone
    production, candidate = (LoadedModel(tag, None, None, ["negative", "positive"], 64) for tag in ("prod:1", "cand:1"))
    log, off_path = PredictionLog(tmp_path / "p.jsonl", "hash"), PredictionLog(tmp_path / "s.jsonl", "hash")
    other = ShadowPredictor(off_path, capacity=100)
    batch = texts[:40]
    answers = answer_with_canary(production, CanaryRoute(candidate, 0.2), batch, log, other)
    again = answer_with_canary(production, CanaryRoute(candidate, 0.2), list(reversed(batch)), log, other)
    expected = ["cand:1" if canary_share(text) < 0.2 else "prod:1" for text in batch]
    assert [a["model_version"] for a in answers] == expected == [a["model_version"] for a in reversed(again)]
    assert 0 < expected.count("cand:1") < len(batch)
    deadline = time.monotonic() + 10
    while sum(sum(other.counts_of(tag).values()) for tag in ("prod:1", "cand:1")) < 80 and time.monotonic() < deadline:
        time.sleep(0.01)
    served = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    twins = {row["prediction_id"]: row for row in map(json.loads, (tmp_path / "s.jsonl").read_text().splitlines())}
    assert len(served) == len(twins) == 80
    for row in served:  # each text predicted by both models: the answer logged, the other off the path
        twin = twins[row["prediction_id"]]
        assert {row["model_version"], twin["model_version"]} == {"prod:1", "cand:1"}
        assert twin["text_sha256"] == row["text_sha256"]


def test_loading_a_model_for_serving_leaves_the_process_able_to_train(tiny_bert, tmp_path):
    """A served model predicts under no_grad without switching gradients off for the whole process: a suite worker
    (or any process) that served a model and then trained once failed with "does not require grad"."""
    import torch

    from tasks.models import load_classifier, load_tokenizer
    from tasks.serving import load_model, predict

    load_classifier(str(tiny_bert), ["negative", "positive"]).save_pretrained(tmp_path)
    load_tokenizer(str(tiny_bert)).save_pretrained(tmp_path)
    loaded = load_model(tmp_path, "v1", 32)
    assert predict(loaded, ["a review"])[0]["model_version"] == "v1"
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("content_types", [
    ["multipart/form-data; boundary=----x"],
    ["multipart/form-data"],  # no boundary: BentoML's form parser failed with a KeyError
    ["text/plain"],
    ["application/x-www-form-urlencoded"],  # curl -d without -H
    ["application/vnd.bentoml+pickle"],
    [""],
    ["application/json", "text/plain"],
])
def test_a_body_that_is_not_json_is_a_415_that_says_what_is_accepted(content_types):
    with pytest.raises(RequestRejected) as rejected:
        check_content_type(content_types)
    assert rejected.value.status == 415 and "send the body as application/json" in rejected.value.message


@pytest.mark.parametrize("content_types", [["application/json"], ["Application/JSON; charset=utf-8"], []])
def test_json_or_no_content_type_is_accepted(content_types):
    check_content_type(content_types)


def test_a_model_is_loaded_only_with_the_files_recorded_for_it(tiny_bert, tmp_path):
    """The service's loading check: an intact model loads; a swapped label mapping, an added file or no recorded
    checksums are refused before anything is loaded, naming the file."""
    from tasks.models import load_classifier, load_tokenizer
    from tasks.registry import file_digests

    load_classifier(str(tiny_bert), ["negative", "positive"]).save_pretrained(tmp_path)
    load_tokenizer(str(tiny_bert)).save_pretrained(tmp_path)
    recorded = file_digests(tmp_path)
    assert load_checked_model(tmp_path, "m:1", 32, recorded).labels == ["negative", "positive"]
    config = tmp_path / "config.json"
    original = config.read_text()
    swapped = json.loads(original)
    swapped["id2label"] = {"0": "positive", "1": "negative"}
    config.write_text(json.dumps(swapped))
    (tmp_path / "extra.bin").write_bytes(b"x")
    for expected, problems in [(recorded, ["config.json: checksum differs", "extra.bin: not in the recorded model"]),
                               ({}, ["no checksums recorded"])]:
        with pytest.raises(ModelRefused) as refused:
            load_checked_model(tmp_path, "m:1", 32, expected)
        assert all(problem in str(refused.value) for problem in problems), str(refused.value)
        assert str(refused.value).startswith("m:1: ")


def test_recorded_checksums_come_from_the_registry_before_the_store(tmp_path):
    from tasks.registry import write_record

    registry = tmp_path / "registry.json"
    write_record(registry, {"production": "m:1", "models": {"m:1": {"sha256": {"a": "1"}}}, "history": []})
    store = {"sha256": {"a": "forged"}}
    assert recorded_digests(registry, "m:1", store) == {"a": "1"}
    assert recorded_digests(registry, "m:2", store) == {"a": "forged"}  # not registered yet: the smoke test
    assert recorded_digests(tmp_path / "none.json", "m:2", {}) == {}


def ask(guard, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
    """One request through the service's ASGI guard, in this process: its status and JSON answer."""
    import asyncio

    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [(b"content-type", b"application/json")]}
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_a_service_whose_model_fails_its_checksum_at_start_stays_unhealthy(tiny_bert, tmp_path, monkeypatch):
    """The service's own start, in this process (the BentoML store stubbed): a tampered config.json leaves it serving
    nothing, /healthz and /predict answer 503 naming the file; the intact files start it healthy."""
    import importlib
    from types import SimpleNamespace

    from deploy import service
    from tasks.models import load_classifier, load_tokenizer
    from tasks.registry import file_digests
    from tasks.serving import ModelHolder

    folder = tmp_path / "store" / "m"
    load_classifier(str(tiny_bert), ["negative", "positive"]).save_pretrained(folder)
    load_tokenizer(str(tiny_bert)).save_pretrained(folder)
    recorded = {"sha256": file_digests(folder)}
    stored = SimpleNamespace(path=str(folder), tag="m:1", info=SimpleNamespace(metadata=recorded))
    monkeypatch.setattr(importlib.import_module("bentoml.models"), "get", lambda tag: stored)
    monkeypatch.setenv("REGRAFT_MODEL_TAG", "m:1")  # pinned: no registry to follow
    monkeypatch.setenv("REGRAFT_PREDICTION_LOG", str(tmp_path / "predictions.jsonl"))
    guard = service.RequestGuard(None, CFG)
    config = folder / "config.json"
    original = config.read_text()
    config.write_text(original.replace('"negative"', '"NEGATIVE"'))
    monkeypatch.setattr(service, "HOLDER", ModelHolder())
    service.Classifier.inner()
    status, health = ask(guard, "GET", "/healthz")
    assert status == 503 and health["status"] == "unavailable" and "config.json: checksum differs" in health["error"]
    status, answer = ask(guard, "POST", "/predict", b'{"texts": ["fine"]}')
    assert status == 503 and "no model is loaded: m:1: files in" in answer["error"]
    config.write_text(original)
    monkeypatch.setattr(service, "HOLDER", ModelHolder())
    service.Classifier.inner()
    # No serving precision was checked for this model (nothing recorded): fp32.
    assert ask(guard, "GET", "/healthz") == (200, {"status": "ok", "model_version": "m:1",
                                                   "labels": ["negative", "positive"], "precision": "fp32"})


def test_the_batcher_takes_every_queued_request_at_once_answers_each_its_own_and_refuses_what_waited_too_long():
    import asyncio
    import threading

    from tasks.serving import Batcher, QueuedTooLong

    batches, started, release = [], threading.Event(), threading.Event()

    def predict_batch(items):
        batches.append(list(items))
        if items == ["first"]:  # the model is busy with the first request while the others queue
            started.set()
            release.wait(10)
        if "bad" in items:
            raise ValueError("the model failed")
        if "short" in items:
            return []
        return [item.upper() for item in items]

    async def scenario():
        batcher = Batcher(predict_batch, max_batch_size=4, max_latency_seconds=60)
        try:
            first = asyncio.ensure_future(batcher.submit(["first"]))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            queued = [asyncio.ensure_future(batcher.submit(items)) for items in (["a", "b"], ["c"], ["d", "e"], ["f"])]
            await asyncio.sleep(0)  # each submit queues its request
            release.set()
            answers = await asyncio.wait_for(asyncio.gather(first, *queued), 10)
            failed = [(await asyncio.wait_for(asyncio.gather(batcher.submit(items), return_exceptions=True), 10))[0]
                      for items in (["bad"], ["short"])]  # one at a time: each its own batch
            batcher.max_latency = -1.0  # from now on every request has waited too long when the model gets to it
            late = await asyncio.wait_for(asyncio.gather(batcher.submit(["late"]), return_exceptions=True), 10)
            return answers, failed, late[0]
        finally:
            batcher.close()

    answers, (failed, short), late = asyncio.run(scenario())
    assert answers == [["FIRST"], ["A", "B"], ["C"], ["D", "E"], ["F"]]
    # The four queued requests: as many whole requests as fit 4 texts, then the rest; none waited for a batch to fill.
    assert batches[:3] == [["first"], ["a", "b", "c"], ["d", "e", "f"]]
    assert isinstance(failed, ValueError)  # and the thread went on to the next request
    assert "gave 0 answers to 1 texts" in str(short)
    assert isinstance(late, QueuedTooLong) and "serve.max_latency_ms" in str(late) and ["late"] not in batches


def test_the_batcher_waits_a_moment_for_the_last_batchs_clients_but_never_holds_a_request_after_a_quiet_spell():
    import asyncio
    import time

    from tasks.serving import Batcher

    batches = []

    def predict_batch(items):
        batches.append(list(items))
        time.sleep(0.05)
        return items

    async def scenario():
        batcher = Batcher(predict_batch, max_batch_size=8, max_latency_seconds=60)
        batcher.GATHER_FRACTION = 50  # a window of 2.5 s after each batch of 50 ms: generous on a loaded machine
        try:
            await asyncio.wait_for(batcher.submit(["a", "b", "c"]), 10)
            # Its clients come back one by one, 20 ms apart: one batch, not three (taken once the third is queued).
            returning = [asyncio.ensure_future(batcher.submit(["d"]))]
            for item in ("e", "f"):
                await asyncio.sleep(0.02)
                returning.append(asyncio.ensure_future(batcher.submit([item])))
            await asyncio.wait_for(asyncio.gather(*returning), 10)
            batcher._last_end -= 100  # as if that batch had ended 100 s ago: its window is long past
            started = time.monotonic()
            await asyncio.wait_for(batcher.submit(["g"]), 10)
            return time.monotonic() - started
        finally:
            batcher.close()

    lone_seconds = asyncio.run(scenario())
    assert batches == [["a", "b", "c"], ["d", "e", "f"], ["g"]]
    assert lone_seconds < 1.5  # held, it would have waited the 2.5-s window
