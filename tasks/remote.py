"""The shared remote: where packaged models, Bentos and the registry record live beyond one machine.

A trainer exports each packaged model and its Bento there (archives with their sha256) and every promotion
and rollback writes the registry record there; a serving host with only the code and the remote's
credentials imports the production model from it. The remote is `package.remote` (a directory or
s3://bucket/prefix), else a folder `regraft-models` in the DVC default remote; with neither, models stay on
this machine.

Two hosts may write the record at once. Each write is conditional on the version that was read (S3:
If-Match on the ETag, If-None-Match for the first write; a directory: a file lock and the content's sha256),
so a conflict is retried on the fresh record and no update is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tasks.config import DVC_DIR, Params
from tasks.errors import RegraftError
from tasks.files import sha256_of, write_json

RECORD = "registry.json"
DVC_FOLDER = "regraft-models"  # inside the DVC remote, apart from DVC's own files/ tree
CONFLICT_RETRIES = 20


class RemoteError(RegraftError):
    """The remote cannot be reached or holds something other than what the record says."""


class ConditionalRecord:
    """Read-modify-write of the remote's registry record (and of any small JSON object, such as the project's run
    lease in tasks/lease.py), for remotes that can write conditionally."""

    url: str

    def read_object(self, name: str) -> tuple[dict | None, str | None]:
        """The JSON object `name` and its version (None, None when there is none)."""
        raise NotImplementedError

    def write_object(self, name: str, data: dict, version: str | None) -> bool:
        """Write `name` only if its version is still `version` (None: only if it does not exist); False if not."""
        raise NotImplementedError

    def read_record(self) -> tuple[dict | None, str | None]:
        return self.read_object(RECORD)

    def write_record(self, record: dict, version: str | None) -> bool:
        return self.write_object(RECORD, record, version)

    def update_record(self, mutate: Callable[[dict], None], empty: dict) -> dict:
        """Read the record, apply `mutate` (a function of the record alone, so it can run again), write it back
        only if nobody wrote in between; on a conflict, start again from the fresh record. Without a record
        yet, start from `empty`."""
        for _ in range(CONFLICT_RETRIES):
            record, version = self.read_record()
            record = {**json.loads(json.dumps(empty)), **(record or {})}
            mutate(record)
            if self.write_record(record, version):
                return record
        raise RemoteError(f"{self.url}: the registry record changed {CONFLICT_RETRIES} times while writing; try again")


class DirectoryRemote(ConditionalRecord):
    """A remote on a filesystem path (a local disk or a mounted share)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    def put_file(self, local: Path, key: str) -> None:
        destination = self.root / key
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
        shutil.copyfile(local, staging)
        os.replace(staging, destination)

    def get_file(self, key: str, local: Path) -> None:
        if not (self.root / key).is_file():
            raise RemoteError(f"{self.url}: {key} is missing from the remote")
        shutil.copyfile(self.root / key, local)

    def read_object(self, name: str) -> tuple[dict | None, str | None]:
        path = self.root / name
        if not path.is_file():
            return None, None
        data = path.read_bytes()
        return parse_record(data, f"{self.url}/{name}"), hashlib.sha256(data).hexdigest()

    def write_object(self, name: str, data: dict, version: str | None) -> bool:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.read_object(name)[1] != version:
                return False
            write_json(path, data)
            return True


