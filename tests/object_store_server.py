"""Local object-store servers that speak the real protocols, on loopback ports, for the tests.

`S3Server()` starts `python -m moto.server` on a free port and waits for it; `env()` is what points
TensorStore's s3 driver (and the converter / trainer subprocesses) at it: the AWS SDK's endpoint
override, a region and dummy credentials. Buckets are made with boto3, the AWS SDK; all store I/O
goes through TensorStore.

`GCSServer(bucket)` starts `gcp-storage-emulator` (the GCS JSON API; `gcs_emulator.py` adds the
generation header and preconditions it lacks) with one bucket; `env()` points
TensorStore's gcs driver (`TENSORSTORE_GCS_HTTP_URL`, a fixed test token) and gcsfs, which Orbax's
etils.epath uses for gs:// paths (`STORAGE_EMULATOR_HOST`), at it. `stop()` ends either server.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A server process on a free loopback port, up once `probe` (a path) answers over HTTP."""

    name = "server"

    def __init__(self, probe: str = "", timeout: float = 60.0):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile()   # servers log every request: a pipe would fill up
        self._process = subprocess.Popen(self.command(), stdout=self._log,
                                         stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            if self._process.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"{self.name} exited: {self._log.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(self.endpoint + probe, timeout=1).close()
                return
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name} did not answer on {self.endpoint}") from None
                time.sleep(0.1)

    def command(self) -> list[str]:
        raise NotImplementedError

    def stop(self):
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()


class S3Server(_Server):
    name = "moto.server"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

    def create_bucket(self, name: str) -> str:
        import boto3
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=name)
        return f"s3://{name}"


class GCSServer(_Server):
    name = "gcp-storage-emulator"

    def __init__(self, bucket: str, timeout: float = 60.0):
        self.bucket = bucket
        super().__init__(f"/storage/v1/b/{bucket}", timeout)

    def command(self) -> list[str]:
        from pathlib import Path

        # the emulator with the generation header and preconditions of real GCS (gcs_emulator.py)
        return [sys.executable, str(Path(__file__).with_name("gcs_emulator.py")), "start",
                "--host", "127.0.0.1", "--port", str(self.port), "--in-memory",
                "--default-bucket", self.bucket]

    def env(self) -> dict[str, str]:
        return {"TENSORSTORE_GCS_HTTP_URL": self.endpoint, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
                "STORAGE_EMULATOR_HOST": self.endpoint}
