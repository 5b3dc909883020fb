"""MNIST-style data sets: fetch, verify and read the original IDX files, and split them (`load_splits`).

Files are cached decompressed under `data.root` and verified by the SHA-256 of their decompressed bytes,
so a gzip file from a mirror and a raw file from a package check the same way. A file is only ever
moved into the cache after it verified, so the cache never holds a partial or corrupt file.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import logging
import struct
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from tfsweep.errors import DataError
from tfsweep.processes import write_atomically

log = logging.getLogger(__name__)

IMAGE_SIZE = 28  # MNIST and Fashion-MNIST images are 28x28; `load_splits` refuses other files
SPLIT_FILES = ("train_images", "train_labels", "test_images", "test_labels")
METRIC_PREFIXES = {"train": "train", "validation": "val", "test": "test"}  # val/accuracy; MLflow dataset contexts
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
DOWNLOAD_TIMEOUT_S = 20


def read_idx(payload: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse an IDX file (the format of MNIST): magic 0x0000 <dtype> <ndim>, big-endian dims, data."""
    if len(payload) < 4 or payload[0:2] != b"\x00\x00" or payload[2] not in IDX_DTYPES:
        raise DataError(f"{source} is not an IDX file (bad magic number); delete it and fetch it again")
    ndim = payload[3]
    header = 4 + 4 * ndim
    if len(payload) < header:
        raise DataError(f"{source} is truncated inside its header; delete it and fetch it again")
    shape = struct.unpack(f">{ndim}I", payload[4:header])
    dtype = np.dtype(IDX_DTYPES[payload[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(payload) - header != expected:
        raise DataError(f"{source} holds {len(payload) - header} data bytes but its header promises "
                        f"{expected}: it is truncated or corrupt; delete it and fetch it again")
    return np.frombuffer(payload, dtype=dtype, offset=header).reshape(shape)


def write_idx(array: np.ndarray, path: Path) -> None:
    """Write `array` as an IDX file (uint8 only); the tests use it to make small synthetic data sets."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(f">HBB{array.ndim}I", 0, 0x08, array.ndim, *array.shape)
    path.write_bytes(header + array.tobytes())


def _decompressed(payload: bytes) -> bytes:
    return gzip.decompress(payload) if payload[:2] == b"\x1f\x8b" else payload


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _from_mirrors(mirrors: list[str], name: str) -> bytes | None:
    for mirror in mirrors:
        url = mirror.rstrip("/") + f"/{name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                return _decompressed(response.read())
        except (OSError, EOFError) as exc:  # URLError, timeouts and bad gzip are all OSError/EOFError
            log.info("could not fetch %s: %s", url, exc)
    return None


def _fallback_dir(fallback: str, workdir: Path) -> Path | None:
    """Unpack the fallback package into `workdir`; return the folder holding the IDX files."""
    kind, _, spec = fallback.partition(":")
    try:
        if kind == "npm":
            subprocess.run(["npm", "pack", spec, "--silent", "--pack-destination", str(workdir)],
                           check=True, capture_output=True, timeout=300)
            tarball = next(workdir.glob("*.tgz"))
            with tarfile.open(tarball) as archive:
                archive.extractall(workdir, filter="data")
            return workdir / "package" / "data"
        if kind == "deb":
            package, _, installed_dir = spec.partition(":")
            if Path(installed_dir).is_dir():
                return Path(installed_dir)
            subprocess.run(["apt-get", "download", package], cwd=workdir, check=True,
                           capture_output=True, timeout=300)
            deb = next(workdir.glob("*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir / "root")], check=True,
                           capture_output=True, timeout=300)
            return workdir / "root" / installed_dir.lstrip("/")
    except (OSError, subprocess.SubprocessError, StopIteration, tarfile.TarError) as exc:
        log.info("fallback %s failed: %s", fallback, exc)
        return None
    if kind != "none":
        raise DataError(f"data.fallback={fallback!r} is not understood; use 'npm:<pkg>@<version>', "
                        "'deb:<package>:<dir>' or 'none'")
    return None


def _verified(payload: bytes | None, name: str, sha256: str, source: str) -> bytes | None:
    if payload is not None and _sha256(payload) != sha256:
        log.warning("%s from %s failed its checksum; ignoring it", name, source)
        return None
    return payload


def _copy_verified(source: Path, f: DictConfig, target: Path) -> bool:
    """Store `source` (raw or gzip) as `target` if it exists and its decompressed bytes pass the checksum."""
    if not source.exists():
        return False
    payload = _verified(_decompressed(source.read_bytes()), f.name, f.sha256, str(source))
    if payload is not None:
        write_atomically(target, payload)
    return payload is not None


def check_root(cfg: DictConfig) -> None:
    """Refuse a `data.root` that is a file, or that cannot take the files still missing from it.

    A read-only folder that already holds every file is fine (a shared copy of the data set).
    """
    root = Path(cfg.root).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"data.root={root} is a file: point data.root at a folder (it is made if missing)")
    if all((root / cfg[split].name).is_file() for split in SPLIT_FILES):
        return
    existing = next(folder for folder in (root, *root.parents) if folder.exists())
    try:  # writing is the one reliable test: `os.access` says yes to root on any permission bits
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise DataError(f"data.root={root} cannot take the data files ({exc.strerror}): point data.root at a "
                        "writable folder, or put the files there first") from None


def ensure_files(cfg: DictConfig) -> dict[str, Path]:
    """Make sure every IDX file of the data set is in `cfg.root`, verified; fetch what is missing."""
    check_root(cfg)
    root = Path(cfg.root).expanduser()
    files = {split: cfg[split] for split in SPLIT_FILES}
    paths = {split: root / f.name for split, f in files.items()}
    missing = []
    for split, f in files.items():
        target = paths[split]
        if target.exists():
            if _sha256(target.read_bytes()) == f.sha256:
                continue
            log.warning("%s failed its checksum (truncated or corrupt); fetching it again", target)
            target.unlink()
        if not _copy_verified(target.with_name(f.name + ".gz"), f, target):  # a gzip file put there by hand
            missing.append(split)
    if not missing:
        return paths

    log.info("fetching %s %s into %s", cfg.name, ", ".join(files[s].name for s in missing), root)
    for split in list(missing):
        f = files[split]
        payload = _verified(_from_mirrors(list(cfg.mirrors), f.name), f.name, f.sha256, "the mirrors")
        if payload is None:
            break  # the mirrors are out of reach; don't try each remaining file against them
        write_atomically(paths[split], payload)
        missing.remove(split)

    if missing:
        with tempfile.TemporaryDirectory() as workdir:
            folder = _fallback_dir(cfg.fallback, Path(workdir))
            for split in list(missing):
                f = files[split]
                if folder and any(_copy_verified(folder / name, f, paths[split]) for name in (f.name, f.name + ".gz")):
                    missing.remove(split)
    if missing:
        names = ", ".join(files[s].name for s in missing)
        raise DataError(f"could not fetch {names} for data={cfg.name}: the mirrors and the fallback "
                        f"{cfg.fallback!r} failed; put the original files (raw or .gz) into {root} "
                        "or set data.root to a folder that has them")
    return paths


@dataclass(frozen=True)
class Splits:
    """Images as uint8 [n, 28, 28] and labels as int32 [n] for each split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    validation_images: np.ndarray
    validation_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_splits(cfg: DictConfig) -> Splits:
    """The tutorial's split: the first n - validation_size training images train, the rest validate."""
    paths = ensure_files(cfg)
    arrays = {split: read_idx(paths[split].read_bytes(), str(paths[split])) for split in SPLIT_FILES}
    images, labels = arrays["train_images"], arrays["train_labels"].astype(np.int32)
    for split in ("train_images", "test_images"):
        if arrays[split].shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{paths[split]} holds images of shape {arrays[split].shape[1:]}, not "
                            f"{IMAGE_SIZE}x{IMAGE_SIZE}: data={cfg.name} must point at MNIST-style files")
    if len(images) != len(labels) or len(arrays["test_images"]) != len(arrays["test_labels"]):
        raise DataError(f"the image and label files of data={cfg.name} in {paths['train_images'].parent} "
                        "hold different numbers of examples; delete them and fetch them again")
    if not 0 <= cfg.validation_size < len(images):
        raise DataError(f"data.validation_size={cfg.validation_size} must be less than the "
                        f"{len(images)} training images of data={cfg.name}")
    cut = len(images) - cfg.validation_size
    return Splits(images[:cut], labels[:cut], images[cut:], labels[cut:],
                  arrays["test_images"], arrays["test_labels"].astype(np.int32))
