"""What the BentoML service does, kept out of deploy/ so it is tested like every other task:
request checks with clear 4xx messages, loading a model only when its files are the ones recorded for it,
prediction with the training code's tokeniser and label mapping, the prediction log, and the model holder
that swaps models without dropping a request."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tasks.config import ServeConfig
from tasks.errors import RegraftError
from tasks.files import text_sha256

logger = logging.getLogger("regraft.service")


class RequestRejected(Exception):
    """A request the service refuses, with the HTTP status and a message that names the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Prediction(BaseModel):
    """One text's answer in POST /predict's response, as its OpenAPI schema shows it."""

    model_config = ConfigDict(extra="forbid")
    label: str = Field(description="The most probable label, one of the model's labels.")
    probabilities: dict[str, float] = Field(description="The calibrated probability of every label (they sum to 1).")
    model_version: str = Field(description="The BentoML tag of the model that answered.")


MAX_GROUP_VALUE_CHARS = 200


class GroupedText(BaseModel):
    """A text with the values of the groups it belongs to (columns of ingest.columns.groups), so comparisons of the
    served traffic (a shadow's or canary's candidate against production) can be given per group."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    groups: dict[str, str] = Field(description="Group column -> this text's value, e.g. {\"condition\": \"Acne\"}: "
                                               "columns of the project's ingest.columns.groups.")


def predict_request_type(cfg: ServeConfig):
    """The `texts` argument of POST /predict typed with the service's limits, so its OpenAPI schema states them
    (the request guard checks them first, with a message naming the problem). Each item is a text, or a text with
    its group values ({"text": ..., "groups": {...}})."""
    from typing import Annotated

    text = Annotated[str, Field(min_length=1, max_length=cfg.max_chars)]
    return Annotated[list[text | GroupedText], Field(
        min_length=1, max_length=cfg.max_texts,
        description=f"1 to {cfg.max_texts} non-empty texts of at most {cfg.max_chars} characters, each a string or "
                    '{"text": "...", "groups": {"<group column>": "<value>"}}')]


def split_groups(items: list) -> tuple[list[str], list[dict[str, str] | None]]:
    """The texts of a checked /predict request and each one's group values (None where the item is a bare text)."""
    texts, groups = [], []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            groups.append(None)
        else:  # GroupedText (BentoML's parse) or its dict (the request guard's)
            item = item if isinstance(item, dict) else item.model_dump()
            texts.append(item["text"])
            groups.append(item["groups"])
    return texts, groups


JSON_MEDIA_TYPE = "application/json"


def check_content_type(values: list[str]) -> None:
    """POST /predict takes JSON only: BentoML would parse another type its own way (multipart or form: a 500 on
    odd input; pickle), so it is refused first. `values` are the request's Content-Type headers; none is read as
    JSON, as BentoML does."""
    for value in values:
        media_type = value.split(";", 1)[0].strip().lower()
        if media_type != JSON_MEDIA_TYPE:
            raise RequestRejected(415, f"Content-Type {media_type or '(empty)'!r} is not accepted; send the body as "
                                       f'{JSON_MEDIA_TYPE}: {{"texts": ["...", ...]}}')


