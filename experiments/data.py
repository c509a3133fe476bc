"""Datasets held as one uint8 tensor, and a loader that cuts batches by index and augments on the device.

CIFAR-10/100 are downloaded by torchvision on first use, then read from the standard pickle files
(``cifar-10-batches-py``, ``cifar-100-python``) by :func:`read_cifar`. Fashion-MNIST is read from
IDX files (gzipped or not), Debian's ``/usr/share/datasets/fashion-mnist`` first. ``synthetic`` is
random images in CIFAR's shapes. ImageNet streams from an ImageFolder with torchvision workers.

A file that cannot be read (truncated or corrupt: an interrupted download) is a :class:`BadDataFile`,
a ValueError of one line that names the file, what is wrong with it and how to get a good copy.
"""

from __future__ import annotations

import gzip
import logging
import math
import pickle
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DATASETS",
    "BadDataFile",
    "Data",
    "Split",
    "TensorLoader",
    "check_example_form",
    "check_subset_form",
    "example_count",
    "load_data",
    "make_loaders",
    "read_cifar",
    "read_idx",
]

log = logging.getLogger("convlab")

DATASETS = ("cifar10", "cifar100", "fashion_mnist", "synthetic", "imagenet")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
VAL_SPLIT_SEED = 20_231_124  # the validation split is the same for every run seed


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order and augmentation: ``seed * 100003 + epoch``, wrapped into
    the 64 bits a torch generator takes (seeds up to 2**63 are valid; the formula is kept so that
    recorded runs replay)."""
    return (seed * 100_003 + epoch) % 2**64


@dataclass
class Split:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass
class Data:
    """The splits of one dataset; ``val`` is None unless ``data.val_split`` holds part of train out."""

    name: str
    train: Any  # Split, or a streaming dataset for ImageNet
    val: Any
    test: Any
    num_classes: int


# ---------------------------------------------------------------------------------------- readers


class BadDataFile(ValueError):
    """A dataset file that cannot be read: one line naming the file, what is wrong with it and the fix.

    Raised in a DataLoader worker (ImageNet), torch re-raises it in the main process with the message
    ``"Caught BadDataFile in DataLoader worker process 0.\\nOriginal Traceback ...: <message>"``; that is cut
    back to the original message, so the command line still says one line and shows no traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message.rstrip().rpartition("BadDataFile: ")[2])


# What pickle.loads raises on bytes that are not a pickle: the documented UnpicklingError, EOFError,
# AttributeError, ImportError and IndexError, and on random bytes also ValueError, TypeError, KeyError,
# OverflowError and MemoryError (a corrupt memo index or length asks for a huge allocation).
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError, TypeError, KeyError,
                    OverflowError, MemoryError)  # fmt: skip


