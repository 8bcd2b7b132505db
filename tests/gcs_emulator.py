"""A real GCS endpoint for tests: gcp-storage-emulator on 127.0.0.1, in memory, one per session.

    from gcs_emulator import gcs_bucket, gcs_server  # noqa: F401  (pytest fixtures)

    def test_x(gcs_bucket):          # 'gs://<fresh bucket>'; os.environ points every client at it
        ...

The environment it sets reaches subprocesses that copy os.environ (the trainer tests do):
gcsfs reads STORAGE_EMULATOR_HOST and, through fsspec's config, token 'anon'; TensorStore (orbax's
GCS driver) reads TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING. gcsfs's default
filesystem first asks the Storage Control gRPC API for the bucket's layout, which the emulator
does not serve (a 60 s timeout per bucket), so the plain one is used.

The emulator is started through `python tests/gcs_emulator.py start ...`: its own `start` plus the
two things of the GCS JSON API that TensorStore relies on and it lacks (`serve`).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from http import HTTPStatus

import pytest

HOST = "127.0.0.1"  # loopback only
START_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_for_port(proc: subprocess.Popen, port: int, timeout: float, log: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log) as f:
                raise RuntimeError(f"gcp_storage_emulator exited with {proc.returncode}: {f.read()[-2000:]}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"gcp_storage_emulator did not answer on {HOST}:{port} within {timeout:.0f} s")


def emulator_env(port: int) -> dict:
    """The variables that point gcsfs and TensorStore at the emulator, without credentials."""
    url = f"http://{HOST}:{port}"
    return {"STORAGE_EMULATOR_HOST": url, "FSSPEC_GCS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """The emulator's environment (dict); it runs, and os.environ carries it, for the session."""
    import fsspec
    import gcsfs.core

    port = _free_port()
    # A file, not a pipe: the server logs a traceback for every client that hangs up early (a
    # killed run), and a full pipe would stop it.
    log = str(tmp_path_factory.mktemp("gcs_emulator") / "server.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "start", "--host", HOST,
                                 "--port", str(port), "--in-memory", "--quiet"],
                                stdout=out, stderr=subprocess.STDOUT)
    env = emulator_env(port)
    with pytest.MonkeyPatch.context() as mp:
        try:
            _wait_for_port(proc, port, START_TIMEOUT_S, log)
            for k, v in env.items():
                mp.setenv(k, v)
            mp.setitem(fsspec.config.conf, "gcs", {**fsspec.config.conf.get("gcs", {}), "token": "anon"})
            for protocol in ("gs", "gcs"):  # in case gcsfs was imported before the variable
                fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
            gcsfs.core.GCSFileSystem.clear_instance_cache()
            yield env
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            gcsfs.core.GCSFileSystem.clear_instance_cache()


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
    """'gs://<name>' of a fresh, empty bucket on the session's emulator."""
    import fsspec

    name = f"test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("gs").mkdir(name)
    return f"gs://{name}"


def serve(argv: list[str]) -> None:
    """gcp_storage_emulator's command line, with what TensorStore's GCS driver needs: downloads
    carry the object's generation (x-goog-generation; without it every read of an object that
    exists fails with 'Malformed StorageGeneration'), and a media upload with ifGenerationMatch
    is refused (412) unless the object's generation matches (0: it must not exist)."""
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    download, insert = objects.download, objects.insert

    def generation(storage, bucket: str, name: str) -> str:
        try:
            return storage.get_file_obj(bucket, name)["generation"]
        except NotFound:
            return "0"

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            response["x-goog-generation"] = generation(storage, request.params["bucket_name"],
                                                       request.params["object_id"])

    def insert_if_generation_matches(request, response, storage, *args, **kwargs):
        want, name = request.query.get("ifGenerationMatch"), request.query.get("name")
        if want and name and generation(storage, request.params["bucket_name"], name[0]) != want[0]:
            response.status = HTTPStatus.PRECONDITION_FAILED
            return
        insert(request, response, storage, *args, **kwargs)

    objects.download, objects.insert = download_with_generation, insert_if_generation_matches
    from gcp_storage_emulator.__main__ import main  # its route table reads the handlers above

    main(argv)


if __name__ == "__main__":
    serve(sys.argv[1:])