def parse_predict_request(body: bytes, cfg: ServeConfig, group_columns: list[str] = ()) -> list[str]:
    """The texts of a `{"texts": [...]}` body, or RequestRejected saying what is wrong and where. An item may carry
    its group values, `{"text": "...", "groups": {column: value}}`, columns among `group_columns`."""
    if len(body) > cfg.max_body_bytes:
        raise RequestRejected(413, f"request body is {len(body)} bytes; the limit is {cfg.max_body_bytes}")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestRejected(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # the decoder recurses once per nesting level
        raise RequestRejected(400, "request body is nested too deeply; expected {\"texts\": [\"...\", ...]}") from None
    if not isinstance(payload, dict) or "texts" not in payload:
        raise RequestRejected(422, 'expected a JSON object {"texts": ["...", ...]}')
    extra = sorted(set(payload) - {"texts"})
    if extra:
        raise RequestRejected(422, f"unknown field(s) {extra}; the body has one field, texts")
    texts = payload["texts"]
    if not isinstance(texts, list):
        raise RequestRejected(422, f"texts must be a list of strings, not {type(texts).__name__}")
    if not texts:
        raise RequestRejected(422, "texts is empty; send at least one text")
    if len(texts) > cfg.max_texts:
        raise RequestRejected(413, f"{len(texts)} texts in one request; the limit is {cfg.max_texts}")
    texts = [check_grouped_text(item, i, group_columns) if isinstance(item, dict) else item
             for i, item in enumerate(texts)]
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestRejected(422, f"texts[{i}] is {type(text).__name__}, not a string or "
                                       '{"text": ..., "groups": {...}}')
        if not text.strip():
            raise RequestRejected(422, f"texts[{i}] is empty")
        if len(text) > cfg.max_chars:
            raise RequestRejected(413, f"texts[{i}] has {len(text)} characters; the limit is {cfg.max_chars}")
    return texts


def check_grouped_text(item: dict, i: int, group_columns: list[str]) -> str:
    """The text of a `{"text": ..., "groups": {...}}` item once its groups are checked; RequestRejected otherwise."""
    extra = sorted(set(item) - {"text", "groups"})
    if extra or "text" not in item or "groups" not in item:
        raise RequestRejected(422, f"texts[{i}] is an object: it needs exactly the fields text and groups"
                                   + (f" (unknown: {extra})" if extra else ""))
    groups = item["groups"]
    if not isinstance(groups, dict):
        raise RequestRejected(422, f"texts[{i}].groups must be an object of group column -> value, not "
                                   f"{type(groups).__name__}")
    unknown = sorted(set(groups) - set(group_columns))
    if unknown:
        raise RequestRejected(422, f"texts[{i}].groups names {unknown}, not group columns of this project "
                                   f"(ingest.columns.groups: {list(group_columns) or 'none'})")
    for column, value in groups.items():
        if not isinstance(value, str) or not value.strip():
            raise RequestRejected(422, f"texts[{i}].groups[{column!r}] must be a non-empty string")
        if not value.isprintable():
            raise RequestRejected(422, f"texts[{i}].groups[{column!r}] holds a control character (a line break?)")
        if len(value) > MAX_GROUP_VALUE_CHARS:
            raise RequestRejected(413, f"texts[{i}].groups[{column!r}] has {len(value)} characters; the limit is "
                                       f"{MAX_GROUP_VALUE_CHARS}")
    return item["text"]


@dataclass(frozen=True)
class LoadedModel:
    """A classifier ready to answer, and the version it answers as."""

    version: str
    model: object
    tokenizer: object
    labels: list[str]
    max_length: int
    precision: str = "fp32"  # what it computes in: fp32, or a checked variant (tasks/variants.py)
    threads: int = 0  # torch threads it computes with on a CPU (0: every core this process may use)


class ModelRefused(RegraftError):
    """A model whose files are not the ones recorded when it was packaged, or that names a head regraft cannot
    compute: it is not served."""


def recorded_digests(registry: Path, tag: str, metadata: dict) -> dict[str, str]:
    """The sha256 of each of a model's files as recorded at packaging: the registry record's, else (a model not
    registered yet, which the package stage's smoke test serves) the BentoML store's metadata."""
    from tasks.registry import read_record

    return (read_record(registry)["models"].get(tag) or {}).get("sha256") or metadata.get("sha256") or {}


def recorded_serving(registry: Path, tag: str, metadata: dict) -> dict:
    """The serving precision chosen and checked for a model at packaging (tasks/variants.py), as recorded: the
    registry record's, else the BentoML store's metadata; {} for a model packaged before variants were checked."""
    from tasks.registry import read_record

    recorded = (read_record(registry)["models"].get(tag) or {}).get("serving") or metadata.get("serving") or {}
    return recorded if isinstance(recorded, dict) else {}


def serving_precision(recorded: dict) -> tuple[str, str]:
    """What this host serves a model in: its checked bf16 variant where bf16 measures faster on this machine too, else
    fp32; with the reason. Nothing checked, or a variant that is never served (int8): fp32."""
    from tasks.devices import choose_runtime

    chosen = recorded.get("precision") or "fp32"
    if chosen == "fp32":
        return "fp32", recorded.get("reason") or "no reduced-precision variant was checked for this model"
    if chosen != "bf16":  # int8 (answers that depend on the batch: tasks/variants.py) or anything else: never served
        return "fp32", f"{chosen!r} is never served (only a checked bf16 variant is)"
    runtime = choose_runtime()
    if runtime.precision == "bf16":
        return chosen, f"checked at packaging: {recorded.get('reason')}"
    return "fp32", f"the checked variant {chosen} does not pay on this machine ({runtime.reason})"


MAX_AUTO_WORKERS = 8


def serving_workers(cfg: ServeConfig) -> int:
    """Worker processes of the service: serve.workers, or for auto one per CPU core this process may use (each
    computes on one core: threads of one process lose to Python's own work between batches and to each other, while
    processes do not), at most MAX_AUTO_WORKERS, and one on a GPU (a process owns the device)."""
    if cfg.workers != "auto":
        return cfg.workers
    import torch

    from tasks.devices import usable_cores

    # Each worker holds its own copy of every model it serves (production, shadow, canary): a bound on memory.
    return 1 if torch.cuda.is_available() else min(usable_cores(), MAX_AUTO_WORKERS)


def worker_threads(workers: int) -> int:
    """torch threads for each of `workers` worker processes: the cores (or OMP_NUM_THREADS) shared between them."""
    from tasks.devices import default_threads

    return max(1, default_threads() // workers)


def load_checked_model(folder: Path, version: str, max_length: int, expected: dict[str, str],
                       precision: str = "fp32", threads: int = 0) -> LoadedModel:
    """Load a model only when every file has its recorded sha256, so files changed after packaging (a swapped
    label mapping, other weights) are never served; ModelRefused names the files that differ."""
    from tasks.registry import verify_files

    problems = verify_files(folder, expected) if expected else ["no checksums recorded"]
    if problems:
        raise ModelRefused(f"{version}: files in {folder} fail their checksum, not loaded: " + "; ".join(problems[:5]))
    return load_model(folder, version, max_length, precision, threads)


def files_state(folder: Path) -> tuple:
    """Name, size and modification time of every file under a model folder: the service checks a refused model
    again only when this changes, instead of hashing its files on every poll of the registry."""
    files = sorted(path for path in Path(folder).rglob("*") if path.is_file())
    return tuple((str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files)


def load_model(folder: Path, version: str, max_length: int, precision: str = "fp32", threads: int = 0) -> LoadedModel:
    """Load a packaged HF model directory; its label mapping is the one saved at training time. `precision` int8:
    its Linear layers dynamically quantized (torch's quantize_dynamic); bf16: its Linear layers stored in bf16, computed
    under bf16 autocast; fp32: on oneDNN where this machine measured it faster (tasks/models.py OneDnnLinear)."""
    from tasks.devices import choose_runtime
    from tasks.models import (cast_linear_layers_to_bf16, check_head_input, compute_fp32_linears_on_onednn,
                              load_classifier, load_tokenizer, with_companion)

    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    labels = [config["id2label"][key] for key in sorted(config["id2label"], key=int)]
    # Inference only, and without touching the process's grad mode: predict_proba runs under torch.no_grad(),
    # while a global torch.set_grad_enabled(False) here broke training later in the same process (a test worker).
    model = load_classifier(folder, labels).eval()
    try:
        check_head_input(model, f"{version}: {folder}")
    except RegraftError as exc:
        raise ModelRefused(str(exc)) from None
    if precision == "bf16":
        cast_linear_layers_to_bf16(model)  # the same answers as autocast from fp32, without its cast on every pass
    if precision == "fp32":
        compute_fp32_linears_on_onednn(model, choose_runtime("fp32", threads=threads))
    if precision == "int8":
        import warnings

        import torch

        with warnings.catch_warnings():  # torch 2.13 announces quantized tensors' move to torchao; they work here
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated", category=UserWarning)
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return LoadedModel(version, with_companion(model, folder), load_tokenizer(folder), labels, max_length, precision,
                       threads)


def predict_probabilities(loaded: LoadedModel, texts: list[str], runtime=None):
    """(texts, classes) calibrated probabilities, computed in the model's precision (int8 runs in fp32 otherwise)."""
    from tasks.devices import choose_runtime
    from tasks.models import predict_proba

    import dataclasses

    if runtime is None:
        runtime = choose_runtime("bf16" if loaded.precision == "bf16" else "fp32", threads=loaded.threads)
        if loaded.precision == "int8" and runtime.device.type != "cpu":  # quantized kernels run on the CPU only
            import torch

            runtime = dataclasses.replace(runtime, device=torch.device("cpu"))
    elif loaded.precision == "bf16" and runtime.precision != "bf16":
        # Its Linear layers are stored in bf16: it computes under bf16 autocast whatever is asked.
        runtime = dataclasses.replace(runtime, precision="bf16")
    return predict_proba(loaded.model, loaded.tokenizer, texts, loaded.max_length, runtime=runtime).numpy()


def predict(loaded: LoadedModel, texts: list[str], runtime=None) -> list[dict]:
    """Label, class probabilities and model version per text."""
    proba = predict_probabilities(loaded, texts, runtime)
    return [{"label": loaded.labels[int(row.argmax())],
             "probabilities": {label: round(float(p), 6) for label, p in zip(loaded.labels, row)},
             "model_version": loaded.version} for row in proba]


class ModelHolder:
    """The current model behind one reference: a swap replaces the reference only after the new model
    has loaded, so requests in flight finish on the old model and none fails."""

    def __init__(self):
        self._current: LoadedModel | None = None
        self._lock = threading.Lock()
        # Why the service serves nothing (its first model was refused), for /healthz and /predict to say.
        self.unavailable: str | None = None

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def swap(self, loaded: LoadedModel) -> None:
        with self._lock:
            self._current = loaded
            self.unavailable = None


class QueuedTooLong(Exception):
    """A request that waited in a worker's queue longer than serve.max_latency_ms: refused (HTTP 503), not predicted."""


@dataclass(eq=False)
class QueuedRequest:
    items: list
    future: object  # an asyncio.Future of the event loop that waits for it
    loop: object
    queued_at: float


class Batcher:
    """One worker's /predict requests batched for its one predict thread. When the model is free, the thread takes
    every request queued (whole requests, at most max_batch_size items unless a single request is larger), after
    waiting for that batch's clients to come back until at most a quarter of its time after it ended; nothing polls,
    and a request never waits for a full batch: under load each batch is what arrived while the last one computed.
    (BentoML's adaptive batching, used before, held requests back while a worker's queue was short of a full batch
    and polled every millisecond: measured 0.80 against 0.85 of the model's in-process limit with that wait
    removed.) A request that waited longer than `max_latency_seconds` is refused with QueuedTooLong.
    `predict_batch` maps a list of items to one answer per item; its exception reaches every request of the batch,
    and the thread goes on to the next."""

    GATHER_FRACTION = 0.25

    def __init__(self, predict_batch, max_batch_size: int, max_latency_seconds: float):
        self.predict_batch, self.max_batch_size, self.max_latency = predict_batch, max_batch_size, max_latency_seconds
        self._queue: list[QueuedRequest] = []
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        # The last batch's texts, the seconds it took and when it ended (0 texts after a failed batch).
        self._last_size, self._last_seconds, self._last_end = 0, 0.0, 0.0

    async def submit(self, items: list) -> list:
        """The answers to `items`, once a batch holding them has been predicted."""
        import asyncio

        loop = asyncio.get_running_loop()
        request = QueuedRequest(items, loop.create_future(), loop, time.monotonic())
        with self._ready:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._thread is None or not self._thread.is_alive():  # started by the first request: none at import
                self._thread = threading.Thread(target=self._run, name="predict", daemon=True)
                self._thread.start()
            self._queue.append(request)
            self._ready.notify()
        return await request.future

    def close(self) -> None:
        """Stop the thread once the requests queued now are answered."""
        with self._ready:
            self._closed = True
            self._ready.notify()

    def _take(self) -> list[QueuedRequest] | None:
        """The next batch: queued requests in order, as many as fit max_batch_size items (at least one); None once
        closed and drained."""
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            # The clients the last batch answered are on their way back: wait a moment for them, so one batch is not
            # split into a small one and a large one (without it, batches of 1 and 7 alternated at 8 clients a
            # worker, each pass paying its fixed cost, and the event loop's work for the 7 competing with the pass of
            # 1). Only until the last batch's size is queued again, and until GATHER_FRACTION of that batch's time
            # after it ended: a request arriving later (after a quiet spell) or alone at low load is never held.
            # Measured at 16 clients on 2 cores: 73.4, 76.4, 78.1 req/s against 68.1, 66.7, 76.7 without, in turns.
            deadline = self._last_end + self.GATHER_FRACTION * self._last_seconds
            while (sum(len(request.items) for request in self._queue) < min(self._last_size, self.max_batch_size)
                   and not self._closed and (remaining := deadline - time.monotonic()) > 0):
                self._ready.wait(remaining)
            size = taken = 0
            for request in self._queue:
                if taken and size + len(request.items) > self.max_batch_size:
                    break
                size, taken = size + len(request.items), taken + 1
            batch, self._queue = self._queue[:taken], self._queue[taken:]
        return batch or None

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            now, ready = time.monotonic(), []
            for request in batch:
                if request.future.cancelled():  # its client is gone: not predicted
                    continue
                if now - request.queued_at > self.max_latency:
                    waited = now - request.queued_at
                    logger.warning("refused a request that waited %.0f ms for the model (serve.max_latency_ms %g)",
                                   waited * 1000, self.max_latency * 1000)
                    self._settle(request, error=QueuedTooLong(
                        f"the request waited {waited * 1000:.0f} ms for the model, longer than serve.max_latency_ms "
                        f"({self.max_latency * 1000:g} ms): the service is overloaded, try again shortly"))
                else:
                    ready.append(request)
            if ready:
                self._answer(ready)

    def _answer(self, batch: list[QueuedRequest]) -> None:
        items = [item for request in batch for item in request.items]
        started = time.monotonic()
        try:
            answers = self.predict_batch(items)
            if len(answers) != len(items):
                raise RuntimeError(f"the model gave {len(answers)} answers to {len(items)} texts")
        except BaseException as error:  # every request of the batch fails; the thread serves the next one
            self._last_size, self._last_seconds, self._last_end = 0, 0.0, 0.0  # nothing to wait for after it
            logger.exception("prediction failed for a batch of %d requests", len(batch))
            for request in batch:
                self._settle(request, error=error if isinstance(error, Exception) else RuntimeError(repr(error)))
            return
        start = 0
        for request in batch:
            self._settle(request, answers[start:start + len(request.items)])
            start += len(request.items)
        ended = time.monotonic()
        self._last_size, self._last_seconds, self._last_end = len(items), ended - started, ended

    @staticmethod
    def _settle(request: QueuedRequest, answers: list | None = None, error: Exception | None = None) -> None:
        """Hand the answers (or the error) to the request's event loop; a request cancelled meanwhile is skipped."""

        def settle():
            if request.future.done():
                return
            if error is not None:
                request.future.set_exception(error)
            else:
                request.future.set_result(answers)

        try:
            request.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # its event loop has closed (the worker is stopping): nobody waits for the answer
            pass


class PredictionLog:
    """Appends one JSON line per prediction: time, prediction id, text or its sha256 (serve.log_texts), label,
    confidence, probabilities, model version. The file is later read as target data by shift monitoring; the
    shadow candidate's log gives each of its rows the id of production's row for the same text."""

    def __init__(self, path: Path, log_texts: str):
        self.path = Path(path)
        self.log_texts = log_texts
        self._lock = threading.Lock()

    def append(self, texts: list[str], results: list[dict], ids: list[str] | None = None,
               groups: list[dict | None] | None = None) -> list[str]:
        """Log one batch; new prediction ids unless given (a shadow's rows take production's), each text's group
        values where the request gave them. Returns the ids."""
        at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        ids = ids or [uuid.uuid4().hex for _ in texts]
        lines = []
        for text, result, prediction_id, text_groups in zip(texts, results, ids, groups or [None] * len(texts)):
            row = {"time": at, "prediction_id": prediction_id, "label": result["label"],
                   "confidence": max(result["probabilities"].values()), "probabilities": result["probabilities"],
                   "model_version": result["model_version"]}
            if self.log_texts == "text":
                row["text"] = text
            else:
                row["text_sha256"] = text_sha256(text)
            if text_groups:
                row["groups"] = text_groups
            lines.append(json.dumps(row, ensure_ascii=False))
        payload = ("\n".join(lines) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Served texts are the owner's alone whatever umask the service was started with.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:  # one write per batch: the service's worker processes append to the same file, lines never interleave
                written = os.write(fd, payload)
                while written < len(payload):
                    written += os.write(fd, payload[written:])
            finally:
                os.close(fd)
        return ids


SHADOW_NICENESS = 19


def yield_the_cpu() -> None:
    """Give this thread (and the torch threads it starts, which inherit it) the lowest CPU priority, so that the shadow
    candidate predicts on what production leaves idle: under load its queue fills and batches are shed, rather than
    production's answers waiting. Linux scheduling is per thread; elsewhere this does nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICENESS)
    except (AttributeError, OSError):
        pass


class ShadowPredictor:
    """The shadow candidate beside the production model: it predicts the texts production answered, off the
    response path. `submit` only enqueues (a bounded queue, never waited on: a batch that finds it full is shed and
    counted); one background thread predicts and logs, starting a batch only when `idle()` says production has
    nothing to answer (a shadow batch started under load would slow production's answers: its thread holds Python's
    lock between torch calls whatever its CPU priority). Counts are per candidate version."""

    IDLE_POLL_SECONDS = 0.005
    CHUNK_TEXTS = 4

    def __init__(self, log: PredictionLog, capacity: int, idle=lambda: True):
        self.log = log
        self.idle = idle
        self.model: LoadedModel | None = None
        self.counts: dict[str, dict[str, int]] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def swap(self, loaded: LoadedModel | None) -> None:
        """Shadow with `loaded` from now on (None: no shadow); batches already queued finish on the model they
        were queued for."""
        if loaded is not None and self._worker is None:
            self.start()
        self.model = loaded

    def start(self) -> None:
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self.work, name="shadow-predictor", daemon=True)
                self._worker.start()

    def submit(self, texts: list[str], ids: list[str], model: LoadedModel | None = None) -> bool:
        """Queue a served batch for the shadow candidate (or for `model`: a canary's texts for production, and the
        other way round); False when there is none or the batch was shed."""
        model = model or self.model
        if model is None:
            return False
        if self._worker is None:
            self.start()
        try:
            self._queue.put_nowait((model, texts, ids))
        except queue.Full:
            self.count(model.version, "shed", len(texts))
            return False
        return True

    def work(self) -> None:
        yield_the_cpu()
        while True:
            model, texts, ids = self._queue.get()
            try:
                # A few texts at a time, each chunk only while production is idle: a request arriving meanwhile
                # waits for one chunk at most (tens of ms), not for the whole batch.
                for start in range(0, len(texts), self.CHUNK_TEXTS):
                    while not self.idle():  # what arrives meanwhile waits in the bounded queue, or is shed
                        time.sleep(self.IDLE_POLL_SECONDS)
                    chunk = slice(start, start + self.CHUNK_TEXTS)
                    self.predict_chunk(model, texts[chunk], ids[chunk])
            finally:
                self._queue.task_done()

    def predict_chunk(self, model: LoadedModel, texts: list[str], ids: list[str]) -> None:
        try:
            self.log.append(texts, predict(model, texts), ids)
            self.count(model.version, "predicted", len(texts))
        except Exception:  # a failing candidate must not stop the worker; production is not affected
            logger.exception("the shadow candidate %s failed on %d texts", model.version, len(texts))
            self.count(model.version, "failed", len(texts))

    def count(self, version: str, outcome: str, texts: int) -> None:
        with self._lock:
            counts = self.counts.setdefault(version, {"predicted": 0, "shed": 0, "failed": 0})
            counts[outcome] += texts

    def status(self) -> dict | None:
        """The shadow candidate and its counts of texts (predicted, shed, failed) and queued batches, or None."""
        model = self.model
        if model is None:
            return None
        with self._lock:
            counts = dict(self.counts.get(model.version, {"predicted": 0, "shed": 0, "failed": 0}))
        return {"model_version": model.version, **counts, "queued_batches": self._queue.qsize()}


    def counts_of(self, version: str) -> dict[str, int]:
        with self._lock:
            return dict(self.counts.get(version, {"predicted": 0, "shed": 0, "failed": 0}))


@dataclass(frozen=True)
class CanaryRoute:
    """A canary being served: the model that answers `fraction` of the texts."""

    model: LoadedModel
    fraction: float


def canary_share(text: str) -> float:
    """Where a text falls in [0, 1): from its sha256, so the same text goes to the same model on every host and at
    every request while the canary runs (a request carries no id that every client would send), and texts spread
    evenly over the interval."""
    return int(text_sha256(text)[:15], 16) / 16 ** 15


def answer_with_canary(production: LoadedModel, route: CanaryRoute, texts: list[str], log: PredictionLog,
                       off_path: ShadowPredictor, runtime=None, groups: list[dict | None] | None = None) -> list[dict]:
    """Answer each text with the canary when its share falls below the canary's fraction, else with production; log
    every answer; then queue each text for the model that did not answer it, off the response path (shed under load,
    never waited for), so both models' predictions on the same texts can be compared (tasks/shadow.py)."""
    to_canary = [canary_share(text) < route.fraction for text in texts]
    results: list[dict] = [{} for _ in texts]
    for model, chosen in ((route.model, True), (production, False)):
        rows = [i for i, flag in enumerate(to_canary) if flag is chosen]
        if rows:
            for i, result in zip(rows, predict(model, [texts[i] for i in rows], runtime)):
                results[i] = result
    ids = log.append(texts, results, groups=groups)
    for model, chosen in ((production, True), (route.model, False)):
        rows = [i for i, flag in enumerate(to_canary) if flag is chosen]
        if rows:
            off_path.submit([texts[i] for i in rows], [ids[i] for i in rows], model=model)
    return results


@dataclass(frozen=True)
class ServedModels:
    """What the registry asks a serving host to run: production, and a shadow candidate or a canary beside it."""

    production: str
    shadow: str | None
    canary: str | None
    canary_fraction: float | None
    problem: str | None = None  # a canary entry that is not one: production answers everything, and this says why


def served_models(registry: Path) -> ServedModels:
    """The production model, shadow candidate and canary the registry names, from one read of the record."""
    from tasks.registry import RegistryError, canary_of, read_record, shadow_of

    record = read_record(registry)
    if not record.get("production"):
        raise RegraftError(f"{registry}: no production model yet; promote one with `regraft promote TAG`")
    try:
        canary, problem = canary_of(record) or {}, None
    except RegistryError as exc:
        canary, problem = {}, str(exc)
    return ServedModels(record["production"], shadow_of(record), canary.get("tag"), canary.get("fraction"), problem)


def production_tag(registry: Path) -> str:
    """The tag the registry names as production; a clear error when there is none."""
    return served_models(registry).production