def read_cifar(folder: Path, train: bool, fine_labels: bool = False) -> Split:
    """Read CIFAR's python pickles: ``data_batch_1..5``/``test_batch`` (10) or ``train``/``test`` (100).

    Each file is a dict with ``b"data"`` (N x 3072 uint8, channel-major 32x32 planes) and
    ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100).
    """
    if fine_labels:
        files = [folder / ("train" if train else "test")]
    else:
        files = [folder / f"data_batch_{i}" for i in range(1, 6)] if train else [folder / "test_batch"]
    key, classes = (b"fine_labels", 100) if fine_labels else (b"labels", 10)
    kind = f"CIFAR-{classes}"
    fix = f"delete {folder} and run with data.download=true to download it again, or set data.root to a folder holding a good copy"
    images, labels = [], []
    for path in files:
        if not path.is_file():
            raise BadDataFile(f"{path} is missing (an interrupted download?); {fix}")
        try:
            batch = pickle.loads(path.read_bytes(), encoding="bytes")
        except _UNPICKLE_ERRORS:
            raise BadDataFile(f"{path} is not a {kind} pickle (truncated or corrupt); {fix}") from None
        data, y = (batch.get(b"data"), batch.get(key)) if isinstance(batch, dict) else (None, None)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3 * 32 * 32):
            raise BadDataFile(f"{path} is not a {kind} batch: b'data' is not an N x 3072 uint8 array; {fix}")
        try:
            y = np.asarray(y, dtype=np.int64)
        except (TypeError, ValueError):  # None, or not numbers
            y = None
        if y is None or y.shape != (len(data),) or (y.size and not 0 <= y.min() <= y.max() < classes):
            raise BadDataFile(f"{path} is not a {kind} batch: {key!r} is not {len(data)} labels in 0..{classes - 1}; {fix}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def _idx_fix(path: Path) -> str:
    """How to get a good copy of the IDX file ``path``."""
    if path.parent == DEBIAN_FASHION_MNIST:  # read before data.root, so only a reinstall mends it
        return "reinstall Debian's dataset-fashion-mnist (apt-get install --reinstall dataset-fashion-mnist)"
    return f"delete {path.parent} and run with data.download=true to download it again, or set data.root to a folder holding a good copy"


def read_idx(path: Path) -> Tensor:
    """Read an IDX file (MNIST format; ``.gz`` or plain): magic, dims, then big-endian uint8 data.

    Raises:
        BadDataFile: the file is not gzip (``.gz``), is truncated, or its header does not match its data.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error):  # not gzip, cut short, a corrupt deflate stream
        raise BadDataFile(f"{path} is not a readable gzip file (truncated or corrupt); {_idx_fix(path)}") from None
    if len(raw) < 4:
        raise BadDataFile(f"{path} holds {len(raw)} bytes, too few for an IDX header (truncated); {_idx_fix(path)}")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise BadDataFile(f"{path} is not a uint8 IDX file (magic {raw[:4].hex()}, expected 000008nn); {_idx_fix(path)}")
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise BadDataFile(f"{path} holds {len(raw)} bytes, too few for an IDX header of {ndim} dimensions (truncated); {_idx_fix(path)}")
    shape = struct.unpack(f">{ndim}I", raw[4:start])
    if math.prod(shape) != len(raw) - start:
        raise BadDataFile(
            f"{path}: IDX header says {'x'.join(map(str, shape))} but the file holds {len(raw) - start} bytes of data "
            f"(truncated or corrupt); {_idx_fix(path)}"
        )
    return torch.frombuffer(bytearray(raw[start:]), dtype=torch.uint8).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    return None


def _fashion_mnist(root: Path, download: bool) -> tuple[Split, Split]:
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    folders = [DEBIAN_FASHION_MNIST, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    for folder in folders:
        paths = [_find_idx(folder, stem) for stem in stems]
        if all(paths):
            break
    else:
        if not download:
            raise ValueError(
                f"Fashion-MNIST not found in {', '.join(map(str, folders))} and data.download=false; "
                "install Debian's dataset-fashion-mnist, set data.root, or set data.download=true"
            )
        _download("FashionMNIST", root)
        folder = root / "FashionMNIST" / "raw"
        paths = [_find_idx(folder, stem) for stem in stems]
    log.info("data: Fashion-MNIST from %s", folder)
    images_train, labels_train, images_test, labels_test = (read_idx(p) for p in paths)  # type: ignore[arg-type]
    for images, labels, image_path, label_path in ((images_train, labels_train, *paths[:2]), (images_test, labels_test, *paths[2:])):
        if images.dim() != 3:
            raise BadDataFile(f"{image_path} holds {tuple(images.shape)} values, not N x H x W images; {_idx_fix(image_path)}")
        if labels.shape != images.shape[:1] or (len(labels) and labels.max() >= 10):
            raise BadDataFile(
                f"{label_path} holds {tuple(labels.shape)} values, not the {len(images)} labels in 0..9 of {image_path}; "
                f"{_idx_fix(label_path)}"
            )
    return (
        Split(images_train.unsqueeze(1).contiguous(), labels_train.long()),
        Split(images_test.unsqueeze(1).contiguous(), labels_test.long()),
    )


def _download(dataset: str, root: Path) -> None:
    """torchvision's download into ``root``; a failure becomes one line naming the path and the options."""
    import torchvision.datasets as tvd

    log.info("data: downloading %s into %s", dataset, root)
    try:
        getattr(tvd, dataset)(str(root), train=True, download=True)
        getattr(tvd, dataset)(str(root), train=False, download=True)
    except Exception as ex:  # network errors come in many types
        reason = " ".join(str(ex).split())[:200]
        raise ValueError(
            f"{dataset} is not in {root} and could not be downloaded ({type(ex).__name__}: {reason}); "
            "put the files there or set data.root=PATH, or use data=fashion_mnist or data=synthetic"
        ) from None


def _cifar(name: str, root: Path, download: bool) -> tuple[Split, Split]:
    hundred = name == "cifar100"
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    if not folder.is_dir():
        if not download:
            raise ValueError(
                f"{name} not found at {folder} and data.download=false; set data.root=PATH to the folder holding "
                f"{folder.name}, set data.download=true, or use data=fashion_mnist or data=synthetic"
            )
        _download("CIFAR100" if hundred else "CIFAR10", root)
    log.info("data: %s from %s", name, folder)
    return read_cifar(folder, True, hundred), read_cifar(folder, False, hundred)


def _synthetic(cfg: Any, seed: int) -> tuple[Split, Split]:
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)

    def make(n: int) -> Split:
        return Split(
            torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8), torch.randint(0, cfg.num_classes, (n,), generator=g)
        )

    return make(cfg.train_size), make(cfg.test_size)


