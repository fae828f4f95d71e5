"""The BentoML service of regraft: POST /predict, GET /healthz, and BentoML's Prometheus /metrics.

Which model it serves: REGRAFT_MODEL_TAG when set (a Bento's smoke test pins its own model), else the
registry's production model, re-read every serve.reload_seconds so a promotion or rollback switches
models while serving without a failed request. When the registry names a shadow candidate, it is loaded beside
production and predicts every served text off the response path (tasks/serving.py ShadowPredictor); the answers
stay production's. When it names a canary, the canary answers the texts whose hash falls below its fraction and
each model predicts the other's texts off the response path (tasks/serving.py answer_with_canary). Every model is
loaded only when each of its files has the
sha256 recorded for it; one that fails is refused (the current model keeps serving; at start the service
stays unhealthy) and the log says which files differ. Each worker batches its own requests (tasks/serving.py Batcher:
its predict thread takes the requests queued when the model is free). Settings come from params.yaml
(REGRAFT_PARAMS), whose relative paths are read from REGRAFT_PROJECT (default: the working directory).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml.validators import ContentType
from starlette.responses import JSONResponse

from tasks.config import Params, load_params, project_root
from tasks.serving import (Batcher, CanaryRoute, LoadedModel, ModelHolder, ModelRefused, Prediction, PredictionLog,
                           QueuedTooLong, RequestRejected, ShadowPredictor, answer_with_canary, check_content_type,
                           files_state, load_checked_model, parse_predict_request, predict_request_type,
                           recorded_digests, recorded_serving, served_models, serving_precision, serving_workers,
                           split_groups, worker_threads)
from tasks.serving import predict as predict_texts
from tasks.serving import production_tag

logger = logging.getLogger("regraft.service")


def service_params() -> Params:
    return load_params(os.environ.get("REGRAFT_PARAMS", project_root() / "params.yaml"))


# BentoML reads the workers, the address and the request type when the class is defined, so the settings are read here.
SETTINGS = service_params()
WORKERS = serving_workers(SETTINGS.serve)
# One per worker process: the service instance swaps models in it, /healthz reads it.
HOLDER = ModelHolder()


class Traffic:
    """The /predict requests this worker holds (body arriving, queued or being predicted) and when it last held none;
    the request guard counts them on the worker's one event loop, the shadow thread only reads."""

    in_flight = 0
    quiet_since = 0.0
    # Idle is no request for this long: between two batches of a busy worker there are gaps of a millisecond or two
    # (its clients' next requests on their way), which a shadow batch of ~100 ms must not take.
    QUIET_SECONDS = 0.02

    def idle(self) -> bool:
        return self.in_flight == 0 and time.monotonic() - self.quiet_since >= self.QUIET_SECONDS


TRAFFIC = Traffic()
# One per worker too, beside HOLDER's model: its thread starts with a first shadow candidate and predicts only while
# this worker holds no request, so it never takes the CPU (or Python's lock) from an answer. Its log keeps hashes
# only: the texts, when kept, are in the prediction log, under the same prediction_id.
SHADOW = ShadowPredictor(PredictionLog(project_root() / SETTINGS.serve.shadow_log, "hash"), SETTINGS.serve.shadow_queue,
                         idle=TRAFFIC.idle)
Texts = predict_request_type(SETTINGS.serve)
# The response's media type stated up front: without it BentoML derives it from the output's JSON schema, built anew
# for every response (about a third of the event loop's time under load, measured with py-spy).
Predictions = Annotated[list[Prediction], ContentType("application/json")]


class CanaryHolder:
    """The canary a worker routes to (None: production answers everything); swapped as one reference."""

    current: CanaryRoute | None = None


CANARY = CanaryHolder()