class S3Remote(ConditionalRecord):
    """A remote in an S3 bucket (or any S3 API: MinIO, moto), through botocore."""

    def __init__(self, url: str, endpoint: str | None = None, region: str | None = None, dvc: dict | None = None):
        import botocore.session

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise RemoteError(f"{url}: no bucket in the S3 URL (s3://bucket/prefix)")
        self.url, self.bucket, self.prefix = url, bucket, prefix.strip("/")
        dvc = dvc or {}  # the DVC remote's own credentials win, as they do for `dvc push`; else AWS_* or a profile
        session = botocore.session.Session(profile=dvc.get("profile"))
        self.client = session.create_client(
            "s3", endpoint_url=endpoint or None, region_name=region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            aws_access_key_id=dvc.get("access_key_id"), aws_secret_access_key=dvc.get("secret_access_key"),
            aws_session_token=dvc.get("session_token"))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @contextlib.contextmanager
    def errors(self, what: str):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            raise RemoteError(f"{self.url}: {what} failed: {exc}") from None

    def put_file(self, local: Path, key: str) -> None:
        with self.errors(f"uploading {key}"), open(local, "rb") as body:
            self.client.put_object(Bucket=self.bucket, Key=self.key(key), Body=body)

    def get_file(self, key: str, local: Path) -> None:
        with self.errors(f"downloading {key}"), open(local, "wb") as out:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(key))["Body"]
            for chunk in iter(lambda: body.read(1 << 20), b""):
                out.write(chunk)

    def read_object(self, name: str) -> tuple[dict | None, str | None]:
        from botocore.exceptions import ClientError

        try:
            with self.errors("reading the registry record" if name == RECORD else f"reading {name}"):
                answer = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
                data = answer["Body"].read()
        except RemoteError as exc:
            if isinstance(exc.__context__, ClientError) and exc.__context__.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None, None
            raise
        return parse_record(data, f"{self.url}/{name}"), answer["ETag"]

    def write_object(self, name: str, data: dict, version: str | None) -> bool:
        from botocore.exceptions import ClientError

        condition = {"IfMatch": version} if version else {"IfNoneMatch": "*"}
        body = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=body,
                                   ContentType="application/json", **condition)
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict") \
                    or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return False  # another host wrote first
            what = "the registry record" if name == RECORD else name
            raise RemoteError(f"{self.url}: writing {what} failed: {exc}") from None
        return True


def parse_record(data: bytes, where: str) -> dict:
    """A JSON object from the remote (someone else's input: checked); the registry record must also look like one."""
    try:
        record = json.loads(data)
    except ValueError as exc:
        raise RemoteError(f"{where}: the object in the remote is not valid JSON ({exc})") from None
    if where.endswith(f"/{RECORD}") and (not isinstance(record, dict) or not isinstance(record.get("models", {}), dict)
                                         or not isinstance(record.get("history", []), list)):
        raise RemoteError(f"{where}: the registry record in the remote is not a registry "
                          "(expected an object with production, models and history)")
    if not isinstance(record, dict):
        raise RemoteError(f"{where}: the object in the remote is not a JSON object")
    return record


def dvc_default_remote(project: Path) -> dict | None:
    """The DVC default remote's settings (url, endpointurl, region, ...), or None without one."""
    if not (project / DVC_DIR).is_dir():
        return None
    try:
        from dvc.repo import Repo
    except ImportError:  # a serving image has no DVC
        raise RemoteError("package.remote is empty and DVC is not installed here to read its default remote: "
                          "set package.remote (s3://bucket/prefix or a directory)") from None

    config = Repo(str(project)).config
    name = config["core"].get("remote")
    return dict(config["remote"][name]) if name and name in config["remote"] else None


def open_remote(url: str, project: Path) -> DirectoryRemote | S3Remote | None:
    """The remote named by `package.remote`, else the DVC default remote's `regraft-models` folder, else None."""
    endpoint = region = dvc = None
    if not url:
        dvc = dvc_default_remote(project)
        if dvc is None:
            return None
        url = dvc["url"].rstrip("/") + "/" + DVC_FOLDER
        endpoint, region = dvc.get("endpointurl"), dvc.get("region")
    if url.startswith("s3://"):
        return S3Remote(url, endpoint or os.environ.get("AWS_ENDPOINT_URL"), region, dvc)
    if "://" in url and not url.startswith("file://"):
        raise RemoteError(f"{url}: regraft shares models through a directory or s3:// only")
    return DirectoryRemote((project / url.removeprefix("file://")).resolve())


def model_remote(params: Params) -> DirectoryRemote | S3Remote | None:
    """The shared remote of the project in the working directory (package.remote, else the DVC default remote)."""
    return open_remote(params.package.remote, Path.cwd())


def upload_archive(remote, local: Path, key: str) -> dict:
    """Put one archive in the remote; its key and sha256 go into the registry record."""
    remote.put_file(local, key)
    return {"key": key, "sha256": sha256_of(local), "bytes": local.stat().st_size}


def download_archive(remote, archive: dict, folder: Path) -> Path:
    """Fetch one archive into `folder` and check its sha256 against the record."""
    local = Path(folder) / Path(archive["key"]).name
    remote.get_file(archive["key"], local)
    if sha256_of(local) != archive["sha256"]:
        raise RemoteError(f"{remote.url}/{archive['key']}: checksum differs from the registry record; not imported")
    return local


def scratch_folder() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="regraft-remote-")