def _read_image(path: str) -> Any:
    """torchvision's PIL loader (an RGB image); a file PIL cannot read is a :class:`BadDataFile` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except OSError as ex:  # PIL's errors for an unknown, truncated or corrupt file are all OSErrors
        problem = (
            "is not an image PIL can identify (truncated or corrupt)"
            if isinstance(ex, UnidentifiedImageError)
            else f"is a truncated or corrupt image ({ex})"
        )
        raise BadDataFile(
            f"{path} {problem}; replace or delete it (ImageNet cannot be downloaded automatically), "
            "or set data.root to a folder holding a good copy"
        ) from None


def _image_folder(folder: Path, transform: Any) -> Any:
    import torchvision.datasets as tvd

    try:
        return tvd.ImageFolder(str(folder), transform=transform, loader=_read_image)
    except FileNotFoundError as ex:  # no class folders, or a class folder with no images
        raise BadDataFile(f"{folder} is not a complete ImageFolder ({' '.join(str(ex).split())}); set data.root to a good copy") from None


def _imagenet(cfg: Any, root: Path) -> tuple[Any, Any]:
    import torchvision.transforms.v2 as T

    folder = root / "imagenet"
    for split in ("train", "val"):
        if not (folder / split).is_dir():
            raise ValueError(
                f"ImageNet not found at {folder / split}; convlab reads an ImageFolder layout <data.root>/imagenet/{{train,val}}/<class>/*.JPEG "
                "(it cannot be downloaded automatically); set data.root=PATH"
            )
    size = cfg.image_size
    train_tf = T.Compose([T.RandomResizedCrop(size, antialias=True), T.PILToTensor()])
    eval_tf = T.Compose([T.Resize(round(size * 256 / 224), antialias=True), T.CenterCrop(size), T.PILToTensor()])
    return _image_folder(folder / "train", train_tf), _image_folder(folder / "val", eval_tf)


# ------------------------------------------------------------------------------------ load + split


def check_example_form(value: Any, key: str) -> None:
    """``value`` is a fraction in [0, 1) or a whole count; before any data is read."""
    # A float >= 1 is refused even when whole: 1.0 reads as "all of it", but would be a count of one.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value >= 1 and not isinstance(value, int)):
        raise ValueError(f"{key}={value!r} must be a fraction in [0, 1) or a whole count of examples (an int, e.g. 5000)")


def check_subset_form(value: Any, seed: Any = None) -> None:
    """``data.subset`` is null or a whole number >= 1, ``data.subset_seed`` null or a whole number >= 0; before any data is read."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"data.subset={value!r} must be a whole number of examples >= 1 (or null for all)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"data.subset_seed={seed!r} must be a whole number >= 0 (or null for the run's seed)")


def example_count(value: float | int, total: int, key: str) -> int:
    """A fraction (0 < v < 1) or a count (v >= 1) of ``total`` examples."""
    check_example_form(value, key)
    count = int(value) if value >= 1 else math.floor(value * total)
    if count == 0 and value > 0:  # silently none would mean no validation set (or no training data)
        raise ValueError(f"{key}={value!r} is less than one of the {total} examples; use at least {1 / total:.2g} or a count >= 1")
    return count


