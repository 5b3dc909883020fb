import gzip
import hashlib

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import N_TEST, N_TRAIN, N_VALIDATION, make_dataset
from tfsweep.data import check_root, ensure_files, load_splits, read_idx, write_idx
from tfsweep.errors import DataError


def data_cfg(overrides: dict[str, str]):
    """The `data` node as the overrides of make_dataset describe it (without composing Hydra)."""
    node = {"name": "synthetic", "mirrors": [], "fallback": "none"}
    for key, value in overrides.items():
        parts = key.split(".")[1:]
        target = node
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value if not value.isdigit() else int(value)
    node["mirrors"] = []
    return OmegaConf.create(node)


def test_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(array, tmp_path / "a")
    np.testing.assert_array_equal(read_idx((tmp_path / "a").read_bytes()), array)


@pytest.mark.parametrize("payload, message", [
    (b"\x01\x00\x08\x01\x00\x00\x00\x02ab", "bad magic"),
    (b"\x00\x00\x08\x03\x00\x00", "truncated inside its header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "truncated or corrupt"),
])
def test_idx_reader_rejects_bad_files(payload, message):
    with pytest.raises(DataError, match=message):
        read_idx(payload, "somefile")


def test_split_sizes_and_scaling(tmp_path):
    cfg = data_cfg(make_dataset(tmp_path))
    splits = load_splits(cfg)
    assert len(splits.train_images) == N_TRAIN - N_VALIDATION
    assert len(splits.validation_images) == N_VALIDATION
    assert len(splits.test_images) == N_TEST
    assert splits.train_images.dtype == np.uint8 and splits.train_images.shape[1:] == (28, 28)
    # the validation split is the *last* images of the training file, as in the tutorial
    full = read_idx((tmp_path / cfg.train_images.name).read_bytes())
    np.testing.assert_array_equal(splits.validation_images, full[-N_VALIDATION:])


def test_corrupt_cached_file_is_removed_and_reported(tmp_path):
    cfg = data_cfg(make_dataset(tmp_path))
    target = tmp_path / cfg.train_labels.name
    target.write_bytes(target.read_bytes()[:-10])  # truncated
    with pytest.raises(DataError, match=cfg.train_labels.name):
        ensure_files(cfg)
    assert not target.exists(), "a file that failed its checksum must not stay in the cache"


def test_missing_file_is_fetched_from_a_mirror_and_verified(tmp_path):
    cfg = data_cfg(make_dataset(tmp_path / "cache"))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    original = (tmp_path / "cache" / cfg.test_images.name).read_bytes()
    (mirror / f"{cfg.test_images.name}.gz").write_bytes(gzip.compress(original))
    (tmp_path / "cache" / cfg.test_images.name).unlink()
    cfg.mirrors = [mirror.as_uri() + "/"]
    ensure_files(cfg)
    assert (tmp_path / "cache" / cfg.test_images.name).read_bytes() == original


def test_mirror_file_with_wrong_checksum_is_not_cached(tmp_path):
    cfg = data_cfg(make_dataset(tmp_path / "cache"))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / f"{cfg.test_labels.name}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07"))
    (tmp_path / "cache" / cfg.test_labels.name).unlink()
    cfg.mirrors = [mirror.as_uri()]
    with pytest.raises(DataError, match="could not fetch .*put the original files"):
        ensure_files(cfg)
    assert not (tmp_path / "cache" / cfg.test_labels.name).exists()


def test_user_supplied_gzip_file_is_accepted(tmp_path):
    cfg = data_cfg(make_dataset(tmp_path))
    target = tmp_path / cfg.train_images.name
    (tmp_path / f"{cfg.train_images.name}.gz").write_bytes(gzip.compress(target.read_bytes()))
    target.unlink()
    ensure_files(cfg)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == cfg.train_images.sha256


def test_offline_without_fallback_names_the_files_and_the_fix(tmp_path):
    cfg = data_cfg(make_dataset(tmp_path))
    for split in ("train_images", "test_labels"):
        (tmp_path / cfg[split].name).unlink()
    cfg.mirrors = [(tmp_path / "nowhere").as_uri()]
    with pytest.raises(DataError) as info:
        ensure_files(cfg)
    assert cfg.train_images.name in str(info.value) and cfg.test_labels.name in str(info.value)
    assert "data.root" in str(info.value)


def test_data_root_that_is_a_file_is_refused_before_anything_is_fetched(tmp_path):
    (tmp_path / "a-file").write_text("")
    cfg = data_cfg({**make_dataset(tmp_path / "data"), "data.root": str(tmp_path / "a-file" / "mnist")})
    with pytest.raises(DataError, match=r"cannot take the data files .*a-file is a file"):
        check_root(cfg)
    cfg.root = str(tmp_path / "a-file")
    with pytest.raises(DataError, match=r"data.root=.*a-file is a file"):
        ensure_files(cfg)


def test_data_root_that_cannot_be_written_is_refused_unless_it_holds_every_file(tmp_path):
    from test_cli import unwritable_folder

    cfg = data_cfg({**make_dataset(tmp_path / "data"), "data.root": unwritable_folder(tmp_path)})
    with pytest.raises(DataError, match="cannot take the data files"):
        check_root(cfg)
    cfg.root = str(tmp_path / "data")  # complete: a read-only shared copy would do
    check_root(cfg)
    before = sorted(tmp_path.rglob("*"))
    cfg.root = str(tmp_path / "new" / "mnist")  # writable: the check itself leaves nothing behind
    check_root(cfg)
    assert sorted(tmp_path.rglob("*")) == before


def test_images_of_another_size_are_refused(tmp_path):
    cfg = data_cfg(make_dataset(tmp_path))
    path = tmp_path / cfg.train_images.name
    write_idx(np.zeros((N_TRAIN, 32, 32), dtype=np.uint8), path)
    cfg.train_images.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(DataError, match=r"shape \(32, 32\), not 28x28"):
        load_splits(cfg)
