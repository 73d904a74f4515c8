"""A local S3-compatible object store for the suite's no-shared-disk test bed: moto's server in its own
process, reached by Spark's s3a connector (the jars scripts/fetch_s3a_jars.py fetches), by Arrow's S3
filesystem in the driver and the Python workers, and by s3fs in a reader of the export.

moto rather than s3proxy or MinIO: it is a Python package in the lock file (no JVM server, container or
binary to fetch beside it), and it keeps objects in memory, so nothing it stores can land on a disk a
test then mistakes for the workdir.

Every client finds the store where a user's S3 tools would: the standard AWS environment variables
(`AWS_ENDPOINT_URL`, the key pair, the region), plus Spark's own `spark.hadoop.fs.s3a.*` settings for
the connector's path-style addressing, which a server on 127.0.0.1 needs.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BUCKET = "backforth-bed"
# moto accepts any key pair; these are AWS's documented example credentials, and the tests look for
# them in every log, table and summary the run leaves
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ObjectStore:
    """moto's S3 server on a free port with one bucket; `env` and `spark_conf` are what a client sets."""

    def __init__(self, log: Path) -> None:
        self._client = None
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = log.open("w")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's server did not start: see {log}") from None
                time.sleep(0.3)
        self.client().create_bucket(Bucket=BUCKET)

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            # Arrow and the AWS SDKs must not look for an instance role on a host that has none
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def spark_conf(self, jars: Path) -> dict[str, str]:
        """Spark's settings for the connector: its jars on the driver's and executors' class path (they
        exist on every node here; a Spark fetching 700 MB of jars per executor would be the slow part)
        and path-style addressing (no bucket-named hosts on 127.0.0.1)."""
        classpath = ":".join(str(p) for p in sorted(jars.glob("*.jar")))
        return {
            "spark.driver.extraClassPath": classpath,
            "spark.executor.extraClassPath": classpath,
            # the endpoint, region and keys come from the environment (the AWS SDK reads AWS_ENDPOINT_URL)
            "spark.hadoop.fs.s3a.path.style.access": "true",
        }

    def client(self):
        """One S3 client for every call, from any thread (botocore's clients are thread-safe). Built once
        and told there is no proxy: building one reads proxies by iterating os.environ, which fails with
        KeyError when the test thread changes the environment meanwhile (pytest sets a variable per test)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY, region_name="us-east-1", config=Config(proxies={}),
            )  # fmt: skip
        return self._client

    def upload(self, local: Path, key: str) -> str:
        self.client().upload_file(str(local), BUCKET, key)
        return f"s3a://{BUCKET}/{key}"

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def list_keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._log.close()