def _subset_indices(cfg: Any, n: int, seed: int) -> Tensor | None:
    """The ``data.subset`` examples of an ``n``-example training split, drawn with ``data.subset_seed``
    (null: the run's ``seed``); None for all."""
    if cfg.get("subset") is None:
        return None
    subset_seed = cfg.get("subset_seed")
    check_subset_form(cfg.subset, subset_seed)
    if cfg.subset > n:
        raise ValueError(f"data.subset={cfg.subset} is larger than the {n}-example {cfg.name} training split")
    draw = seed if subset_seed is None else subset_seed
    return torch.randperm(n, generator=torch.Generator().manual_seed(draw))[: cfg.subset]


def load_data(cfg: Any, seed: int = 0) -> Data:
    """Load ``cfg`` (the ``data`` config): train (after ``val_split`` and ``subset``), val and test splits.

    Raises:
        ValueError: unknown dataset, files missing with ``download=false`` (naming the path), a
            failed download, a truncated or corrupt file (:class:`BadDataFile`), or ``subset``/``val_split``
            larger than the split.
    """
    if cfg.name not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.name!r}; choose from: {', '.join(DATASETS)}")
    root = Path(str(cfg.root)).expanduser().resolve()  # data.root=2026 is a dir name too
    if cfg.name == "imagenet":
        if cfg.get("val_split"):  # held-out examples of a streamed folder: not built; ImageNet's val is its test split here
            raise ValueError(f"data.val_split={cfg.val_split} is not supported for imagenet; use data.val_split=0")
        train, test = _imagenet(cfg, root)
        chosen = _subset_indices(cfg, len(train), seed)
        if chosen is not None:
            from torch.utils.data import Subset

            train = Subset(train, chosen.tolist())
        log.info("data: imagenet train %d, test %d (streamed from %s)", len(train), len(test), root / "imagenet")
        return Data(cfg.name, train, None, test, cfg.num_classes)
    if cfg.name == "synthetic":
        train, test = _synthetic(cfg, seed)
    elif cfg.name == "fashion_mnist":
        train, test = _fashion_mnist(root, cfg.download)
    else:
        train, test = _cifar(cfg.name, root, cfg.download)
    if tuple(train.images.shape[1:2]) != (cfg.in_channels,):
        raise ValueError(f"data.in_channels={cfg.in_channels} but {cfg.name} images have {train.images.shape[1]} channels")

    n = len(train)
    n_val = example_count(cfg.val_split, n, "data.val_split")
    if n_val >= n:
        raise ValueError(f"data.val_split={cfg.val_split} holds out {n_val} of the {n} {cfg.name} training examples; it must leave some")
    val = None
    if n_val:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
        val, train = train.take(order[:n_val]), train.take(order[n_val:])
    chosen = _subset_indices(cfg, len(train), seed)
    if chosen is not None:
        train = train.take(chosen)
    log.info("data: %s train %d, val %d, test %d", cfg.name, len(train), len(val) if val else 0, len(test))
    return Data(cfg.name, train, val, test, cfg.num_classes)


# ----------------------------------------------------------------------------------------- loader


