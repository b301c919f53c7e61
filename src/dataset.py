"""Training data sources and the `mindspore.dataset` pipeline built on them.

Sources give random access to (encoded image bytes, integer label):
- a RecordIO folder (`train.rec` + `train.idx` [+ `property`]), read by `src.recordio`;
- an ImageFolder: one sub-folder per identity, numeric folder names sorted numerically.
The pipeline decodes, flips at random, normalises to (x - 127.5) / 127.5 and batches, with
parallel workers, and shards by rank in distributed training.
"""
import os

import cv2
import numpy as np

from src.errors import ArcFaceError
from src.recordio import FaceRecordDataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
IMAGE_SIZE = (112, 112)


class ImageFolderSource:
    """One sub-folder per identity. Folder names that are all integers are ordered numerically
    (so '10' follows '9'), others lexicographically; the label is the position in that order."""

    def __init__(self, root):
        self.root = root
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        if all(c.isdigit() for c in classes):
            classes.sort(key=int)
        self.classes = classes
        self.files, labels = [], []
        for label, name in enumerate(classes):
            folder = os.path.join(root, name)
            images = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
            self.files.extend(os.path.join(folder, f) for f in images)
            labels.extend([label] * len(images))
        self._labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(classes)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index]
        try:
            with open(path, "rb") as fh:
                return fh.read(), int(self._labels[index])
        except OSError as exc:
            raise ArcFaceError(f"cannot read image {path}: {exc.strerror}") from None

    def labels(self):
        return self._labels


def detect_kind(path):
    """'recordio' or 'imagefolder'; a clear error for anything else."""
    if not path:
        raise ArcFaceError("no training data given: pass --data_url DIR")
    if not os.path.isdir(path):
        raise ArcFaceError(f"training data folder not found: {path}")
    has_rec = os.path.isfile(os.path.join(path, "train.rec"))
    has_idx = os.path.isfile(os.path.join(path, "train.idx"))
    if has_rec and has_idx:
        return "recordio"
    if has_rec != has_idx:
        missing = "train.idx" if has_rec else "train.rec"
        raise ArcFaceError(f"{path} has {'train.rec' if has_rec else 'train.idx'} but no {missing}")
    if any(d.is_dir() and not d.name.startswith(".") for d in os.scandir(path)):
        return "imagefolder"
    raise ArcFaceError(f"{path} holds neither train.rec/train.idx nor one sub-folder per identity")


def open_source(path):
    """The random-access source for a training folder, checked to be non-empty."""
    kind = detect_kind(path)
    source = FaceRecordDataset(path) if kind == "recordio" else ImageFolderSource(path)
    if len(source) == 0:
        raise ArcFaceError(f"training data {path} contains no images")
    source.kind = kind
    return source


def resolve_num_classes(source, requested, path=""):
    """The dataset's own count when `requested` is 0; an error when the labels do not fit."""
    labels = source.labels()
    if labels.min() < 0:
        raise ArcFaceError(f"training data {path} has a negative label ({labels.min()})")
    needed = int(labels.max()) + 1
    own = max(int(source.num_classes or 0), needed)
    if requested and requested < needed:
        raise ArcFaceError(f"--num_classes {requested} is smaller than the labels in {path} "
                           f"(largest label {needed - 1}, so at least {needed} classes)")
    return requested or own


class _Samples:
    """GeneratorDataset source: encoded bytes as a uint8 array and an int32 label."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        data, label = self.source[int(index)]
        return np.frombuffer(data, dtype=np.uint8), np.int32(label)


def _first_image_size(source, path):
    data, _ = source[0]
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ArcFaceError(f"the first image of {path} cannot be decoded")
    return image.shape[:2]


def create_train_dataset(source, batch_size, rank=0, group_size=1, num_workers=4, shuffle=True,
                         path=""):
    """Batches of (float32 NCHW images in [-1, 1], int32 labels), drop_remainder, sharded by rank."""
    import mindspore.dataset as ds
    import mindspore.dataset.vision as vision

    per_shard = len(source) // group_size
    if per_shard < batch_size:
        raise ArcFaceError(f"training data {path} has {len(source)} images, {per_shard} per device: "
                           f"fewer than one batch of {batch_size}")
    dataset = ds.GeneratorDataset(_Samples(source), column_names=["image", "label"], shuffle=shuffle,
                                  num_shards=group_size if group_size > 1 else None,
                                  shard_id=rank if group_size > 1 else None,
                                  python_multiprocessing=False)
    transforms = [vision.Decode()]
    if _first_image_size(source, path) != IMAGE_SIZE:
        transforms.append(vision.Resize(IMAGE_SIZE))
    transforms += [vision.RandomHorizontalFlip(0.5),
                   vision.Normalize(mean=[127.5] * 3, std=[127.5] * 3),
                   vision.HWC2CHW()]
    workers = max(1, min(num_workers, os.cpu_count() or 1))
    dataset = dataset.map(operations=transforms, input_columns="image", num_parallel_workers=workers)
    return dataset.batch(batch_size, drop_remainder=True)
