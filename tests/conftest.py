import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for servers the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Object storage: an S3-compatible server (moto) on 127.0.0.1, started by the `s3` fixture on a port fixed now,
# so the local Ray runtime's workers (which take their environment at ray.init) reach it like the driver does;
# pyarrow's S3 file system reads these variables.
S3_ENV = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "testing",
          "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
os.environ.update(S3_ENV)

ROOT = Path(__file__).resolve().parents[1]
# The real CIFAR-10 shards sit beside the checkout (../shared); the package ships a 1,200-image sample of the
# same files, used when the shards are not there.
SHARED_CIFAR = Path(os.environ.get("IGPT_CIFAR10", ROOT.parent / "shared" / "datasets" / "cifar10"))
SAMPLE = ROOT / "igpt" / "data" / "cifar10_sample.parquet"


def cifar_table(n: int):
    src = SHARED_CIFAR / "test-00000-of-00001.parquet"
    table = pq.read_table(src if src.exists() else SAMPLE)
    return table.slice(0, n)


@pytest.fixture(scope="session")
def cifar_images():
    """400 real CIFAR-10 test images, uint8 (400, 32, 32, 3)."""
    table = cifar_table(400)
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column("image").to_pylist()])


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime for the whole session (starting one costs ~5 s)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             # system metrics every 2 s instead of 10: a test's training run lasts seconds
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2",
                                       **S3_ENV}})
    from igpt.raysetup import configure_data

    configure_data()
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3():
    """A fresh bucket on an S3-compatible server (moto's) started on 127.0.0.1 for the session; yields the
    bucket's URI. The server is a real HTTP endpoint: pyarrow, Ray Train and our code talk S3 to it."""
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    url = S3_ENV["AWS_ENDPOINT_URL"]
    port = url.rsplit(":", 1)[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            break
        except urllib.error.HTTPError:  # it answers
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "the moto S3 server did not start"
            time.sleep(0.2)
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=url, allow_bucket_creation=True).create_dir("igpt-test")
    yield "s3://igpt-test"
    proc.terminate()
    proc.wait(timeout=10)