class RequestGuard:
    """ASGI middleware in front of BentoML's routes. Answers GET /healthz from the loaded model (BentoML's
    own /healthz only says the process is up), and checks a /predict request (content type, size, JSON, shape,
    limits) before BentoML sees it, so every bad request gets a 4xx that names the problem, never a 500.

    It also bounds what a flood can hold: at most `max_in_flight` /predict requests at once (body still
    arriving or being predicted; more get 429 at once), and each body must arrive within
    `body_timeout_seconds` (408). /healthz is answered before any limit, so it keeps answering."""

    def __init__(self, app, cfg):
        self.app, self.cfg = app, cfg

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").rstrip("/")
        if scope["type"] == "http" and path == "/healthz" and scope["method"] == "GET":
            loaded = HOLDER.current
            if loaded is None:
                return await self.respond(send, 503, {"status": "unavailable", "error": HOLDER.unavailable}
                                          if HOLDER.unavailable else {"status": "loading"})
            health = {"status": "ok", "model_version": loaded.version, "labels": loaded.labels,
                      "precision": loaded.precision}
            shadow, canary = SHADOW.status(), CANARY.current
            if shadow:  # this worker's counts: each worker process predicts its own requests' shadow
                health["shadow"] = {**shadow, "worker": os.getpid()}
            if canary:
                health["canary"] = {"model_version": canary.model.version, "fraction": canary.fraction,
                                    "off_path": {version: SHADOW.counts_of(version)
                                                 for version in (loaded.version, canary.model.version)}}
            return await self.respond(send, 200, health)
        if scope["type"] != "http" or path != "/predict" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            check_content_type([value.decode("latin-1") for name, value in scope.get("headers", ())
                                if name.lower() == b"content-type"])
        except RequestRejected as rejected:
            return await self.reject(send, rejected)
        if HOLDER.current is None:
            return await self.reject(send, RequestRejected(
                503, f"no model is loaded: {HOLDER.unavailable or 'the service is starting'}"))
        if TRAFFIC.in_flight >= self.cfg.max_in_flight:
            return await self.reject(send, RequestRejected(
                429, f"{TRAFFIC.in_flight} requests are in progress, the limit of this worker; try again shortly"))
        TRAFFIC.in_flight += 1  # one event loop per worker: a plain counter is safe
        try:
            return await self.guarded_predict(scope, receive, send)
        finally:
            TRAFFIC.in_flight -= 1
            if TRAFFIC.in_flight == 0:
                TRAFFIC.quiet_since = time.monotonic()

    async def guarded_predict(self, scope, receive, send):
        try:
            async with asyncio.timeout(self.cfg.body_timeout_seconds):
                body = await self.read_body(receive)
        except TimeoutError:
            return await self.reject(send, RequestRejected(
                408, f"the request body did not arrive within {self.cfg.body_timeout_seconds:g} seconds"))
        if body is None:
            return await self.reject(send, RequestRejected(
                413, f"request body is larger than the limit of {self.cfg.max_body_bytes} bytes"))
        try:
            parse_predict_request(body, self.cfg, SETTINGS.ingest.columns.groups)
        except RequestRejected as rejected:
            return await self.reject(send, rejected)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def read_body(self, receive) -> bytes | None:
        """The whole body, or None as soon as it is larger than the limit."""
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.cfg.max_body_bytes:
                return None
        return body

    async def reject(self, send, rejected: RequestRejected) -> None:
        await self.respond(send, rejected.status, {"error": rejected.message})

    @staticmethod
    async def respond(send, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


@bentoml.service(name="regraft", workers=WORKERS, traffic={"timeout": 60},
                 http={"host": SETTINGS.serve.host, "port": SETTINGS.serve.port})
class Classifier:
    def __init__(self) -> None:
        params = service_params()
        root = project_root()
        self.max_length = params.model.max_length
        self.threads = worker_threads(WORKERS)  # the cores shared between the workers: none waits on another's
        self.registry = root / params.paths.registry
        self.pinned = os.environ.get("REGRAFT_MODEL_TAG")
        self.reload_seconds = params.serve.reload_seconds
        self.holder, self.shadow, self.canary = HOLDER, SHADOW, CANARY
        # The package stage's smoke test logs elsewhere, so its requests do not look like traffic.
        log = os.environ.get("REGRAFT_PREDICTION_LOG") or root / params.serve.prediction_log
        self.log = PredictionLog(Path(log), params.serve.log_texts)
        # Requests wait in this worker's queue; its one predict thread takes them in batches (tasks/serving.py).
        self.batcher = Batcher(self.predict_batch, params.serve.max_batch_size, params.serve.max_latency_ms / 1000)
        self.refused: dict[str, tuple] = {}  # each refused model, and the state of its files then
        self.problems: dict[str, str] = {}  # why the shadow candidate or the canary is not loaded, logged once
        self.switch_to(self.pinned or production_tag(self.registry))
        if not self.pinned:
            threading.Thread(target=self.follow_registry, name="registry-watch", daemon=True).start()

    def load_unless_refused(self, tag: str) -> LoadedModel | None:
        """`tag` loaded, its files checked against their recorded sha256; ModelRefused when they fail (the model is
        then checked again only when its files change: None until then)."""
        model = bentoml.models.get(tag)
        folder, version = Path(model.path), str(model.tag)
        state = files_state(folder)
        if self.refused.get(version) == state:
            return None
        expected = recorded_digests(self.registry, version, model.info.metadata)
        precision, why = serving_precision(recorded_serving(self.registry, version, model.info.metadata))
        logger.info("loading model %s from %s, serving it in %s (%d torch threads in each of %d workers): %s", version,
                    folder, precision, self.threads, WORKERS, why)
        try:
            loaded = load_checked_model(folder, version, self.max_length, expected, precision, self.threads)
        except ModelRefused:
            self.refused[version] = state
            raise
        self.refused.pop(version, None)
        return loaded

    def switch_to(self, tag: str) -> bool:
        """Load `tag` and swap it in. A model whose files fail their checksum is refused and logged once (checked
        again only when its files change); whatever is loaded keeps serving, else /healthz says why."""
        try:
            loaded = self.load_unless_refused(tag)
        except ModelRefused as refused:
            serving = self.holder.current
            if serving is None:
                self.holder.unavailable = str(refused)
            logger.error("%s; %s", refused, f"still serving {serving.version}" if serving else "serving nothing")
            return False
        if loaded is None:
            return False
        self.holder.swap(loaded)
        return True

    def load_beside(self, tag: str | None, role: str) -> LoadedModel | None:
        """A shadow candidate or canary loaded beside production, its files checked as production's are; None for
        none, or for one that cannot be loaded (logged once: production is never affected)."""
        from bentoml.exceptions import NotFound

        try:
            loaded = self.load_unless_refused(tag) if tag else None
        except (ModelRefused, NotFound) as problem:
            if str(problem) != self.problems.get(role):
                logger.error("%s %s not loaded: %s; production is not affected", role, tag, problem)
            self.problems[role] = str(problem)
            return None
        self.problems.pop(role, None)
        return loaded

    def shadow_with(self, tag: str | None) -> None:
        """Load the registry's shadow candidate beside production, or end the shadow."""
        current = self.shadow.model
        if tag == (current.version if current else None):
            return
        loaded = self.load_beside(tag, "shadow candidate")
        if loaded is not None or current is not None:
            self.shadow.swap(loaded)
            logger.info("shadow candidate: %s", loaded.version if loaded else "none")

    def canary_with(self, tag: str | None, fraction: float | None) -> None:
        """Route the registry's canary share of the texts to its model, or end the canary."""
        current = self.canary.current
        if (tag, fraction) == ((current.model.version, current.fraction) if current else (None, None)):
            return
        loaded = current.model if current and current.model.version == tag else self.load_beside(tag, "canary")
        if loaded is not None or current is not None:
            self.canary.current = CanaryRoute(loaded, fraction) if loaded is not None else None
            logger.info("canary: %s", f"{tag} answers {fraction:g} of the texts" if loaded else "none")

    def follow_registry(self) -> None:
        """Load the registry's production model, shadow candidate and canary when they change, then swap them in."""
        stop = threading.Event()
        while not stop.wait(self.reload_seconds):
            try:
                served = served_models(self.registry)
                current = self.holder.current
                if (current is None or served.production != current.version) and self.switch_to(served.production):
                    logger.info("now serving %s", served.production)
                self.shadow_with(served.shadow)
                if served.problem and served.problem != self.problems.get("registry"):
                    logger.error("%s; production answers every request", served.problem)
                self.problems["registry"] = served.problem
                self.canary_with(served.canary, served.canary_fraction)
            except Exception:  # keep serving the current model; the next check tries again
                logger.exception("could not switch to the registry's production model")

    @bentoml.api(route="/predict")
    async def predict(self, texts: Texts) -> Predictions:
        """Label, class probabilities and model version for each text (a text may carry its group values, which
        the prediction log keeps for comparisons per group)."""
        try:
            return await self.batcher.submit(texts)
        except QueuedTooLong as late:  # a response of our own: BentoML hides the message of any 5xx it raises
            return JSONResponse({"error": str(late)}, status_code=503)

    def predict_batch(self, texts: list) -> list[Prediction]:
        """The batcher's thread: the texts of every request it took, answered in one pass of the model."""
        loaded, canary = self.holder.current, self.canary.current
        texts, groups = split_groups(texts)
        if canary is not None:  # the canary answers its share; each model predicts the other's texts off the path
            return [Prediction(**result) for result in answer_with_canary(loaded, canary, texts, self.log, self.shadow,
                                                                          groups=groups)]
        results = predict_texts(loaded, texts)
        ids = self.log.append(texts, results, groups=groups)
        self.shadow.submit(texts, ids)  # never waits: the answer is production's alone
        return [Prediction(**result) for result in results]


Classifier.add_asgi_middleware(RequestGuard, cfg=SETTINGS.serve)
