"""The project a `regraft` command works on and the environment it runs in: files private to their owner, telemetry
off, and the Prefect API it reports to (the configured one, this project's running `regraft ui`, else a temporary
local one kept in the project)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "BENTOML_DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def find_project(start: Path) -> Path:
    """The nearest folder at or above `start` that holds dvc.yaml and params.yaml."""
    for folder in [start, *start.parents]:
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    from tasks.errors import ConfigError

    raise ConfigError(f"no regraft project (dvc.yaml + params.yaml) at or above {start}")


def params_value(project: Path, section: str, key: str, default: str) -> str:
    """One value of params.yaml, read leniently: a broken params.yaml is reported later, by the command."""
    try:
        value = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))[section][key]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return default
    return value if isinstance(value, str) else default


def state_dir(project: Path) -> Path:
    return project / params_value(project, "paths", "state", ".regraft")


def make_private(project: Path) -> None:
    """This process and all it starts (DVC, Prefect's server and workers, `bentoml serve`) create files for
    the owner alone; what an older version left readable (the state folder with Prefect's database, the
    reports, the prediction log) is made private too."""
    from tasks.files import PRIVATE_UMASK, keep_private

    os.umask(PRIVATE_UMASK)
    named = [state_dir(project), project / params_value(project, "paths", "reports", "reports"),
             project / params_value(project, "serve", "prediction_log", ".regraft/predictions.jsonl")]
    # params.yaml is not validated yet: never touch a path it names outside the project.
    root = project.resolve()
    keep_private([path for path in named if root in path.resolve().parents])


def prepare_environment(project: Path, command: str) -> None:
    """Telemetry off; runs report to the configured Prefect API, else to this project's `regraft ui` when it
    is up, else to a temporary local API whose state is kept in the project."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    if "PREFECT_API_URL" not in os.environ and command == "run":
        join_running_ui(project)
    if "PREFECT_API_URL" not in os.environ:
        home = Path(os.environ.setdefault("PREFECT_HOME", str(state_dir(project) / "prefect")))
        # Prefect creates only the last folder of its home itself.
        home.mkdir(parents=True, exist_ok=True)
        # The first start migrates a new SQLite database; on a busy 2-core machine that can take
        # longer than Prefect's default 20 s.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def start_local_api() -> None:
    """Start this process's temporary Prefect API now, one process of the project at a time. Its first start
    creates the SQLite database in PREFECT_HOME and registers Prefect's block types: two first runs at once
    would both create its tables (a server-startup traceback, `table artifact already exists`). The second
    waits here, then finds the database made; the flow run that follows reuses the started server."""
    import fcntl

    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / "server-start.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel drops it if this process dies while starting
        SubprocessASGIServer().start()
    finally:
        os.close(fd)


def ui_home(project: Path) -> Path:
    """The state of `regraft ui`'s Prefect server: its database, credential file and, while it runs, its API
    address (`api-url`) for the project's other commands to find it."""
    return state_dir(project) / "prefect-server"


def ui_address_file(project: Path) -> Path:
    return ui_home(project) / "api-url"


def api_status(api: str, credential: str, timeout: float) -> int | str:
    """The HTTP status of a Prefect API's /health with `user:password`, or why it did not answer."""
    import httpx

    user, _, password = credential.partition(":")
    try:
        return httpx.get(f"{api.rstrip('/')}/health", auth=(user, password) if user else None, timeout=timeout).status_code
    except httpx.HTTPError as exc:
        return str(exc) or type(exc).__name__


def join_running_ui(project: Path) -> None:
    """Point Prefect at this project's `regraft ui` when it answers, so runs started from the terminal (and
    `make demo`) appear in the same UI as the scheduled ones."""
    address, auth = ui_address_file(project), ui_home(project) / "auth"
    try:
        api = address.read_text(encoding="utf-8").strip()
        credential = os.environ.get("PREFECT_SERVER_API_AUTH_STRING") or auth.read_text(encoding="utf-8").strip()
    except OSError:
        return
    if api_status(api, credential, timeout=3) == 200:
        os.environ["PREFECT_API_URL"], os.environ["PREFECT_API_AUTH_STRING"] = api, credential
        print(f"reporting to the Prefect server of `regraft ui` at {api.removesuffix('/api')}", flush=True)
