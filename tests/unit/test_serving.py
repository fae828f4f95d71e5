"""Request checks of the service (each bad request a 4xx with a message that names the problem) and the
prediction log."""

from __future__ import annotations

import json

import pytest

from tasks.config import ServeConfig
from tasks.serving import PredictionLog, RequestRejected, parse_predict_request

pytestmark = pytest.mark.unit
CFG = ServeConfig(host="127.0.0.1", port=3000, max_texts=3, max_chars=20, max_body_bytes=200, max_in_flight=4,
                  body_timeout_seconds=5, max_batch_size=8,
                  max_latency_ms=10, workers=1, log_texts="hash", prediction_log="p.jsonl", reload_seconds=1)

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


@pytest.mark.parametrize("body,status,message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_requests_are_rejected_with_a_clear_4xx(body, status, message):
    with pytest.raises(RequestRejected) as rejected:
        parse_predict_request(body, CFG)
    assert rejected.value.status == status
    assert message in rejected.value.message


def test_deeply_nested_json_is_a_400_not_a_crash():
    deep = b'{"texts": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(RequestRejected) as rejected:
        parse_predict_request(deep, CFG.model_copy(update={"max_body_bytes": 1_000_000}))
    assert rejected.value.status == 400 and "nested too deeply" in rejected.value.message


def test_a_good_request_gives_its_texts():
    assert parse_predict_request(b'{"texts": ["good", "bad"]}', CFG) == ["good", "bad"]


@pytest.mark.parametrize("mode", ["hash", "text"])
def test_prediction_log_keeps_the_text_or_only_its_hash(tmp_path, mode):
    log = PredictionLog(tmp_path / "log.jsonl", mode)
    results = [{"label": "positive", "probabilities": {"negative": 0.1, "positive": 0.9}, "model_version": "m:1"}]
    log.append(["great drug"], results)
    row = json.loads((tmp_path / "log.jsonl").read_text())
    assert row["label"] == "positive" and row["confidence"] == 0.9 and row["model_version"] == "m:1" and row["time"]
    assert ("text" in row) is (mode == "text") and ("text_sha256" in row) is (mode == "hash")


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
