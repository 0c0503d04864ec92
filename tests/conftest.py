import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

os.environ.setdefault("DS_ACCELERATOR", "cpu")

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
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    from igpt.raysetup import configure_data

    configure_data()
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
