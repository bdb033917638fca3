"""A local S3 server (moto's, which speaks the real S3 protocol) on a loopback port, for the tests.

`S3Server()` starts `python -m moto.server` on a free port and waits for it; `env()` is what points
TensorStore's s3 driver (and the converter / trainer subprocesses) at it: the AWS SDK's endpoint
override, a region and dummy credentials. `stop()` ends the server. Buckets are made with boto3,
the AWS SDK; all store I/O goes through TensorStore.
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


class S3Server:
    def __init__(self, timeout: float = 60.0):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile()   # moto logs every request: a pipe would fill up
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            if self._process.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"moto.server exited: {self._log.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                return
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto.server did not answer on {self.endpoint}") from None
                time.sleep(0.1)

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

    def create_bucket(self, name: str) -> str:
        import boto3
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self):
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()
