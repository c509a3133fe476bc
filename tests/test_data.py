"""Data: the real readers on files in the real formats, splits, and the batch loader."""

from __future__ import annotations

import gzip
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from experiments.data import DEBIAN_FASHION_MNIST, Split, TensorLoader, epoch_seed, load_data, read_cifar, read_idx

from .conftest import assert_one_line_error, run_script
from .helpers import write_cifar10


def test_read_cifar_exact_format(tmp_path):
    written = write_cifar10(tmp_path, per_batch=7, test=5)
    train = read_cifar(tmp_path / "cifar-10-batches-py", train=True)
    test = read_cifar(tmp_path / "cifar-10-batches-py", train=False)
    assert train.images.shape == (35, 3, 32, 32) and train.images.dtype == torch.uint8 and len(test) == 5
    # the first image's red plane is the first 1024 bytes of its row
    np.testing.assert_array_equal(train.images[0, 0].numpy().ravel(), written["data_batch_1"][0, :1024])
    np.testing.assert_array_equal(train.images[7].numpy().ravel(), written["data_batch_2"][0])


def test_read_idx_plain_and_gzip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = struct.pack(">HBB3I", 0, 8, 3, 2, 3, 4) + images.tobytes()
    (tmp_path / "a-idx3-ubyte").write_bytes(raw)
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        np.testing.assert_array_equal(read_idx(tmp_path / name).numpy(), images)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_real_fashion_mnist(compose_cfg):
    data = load_data(compose_cfg("data=fashion_mnist").data)
    assert data.train.images.shape == (60000, 1, 28, 28) and data.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train.labels).tolist() == [6000] * 10


def test_subset_and_val_split(compose_cfg, tmp_path):
    write_cifar10(tmp_path, per_batch=40, test=20)
    cfg = compose_cfg("data.download=false", f"data.root={tmp_path}", "data.val_split=0.25", "data.subset=50").data
    a, b = load_data(cfg, seed=0), load_data(cfg, seed=1)
    assert len(a.val) == 50 and len(a.train) == 50 and len(a.test) == 20
    torch.testing.assert_close(a.val.images, b.val.images)  # the same validation split for every seed
    val_rows = {tuple(x.flatten()[:16].tolist()) for x in a.val.images}
    assert not any(tuple(x.flatten()[:16].tolist()) in val_rows for x in a.train.images)  # tuning never sees train twice


def test_subset_seed_fixes_the_draw_across_run_seeds(compose_cfg, tmp_path):
    """data.subset is drawn with the run's seed unless data.subset_seed fixes it."""
    write_cifar10(tmp_path, per_batch=40, test=20)
    base = ("data.download=false", f"data.root={tmp_path}", "data.subset=50")

    def train_images(*overrides: str, seed: int):
        return load_data(compose_cfg(*base, *overrides).data, seed=seed).train.images

    assert not torch.equal(train_images(seed=0), train_images(seed=1))  # null: each run seed its own examples
    torch.testing.assert_close(train_images("data.subset_seed=7", seed=0), train_images("data.subset_seed=7", seed=1))
    torch.testing.assert_close(train_images("data.subset_seed=1", seed=0), train_images(seed=1))  # the same draw as seed 1's


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.subset=10", "data.subset_seed=1.5"], "data.subset_seed=1.5 must be a whole number >= 0"),
        (["data.subset=1000"], "data.subset=1000 is larger than the 200-example cifar10 training split"),
        (["data.subset=0"], "data.subset=0"),
        (["data.val_split=1.5"], "data.val_split=1.5"),
        (["data.val_split=200"], "must leave some"),
        (["data.val_split=0.001"], "data.val_split=0.001 is less than one of the 200 examples"),  # was silently no validation set
    ],
)
def test_bad_data_options(compose_cfg, tmp_path, overrides, message):
    write_cifar10(tmp_path)
    cfg = compose_cfg("data.download=false", f"data.root={tmp_path}", *overrides).data
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_data(cfg)


def test_missing_files_without_download_names_the_path(compose_cfg, tmp_path):
    cfg = compose_cfg("data.download=false", f"data.root={tmp_path}").data
    with pytest.raises(ValueError, match=str(tmp_path / "cifar-10-batches-py")):
        load_data(cfg)


def _loader(split, **kwargs):
    options = {"device": torch.device("cpu"), "mean": [0.0] * 3, "std": [1 / 255] * 3, "image_size": 8, "seed": 3}
    return TensorLoader(split, 4, **{**options, **kwargs})


