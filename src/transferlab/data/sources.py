"""Source registry: name -> loader of decoded uint8 images; a new source is one function."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from transferlab.data.base import Loader, SourceData
from transferlab.data.imagefolder import load_imagefolder
from transferlab.data.npystack import load_npy
from transferlab.data.transforms import InputSpec
from transferlab.data.tvsets import TORCHVISION_SOURCES
from transferlab.errors import DataError

ANIMAL_CLASSES = [
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
]  # fmt: skip
_ANIMAL_DIR = Path("data") / "Animal_MNIST"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals an ndarray pickle needs: the wheel's files
    are data, and a plain pickle.load would run whatever code they name."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        if name == "_reconstruct":
            return np._core.multiarray._reconstruct  # numpy.core is a deprecated alias
        return getattr(np, name)


def _read_numpy_gz(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        arr = _NumpyOnlyUnpickler(f).load()
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path} does not hold a numpy array: reinstall animal-mnist")
    return arr


def drop_duplicates(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first of each set of byte-identical images, so no image lands in two splits."""
    seen: set[bytes] = set()
    keep = []
    for i, img in enumerate(images):
        digest = hashlib.blake2b(img.tobytes(), digest_size=16).digest()
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
    return images[keep], labels[keep]


def load_animals(cfg: DictConfig, spec: InputSpec) -> SourceData:
    """Animal-MNIST: 10,000 real 28x28 silhouettes from the wheel's files (never imported: its
    __init__ pulls in tensorflow)."""
    found = importlib.util.find_spec("animal_mnist")
    if found is None or not found.submodule_search_locations:
        raise DataError("animal-mnist is not installed: run `pip install --no-deps animal-mnist`")
    folder = Path(next(iter(found.submodule_search_locations))) / _ANIMAL_DIR
    data_file = folder / "animal_data_version_3.gz"
    label_file = folder / "animal_label_version_3.gz"
    for path in (data_file, label_file):
        if not path.is_file():
            raise DataError(f"{path} is missing: run `pip install --no-deps --force-reinstall animal-mnist`")
    images = _read_numpy_gz(data_file).astype(np.uint8, copy=False)
    labels = _read_numpy_gz(label_file).astype(np.int64, copy=False)
    images, labels = drop_duplicates(images, labels)
    return SourceData(images[:, None], labels, list(ANIMAL_CLASSES))


def load_digits(cfg: DictConfig, spec: InputSpec) -> SourceData:
    """scikit-learn's bundled 8x8 digits (values 0..16), scaled to uint8."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return SourceData(images[:, None], bunch.target.astype(np.int64), [str(d) for d in range(10)])


SOURCES: dict[str, Loader] = {
    "animals": load_animals,
    "digits": load_digits,
    "imagefolder": load_imagefolder,
    "npy": load_npy,
    **TORCHVISION_SOURCES,
}