class TensorLoader:
    """Batches of a :class:`Split` held on the training device, cut by index.

    Per epoch a generator seeded by ``(seed, epoch)`` draws the order and, for training, each
    example's crop offset and flip, for the whole *global* batch; under ``torchrun`` each rank
    then keeps its slice ``[rank::world_size]``, so N processes see exactly the batches one
    process would. Augmentation (random crop of a zero-padded image, horizontal flip) runs on
    whole uint8 batches on the device, then normalisation in float32.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        train: bool,
        device: torch.device,
        mean: list[float],
        std: list[float],
        image_size: int,
        crop_padding: int = 0,
        flip: bool = False,
        seed: int = 0,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.train, self.device = batch_size, train, device
        self.crop_padding, self.flip = (crop_padding, flip) if train else (0, False)
        self.seed, self.epoch, self.rank, self.world_size = seed, 0, rank, world_size
        self.image_size = image_size
        self.channels_last = channels_last
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, device=device).view(shape) * 255
        self.std = torch.tensor(std, device=device).view(shape) * 255

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.labels)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            b = len(index)
            if self.crop_padding:
                offsets = torch.randint(0, 2 * self.crop_padding + 1, (b, 2), generator=g)
            if self.flip:
                flips = torch.rand(b, generator=g) < 0.5
            local = slice(self.rank, None, self.world_size)
            # non_blocking: a plain copy to a GPU waits for the device to finish all queued work
            # (every step would wait for the one before); from pageable memory it is staged at once.
            index = index[local].to(self.device, non_blocking=True)
            x = self.images[index]  # (b, C, H, W) uint8
            if self.crop_padding:
                x = self._crop(x, offsets[local].to(self.device, non_blocking=True))
            if self.flip:
                x = torch.where(flips[local].to(self.device, non_blocking=True).view(-1, 1, 1, 1), x.flip(3), x)
            yield self._normalize(x), self.labels[index]

    def _crop(self, x: Tensor, offsets: Tensor) -> Tensor:
        """Per-example random crop: pad by p, then gather an H x W window at each example's offset."""
        p = self.crop_padding
        b, _, h, w = x.shape
        padded = F.pad(x, (p, p, p, p))  # (b, C, H+2p, W+2p)
        rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)).view(b, h, 1)
        cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)).view(b, 1, w)
        batch = torch.arange(b, device=x.device).view(b, 1, 1)
        # advanced indices on dims 0, 2, 3 -> (b, H, W, C): NHWC, i.e. channels_last after the permute
        return padded[batch, :, rows, cols].permute(0, 3, 1, 2)

    def _normalize(self, x: Tensor) -> Tensor:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.to(dtype=torch.float32, memory_format=memory_format)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        return ((x - self.mean) / self.std).contiguous(memory_format=memory_format)


class FolderLoader:
    """ImageNet-style streaming: torchvision ImageFolder + DataLoader workers, normalised on the device."""

    def __init__(self, dataset: Any, batch_size: int, *, train: bool, device: torch.device, mean: list[float], std: list[float],
                 flip: bool, seed: int, channels_last: bool, rank: int = 0, world_size: int = 1, workers: int = 8) -> None:  # fmt: skip
        from torch.utils.data import DataLoader, DistributedSampler, Subset

        if train:
            self.sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed, drop_last=True)
        else:  # every example once over all ranks: DistributedSampler pads by repeating examples
            dataset, self.sampler = Subset(dataset, range(rank, len(dataset), world_size)), None
        self.loader = DataLoader(dataset, max(1, batch_size // world_size), sampler=self.sampler, num_workers=workers, drop_last=train,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0)  # fmt: skip
        self.device, self.flip, self.channels_last, self.seed, self.train = device, flip and train, channels_last, seed, train
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        g = torch.Generator().manual_seed(epoch_seed(self.seed, getattr(self, "epoch", 0)))
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            if self.flip:
                x = torch.where((torch.rand(len(x), generator=g) < 0.5).to(self.device, non_blocking=True).view(-1, 1, 1, 1), x.flip(3), x)
            x = x.to(dtype=torch.float32, memory_format=memory_format)
            yield ((x - self.mean) / self.std), y.to(self.device, non_blocking=True)


def make_loaders(data: Data, cfg: Any, device: torch.device, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Train/val/test loaders for ``data`` with the ``cfg.trainer`` batch sizes and ``cfg.data`` augmentation."""
    trainer, dcfg = cfg.trainer, cfg.data
    common = {"device": device, "mean": list(dcfg.mean), "std": list(dcfg.std), "seed": cfg.seed, "channels_last": trainer.channels_last,
              "rank": rank, "world_size": world_size}  # fmt: skip
    if isinstance(data.train, Split):
        common["image_size"] = dcfg.image_size
        loaders = {"train": TensorLoader(data.train, trainer.batch_size, train=True, crop_padding=dcfg.augment.crop_padding,
                                         flip=dcfg.augment.flip, **common)}  # fmt: skip
        for name in ("val", "test"):
            split = getattr(data, name)
            if split is not None:
                loaders[name] = TensorLoader(split, trainer.eval_batch_size, train=False, **common)
        return loaders
    loaders = {"train": FolderLoader(data.train, trainer.batch_size, train=True, flip=dcfg.augment.flip, **common)}
    loaders["test"] = FolderLoader(data.test, trainer.eval_batch_size, train=False, flip=False, **common)
    return loaders