def test_loader_deterministic_per_seed_and_epoch():
    split = Split(torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8), torch.arange(16))
    a, b = _loader(split, train=True, crop_padding=2, flip=True), _loader(split, train=True, crop_padding=2, flip=True)
    first = [y.tolist() for _, y in a]
    assert first == [y.tolist() for _, y in b]
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    a.set_epoch(1)
    assert [y.tolist() for _, y in a] != first
    assert sorted(i for batch in first for i in batch) == list(range(16))  # every example once per epoch


def test_crop_and_flip_match_a_reference():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    loader = _loader(Split(images, torch.arange(16)), train=True, crop_padding=2, flip=True)
    for x, y in loader:
        for img, label in zip(x, y):
            padded = torch.nn.functional.pad(images[label].float(), (2, 2, 2, 2))
            candidates = [padded[:, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
            candidates += [c.flip(2) for c in candidates]
            assert any(torch.equal(img, c) for c in candidates)
    assert x.is_contiguous(memory_format=torch.channels_last) is False  # channels_last only when asked


def test_rank_shards_make_the_global_batch():
    split = Split(torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8), torch.arange(32))
    whole = [(x, y) for x, y in _loader(split, train=True, crop_padding=2, flip=True)]
    shards = [[(x, y) for x, y in _loader(split, train=True, crop_padding=2, flip=True, rank=r, world_size=2)] for r in range(2)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shards):
        torch.testing.assert_close(x[0::2], x0)
        torch.testing.assert_close(x[1::2], x1)
        assert y[0::2].tolist() == y0.tolist() and y[1::2].tolist() == y1.tolist()


def test_normalisation_and_resize():
    images = torch.full((4, 3, 8, 8), 255, dtype=torch.uint8)
    loader = TensorLoader(Split(images, torch.zeros(4, dtype=torch.long)), 4, train=False, device=torch.device("cpu"), mean=[0.5] * 3,
                          std=[0.25] * 3, image_size=16, channels_last=True)  # fmt: skip
    x, _ = next(iter(loader))
    assert x.shape == (4, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, torch.full_like(x, 2.0))


def test_synthetic_is_seeded(compose_cfg):
    cfg = OmegaConf.merge(compose_cfg("data=synthetic").data, {"train_size": 64, "test_size": 16})
    assert torch.equal(load_data(cfg, seed=1).train.images, load_data(cfg, seed=1).train.images)
    assert not torch.equal(load_data(cfg, seed=1).train.images, load_data(cfg, seed=2).train.images)


def test_epoch_seed_takes_every_valid_run_seed():
    """Seeds up to 2**63 are valid; seed * 100003 overflowed the generator's 64 bits ('Overflow when
    unpacking long long' after the run dir and data were made). Small seeds keep their streams."""
    assert epoch_seed(3, 2) == 3 * 100_003 + 2
    for seed in (2**63 - 1, 10**15):
        for epoch in (0, 7):
            value = epoch_seed(seed, epoch)
            assert 0 <= value < 2**64
            torch.Generator().manual_seed(value)
    assert epoch_seed(2**63 - 1, 0) != epoch_seed(2**63 - 1, 1)


def _image_folder(root: Path, counts: dict[str, int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in counts.items():
        for i in range(n):
            folder = root / "imagenet" / split / ("a" if i % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_imagenet_folders_subset_and_every_test_image_once_across_ranks(compose_cfg, tmp_path):
    """data.subset was silently ignored for ImageNet, and evaluation over 2 ranks read 6 of 5 images
    (DistributedSampler pads by repeating); val_split, which a streamed folder does not build, is refused."""
    from experiments.data import FolderLoader

    _image_folder(tmp_path, {"train": 6, "val": 5})
    base = ("data=imagenet", f"data.root={tmp_path}", "data.image_size=32", "data.num_classes=2")
    data = load_data(compose_cfg(*base, "data.subset=4").data, seed=0)
    assert (len(data.train), data.val, len(data.test)) == (4, None, 5)
    seen = []
    for rank in (0, 1):
        loader = FolderLoader(data.test, 1, train=False, device=torch.device("cpu"), mean=[0.5] * 3, std=[0.25] * 3, flip=False, seed=0,
                              channels_last=False, rank=rank, world_size=2, workers=0)  # fmt: skip
        seen += [y.item() for _, y in loader]
    assert len(seen) == 5 and sorted(seen) == sorted(label for _, label in data.test.samples)
    with pytest.raises(ValueError, match=r"data\.val_split=0\.2 is not supported for imagenet"):
        load_data(compose_cfg(*base, "data.val_split=0.2").data, seed=0)


def test_normalisation_is_per_channel_in_order():
    """Each channel uses its own mean and std: one value for every channel could not tell them apart."""
    values = torch.tensor([51, 102, 204], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 8, 8).contiguous()
    mean, std = [0.1, 0.2, 0.3], [0.1, 0.2, 0.4]
    loader = TensorLoader(Split(values, torch.zeros(2, dtype=torch.long)), 2, train=False, device=torch.device("cpu"), mean=mean,
                          std=std, image_size=8)  # fmt: skip
    x, _ = next(iter(loader))
    for c, expected in enumerate([(0.2 - 0.1) / 0.1, (0.4 - 0.2) / 0.2, (0.8 - 0.3) / 0.4]):  # 51, 102, 204 / 255 = 0.2, 0.4, 0.8
        torch.testing.assert_close(x[:, c], torch.full_like(x[:, c], expected))


def test_augmentation_flips_and_crops_at_several_offsets():
    """Over one epoch some images are flipped (they match only a flipped crop) and crops use more than one offset."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    loader = _loader(Split(images, torch.arange(16)), train=True, crop_padding=2, flip=True)
    only_flipped, offsets = 0, set()
    for x, y in loader:
        for img, label in zip(x, y):
            padded = torch.nn.functional.pad(images[label].float(), (2, 2, 2, 2))
            plain = {(i, j) for i in range(5) for j in range(5) if torch.equal(img, padded[:, i : i + 8, j : j + 8])}
            flipped = {(i, j) for i in range(5) for j in range(5) if torch.equal(img, padded[:, i : i + 8, j : j + 8].flip(2))}
            assert plain or flipped
            only_flipped += bool(flipped and not plain)
            offsets |= plain | flipped
    assert only_flipped > 0 and len(offsets) > 1, (only_flipped, offsets)


def test_eval_loader_yields_every_example_once_with_a_partial_last_batch():
    split = Split(torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8), torch.arange(10))
    loader = _loader(split, train=False)
    batches = [y.tolist() for _, y in loader]
    assert len(loader) == 3 and [len(b) for b in batches] == [4, 4, 2]
    assert sorted(i for b in batches for i in b) == list(range(10))


# ------------------------------------------------------------------------------ truncated or corrupt files
# An interrupted download leaves a file cut short or holding junk; each reader says so in one line that
# names the file and how to get a good copy (a ValueError: the command line prints it as one error: line).


def _write_cifar100(root: Path, n: int = 20) -> Path:
    """``cifar-100-python`` as the real dataset stores it: ``train``/``test`` pickles with ``b"fine_labels"``."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        batch = {b"filenames": [b"x.png"] * n, b"fine_labels": rng.integers(0, 100, n).tolist(), b"coarse_labels": [0] * n,
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def _junk(n: int, seed: int = 0) -> bytes:
    """``n`` random bytes, the same every run (os.urandom's could, once in a blue moon, be valid)."""
    return np.random.default_rng(seed).bytes(n)


def _corrupt(path: Path, how: str) -> None:
    raw, good = path.read_bytes(), pickle.loads(path.read_bytes(), encoding="bytes")
    key = b"fine_labels" if b"fine_labels" in good else b"labels"
    if how == "missing":
        path.unlink()
        return
    path.write_bytes(
        {
            "random": _junk(3000),
            "empty": b"",
            "truncated": raw[: len(raw) // 2],
            "not a dict": pickle.dumps([1, 2, 3]),
            "no data key": pickle.dumps({key: good[key]}),
            "wrong shape": pickle.dumps({**good, b"data": good[b"data"].reshape(-1)[:1000]}),
            "too few labels": pickle.dumps({**good, key: good[key][:-1]}),
            "label out of range": pickle.dumps({**good, key: [100] * len(good[key])}),
        }[how]
    )


CORRUPTIONS = {  # how the file is spoiled: what the message says is wrong with it
    "random": "pickle (truncated or corrupt)",
    "empty": "pickle (truncated or corrupt)",
    "truncated": "pickle (truncated or corrupt)",
    "missing": "is missing",
    "not a dict": "b'data' is not an N x 3072 uint8 array",
    "no data key": "b'data' is not an N x 3072 uint8 array",
    "wrong shape": "b'data' is not an N x 3072 uint8 array",
    "too few labels": "labels in 0..",
    "label out of range": "labels in 0..",
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
@pytest.mark.parametrize(("dataset", "file"), [("cifar10", "cifar-10-batches-py/data_batch_3"), ("cifar100", "cifar-100-python/test")])
def test_corrupt_cifar_file_is_one_line_naming_it_and_the_fix(compose_cfg, tmp_path, dataset, file, how):
    """Random bytes were an UnpicklingError traceback, an empty file EOFError, a dict without b"data" KeyError."""
    if dataset == "cifar10":
        write_cifar10(tmp_path, per_batch=8, test=8)
    else:
        _write_cifar100(tmp_path)
    _corrupt(tmp_path / file, how)
    cfg = compose_cfg(f"data={dataset}", "data.download=false", f"data.root={tmp_path}").data
    with pytest.raises(ValueError) as raised:
        load_data(cfg)
    message = str(raised.value)
    assert "\n" not in message and str(tmp_path / file) in message, message
    assert f"delete {(tmp_path / file).parent} and run with data.download=true" in message and "set data.root" in message, message
    assert CORRUPTIONS[how] in message, message


@pytest.mark.parametrize(("dataset", "file", "raw"), [("cifar10", "cifar-10-batches-py/data_batch_2", _junk(5000)),
                                                      ("cifar100", "cifar-100-python/train", b"")])  # fmt: skip
def test_corrupt_cifar_file_on_the_command_line_is_one_error_line(tmp_path, dataset, file, raw):
    """The audit's command: a traceback (UnpicklingError for random bytes, EOFError for an empty file)."""
    if dataset == "cifar10":
        write_cifar10(tmp_path / "data", per_batch=8, test=8)
    else:
        _write_cifar100(tmp_path / "data")
    (tmp_path / "data" / file).write_bytes(raw)
    proc = run_script("run.py", "trainer=smoke", "logger=none", f"data={dataset}", f"data.root={tmp_path / 'data'}", "data.download=false",
                      f"hydra.run.dir={tmp_path / 'run'}", timeout=300)  # fmt: skip
    assert_one_line_error(proc, str(tmp_path / "data" / file), "pickle (truncated or corrupt)", "data.download=true", "data.root")
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1, proc.stderr


def _idx(shape: tuple[int, ...], data: bytes | None = None) -> bytes:
    return struct.pack(f">HBB{len(shape)}I", 0, 8, len(shape), *shape) + (bytes(int(np.prod(shape))) if data is None else data)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "holds 0 bytes, too few for an IDX header"),
        (b"\x00\x00", "holds 2 bytes, too few for an IDX header"),
        (_idx((5, 28, 28))[:10], "holds 10 bytes, too few for an IDX header of 3 dimensions"),
        (b"\x1f\x8b\x08\x00" + bytes(100), "is not a uint8 IDX file (magic 1f8b0800"),  # still gzipped
        (_idx((5, 28, 28))[:1000], "IDX header says 5x28x28 but the file holds 984 bytes of data"),
        (_idx((5, 28, 28)) + b"xx", "IDX header says 5x28x28 but the file holds 3922 bytes of data"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_bad_idx_file_is_one_line_naming_it_and_the_fix(tmp_path, raw, message, gz):
    """A truncated IDX file was a RuntimeError (shape ... invalid) or struct.error traceback."""
    path = tmp_path / "fashion-mnist" / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    path.parent.mkdir()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:? ") as raised:
        read_idx(path)
    assert message in str(raised.value) and "\n" not in str(raised.value), str(raised.value)
    assert f"delete {path.parent} and run with data.download=true" in str(raised.value) and "set data.root" in str(raised.value)


@pytest.mark.parametrize(
    "raw",
    [_junk(2000), gzip.compress(_junk(5000))[:2000], gzip.compress(_idx((5, 28, 28)))[:12] + _junk(500)],
    ids=["not gzip", "gzip cut short", "corrupt deflate stream"],
)
def test_bad_gzip_idx_file_is_one_line(tmp_path, raw):
    """gzip.BadGzipFile, EOFError and zlib.error tracebacks before."""
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable gzip file (truncated or corrupt); delete {tmp_path} and")):
        read_idx(path)


def _fashion_files(folder: Path, train: int = 6, test: int = 4) -> None:
    folder.mkdir(parents=True)
    for split, n in (("train", train), ("t10k", test)):
        (folder / f"{split}-images-idx3-ubyte").write_bytes(_idx((n, 28, 28)))
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(_idx((n,), bytes(range(n))))


def test_fashion_mnist_labels_that_do_not_fit_the_images(compose_cfg, tmp_path, monkeypatch):
    """Valid IDX files that are not Fashion-MNIST's (a labels file of another count) are refused by name, not trained on."""
    import experiments.data

    monkeypatch.setattr(experiments.data, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")  # else Debian's copy is read first
    folder = tmp_path / "fashion-mnist"
    _fashion_files(folder)
    cfg = compose_cfg("data=fashion_mnist", "data.download=false", f"data.root={tmp_path}").data
    assert len(load_data(cfg).train) == 6
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx((3,), bytes(3)))
    with pytest.raises(ValueError, match=re.escape(f"{folder / 't10k-labels-idx1-ubyte'} holds (3,) values, not the 4 labels in 0..9")):
        load_data(cfg)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx((4,)))
    (folder / "train-images-idx3-ubyte").write_bytes(_idx((6, 28 * 28 - 1)))
    with pytest.raises(
        ValueError, match=re.escape(f"{folder / 'train-images-idx3-ubyte'} holds (6, 783) values, not N x H x W images; delete {folder}")
    ):
        load_data(cfg)


def test_corrupt_debian_fashion_mnist_says_reinstall(tmp_path, monkeypatch):
    """Debian's copy is read before data.root: deleting it or setting data.root would not help."""
    import experiments.data

    monkeypatch.setattr(experiments.data, "DEBIAN_FASHION_MNIST", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"is not a readable gzip file .*; reinstall Debian's dataset-fashion-mnist"):
        read_idx(tmp_path / "train-labels-idx1-ubyte.gz")


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_in_an_image_folder_is_one_line_naming_it(compose_cfg, tmp_path, workers):
    """PIL's UnidentifiedImageError/OSError came out of the DataLoader (from a worker: its whole traceback in the message)."""
    from experiments.data import FolderLoader

    _image_folder(tmp_path, {"train": 4, "val": 4})
    bad = tmp_path / "imagenet" / "val" / "b" / "2.png"
    bad.write_bytes(bad.read_bytes()[:100])  # cut short
    data = load_data(compose_cfg("data=imagenet", f"data.root={tmp_path}", "data.image_size=32", "data.num_classes=2").data)
    loader = FolderLoader(data.test, 4, train=False, device=torch.device("cpu"), mean=[0.5] * 3, std=[0.25] * 3, flip=False, seed=0,
                          channels_last=False, workers=workers)  # fmt: skip
    with pytest.raises(ValueError) as raised:
        list(loader)
    message = str(raised.value)
    assert message.startswith(f"{bad} is a truncated or corrupt image (image file is truncated); replace or delete it"), message
    assert "\n" not in message and "Traceback" not in message and "set data.root" in message, message


def test_unreadable_image_on_the_command_line_is_one_error_line(tmp_path):
    """During training, in one of the 8 DataLoader workers: an OSError traceback ("Caught OSError in DataLoader worker process 0")."""
    _image_folder(tmp_path, {"train": 8, "val": 4})
    bad = tmp_path / "imagenet" / "train" / "b" / "2.png"
    bad.write_bytes(bad.read_bytes()[:100])
    proc = run_script("run.py", "trainer=smoke", "trainer.batch_size=4", "logger=none", "data=imagenet", f"data.root={tmp_path}",
                      "data.image_size=32", "data.num_classes=2", f"hydra.run.dir={tmp_path / 'run'}", timeout=300)  # fmt: skip
    assert_one_line_error(proc, str(bad), "truncated or corrupt image", "set data.root")
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1, proc.stderr


def test_image_folder_with_an_empty_class_folder(compose_cfg, tmp_path):
    _image_folder(tmp_path, {"train": 4, "val": 4})
    for image in (tmp_path / "imagenet" / "val" / "a").iterdir():
        image.unlink()
    cfg = compose_cfg("data=imagenet", f"data.root={tmp_path}", "data.image_size=32", "data.num_classes=2").data
    with pytest.raises(
        ValueError, match=re.escape(f"{tmp_path / 'imagenet' / 'val'} is not a complete ImageFolder (Found no valid file for the classes a")
    ):
        load_data(cfg)
