"""The Source interface: what every kind of training data offers the pipeline and the data tools.

A `Source` is a list of images with integer labels:

  len(source), source.num_classes, source.image_size (declared (h, w) or None), source.labels()
  source.where(index)      file and record of a sample, for messages
  source.samples(indices)  (index, encoded bytes or None, label, problem or None) in order
  source.dataset(...)      a mindspore.dataset of (data, label, index) rows, sharded by rank
  source.check(report)     structural checks of the folder (datainfo)

The kinds are src.data.face_rec (RecordIO) and src.data.sources (ImageFolder, MindRecord), which
also opens a folder by its kind and holds `scan`, the one decode/verify loop of the data tools.
This module stands apart so that every kind can build on it without an import circle.
"""
import numpy as np

from src.data.images import why_undecodable
from src.errors import ArcFaceError


class Source:
    """The interface (see the module docstring). Random-access kinds implement `read`; `samples`
    and `dataset` are built on it."""

    kind = ""
    path = ""
    num_classes = 0
    image_size = None     # (height, width) declared by a `property` file
    property_path = None  # that file
    counts = None         # images per label, when the folder declares them (MindRecord)

    def __len__(self):
        raise NotImplementedError

    def labels(self):
        raise NotImplementedError

    def where(self, index):
        return f"{self.path}: image {index}"

    def read(self, index):
        """Encoded bytes of sample `index`; an ArcFaceError naming it when it cannot be read."""
        raise NotImplementedError

    def samples(self, indices=None):
        labels = self.labels()
        for index in range(len(self)) if indices is None else indices:
            index = int(index)
            try:
                yield index, self.read(index), int(labels[index]), None
            except ArcFaceError as exc:
                yield index, None, int(labels[index]), str(exc)

    def key(self, index):
        """The identifier a converted copy keeps for sample `index` (RecordIO: its record key)."""
        return int(index)

    def byte_sizes(self, enough):
        """(total bytes of the encoded images, largest one or an upper bound); counting may stop
        once the total reaches `enough`."""
        raise NotImplementedError

    def problem(self, index, data):
        """Why sample `index` (whose bytes were `data`) is unusable, for messages."""
        if data is None or len(data) == 0:
            try:
                data = self.read(int(index))
            except ArcFaceError as exc:
                return str(exc)
            except NotImplementedError:
                return "no image bytes"
        return f"{self.where(int(index))}: {why_undecodable(data)}"

    def dataset(self, num_shards=1, shard_id=0, shuffle=True, workers=1):
        """(data, label, index) rows. One reader thread whatever `workers`: reading a sample's bytes
        takes microseconds, and Python reader threads next to the Python decoder threads fight
        over the GIL (two of each ran 2-6x slower than one reader; bench/README.md)."""
        import mindspore.dataset as ds
        shard = {"num_shards": num_shards, "shard_id": shard_id} if num_shards > 1 else {}
        return ds.GeneratorDataset(_RandomAccess(self), column_names=["data", "label", "index"], shuffle=shuffle,
                                   num_parallel_workers=1, python_multiprocessing=False, **shard)

    def check_labels(self):
        """Raise an ArcFaceError naming the first sample whose label does not fit the declared classes."""

    def check(self, report, progress=False):
        """Structural checks of the folder; findings go to `report` (datainfo's Report). Unlike
        training, nothing is raised for what can be reported."""


class _RandomAccess:
    """GeneratorDataset source over a random-access Source: (bytes as uint8, int32 label, int64
    index). A sample that cannot be read gives empty bytes; the decoder then names it."""

    def __init__(self, source):
        self.source = source
        self.labels = source.labels()

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        index = int(index)
        try:
            data = np.frombuffer(self.source.read(index), dtype=np.uint8)
        except ArcFaceError:
            data = np.zeros(0, np.uint8)
        return data, np.int32(self.labels[index]), np.int64(index)
