"""Clean a noisy training set with a sub-center ArcFace model (insightface's drop step), so that the
recipe for noisy labels is: train with --margin_type subcenter -> drop -> retrain with plain ArcFace.

  python -m src.subcenter_drop --ckpt outputs/sc/ArcFace-20_1000.ckpt --data_url /data/ms1mv0 \\
      --output /data/ms1mv0_drop75 --threshold 75
  python train.py --data_url /data/ms1mv0_drop75 --margin_type combined --margin arcface ...

For every class, with its K sub-centres (normalised rows of the head) and the normalised embeddings
of its images:
- each image votes for its nearest sub-centre; the one with the most votes is the class's dominant
  sub-centre (ties: the first);
- images further than --threshold degrees from the dominant sub-centre are dropped (they gather
  around the other sub-centres: mislabelled or noisy faces);
- a class left without images is dropped; the others are renumbered 0 .. C' - 1 in their order.

Writes to --output the cleaned set as RecordIO (train.rec, train.idx, property; insightface layout),
`dropped.tsv` (every dropped image: record key or file index, class, angle in degrees, where) and
`classes.tsv` (new class, original class). --list_only writes the list alone. The checkpoint may
come from several ranks: its head shards are merged. The images are embedded as they are (no flip),
as insightface does.
"""
import argparse
import itertools
import math
import os
import sys

import numpy as np

from src.cli import run_main
from src.errors import ArcFaceError


def dominant_and_angles(embeddings, centres):
    """(index of the dominant sub-centre, angle in degrees of each embedding to it) for one class:
    `embeddings` (n, D) and `centres` (K, D), both with unit rows."""
    votes = np.bincount(np.argmax(embeddings @ centres.T, axis=1), minlength=centres.shape[0])
    dominant = int(np.argmax(votes))
    cosines = np.clip(embeddings @ centres[dominant], -1.0, 1.0)
    return dominant, np.degrees(np.arccos(cosines))


def unit_rows(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def read_subcentres(ckpt):
    """(unit sub-centres (C, K, D), checkpoint meta) of a checkpoint trained with --margin_type
    subcenter; the head comes from the checkpoint or from the complete set of its head shards."""
    from src.checkpoint import read_checkpoint
    from src.config import read_record
    from src.heads import sharding
    from src.heads.classifier import merge_shards

    params, meta = read_checkpoint(ckpt)
    if "config" not in meta:
        raise ArcFaceError(f"{ckpt} records no training configuration: not a checkpoint of train.py")
    cfg = read_record(meta["config"], ckpt)
    if cfg.margin_type != "subcenter":
        raise ArcFaceError(f"{ckpt} was trained with --margin_type {cfg.margin_type}, not subcenter: it has one "
                           f"centre per class, nothing to drop by")
    if "head.weight" in params:
        weight = params["head.weight"].asnumpy()
    else:
        sets = sharding.complete_shard_sets(ckpt)
        if not sets:
            raise ArcFaceError(f"{ckpt} holds no classification head: neither head.weight nor a complete set of "
                               f"head shards next to it")
        weight = merge_shards([path for _, path in sorted(sets[max(sets)].items())])
    k = cfg.subcenter_k
    if weight.shape[0] != cfg.num_classes * k:
        raise ArcFaceError(f"{ckpt}: the head has {weight.shape[0]} rows, not {cfg.num_classes} classes x {k}")
    return unit_rows(weight.reshape(cfg.num_classes, k, -1)), meta


class Embedder:
    """The checkpoint's backbone on batches of decoded RGB images; unit embeddings (float64). Batches
    are padded to one size, so graph mode compiles once."""

    def __init__(self, ckpt, meta, batch_size):
        import mindspore as ms

        from src.checkpoint import load_backbone
        from src.models import get_backbone
        self.backbone = get_backbone(meta.get("network", "r100"), num_features=meta.get("num_features", 512),
                                     width=meta.get("width", 64))
        load_backbone(self.backbone, ckpt)
        self.backbone.set_train(False)
        self.batch_size, self.tensor = batch_size, ms.Tensor

    def __call__(self, images):
        batch = np.zeros((self.batch_size, 3) + images[0].shape[:2], np.float32)
        batch[:len(images)] = (np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) - 127.5) / 127.5
        return unit_rows(self.backbone(self.tensor(batch)).asnumpy()[:len(images)])


def classes_of(source, embed, batch_size, workers):
    """(label, [(index, encoded bytes)], unit embeddings (n, D)) per class, in label order."""
    from src.data.images import IMAGE_SIZE, resize
    from src.data.sources import scan

    def rows():
        order = np.argsort(np.asarray(source.labels()), kind="stable")
        batch = []
        for sample in itertools.chain(scan(source, order, workers=workers), [None]):
            if sample is not None:
                if sample.image is None:
                    raise ArcFaceError(f"{sample.problem} (list all bad images with python -m src.datainfo --verify)")
                batch.append(sample)
            if batch and (sample is None or len(batch) == batch_size):
                embeddings = embed([resize(s.image, IMAGE_SIZE) for s in batch])
                yield from ((s.label, s.index, s.data, e) for s, e in zip(batch, embeddings))
                batch = []

    for label, group in itertools.groupby(rows(), key=lambda row: row[0]):
        group = list(group)
        yield label, [(index, data) for _, index, data, _ in group], np.stack([e for *_, e in group])


def drop(ckpt, data_url, output, threshold=75.0, batch_size=64, list_only=False, workers=4, overwrite=False):
    """Clean `data_url` into `output` (see the module docstring); returns a summary dict."""
    from src.data.face_rec import write_face_dataset
    from src.data.sources import open_source

    if not 0.0 < threshold < 180.0 or not math.isfinite(threshold):
        raise ArcFaceError(f"--threshold must be an angle between 0 and 180 degrees, not {threshold:g}")
    if os.path.abspath(output) == os.path.abspath(data_url):
        raise ArcFaceError("--output must differ from --data_url")
    if not list_only and not overwrite and os.path.exists(os.path.join(output, "train.rec")):
        raise ArcFaceError(f"{output}/train.rec exists: pass --overwrite to replace it")
    centres, meta = read_subcentres(ckpt)
    source = open_source(data_url)
    largest = int(np.max(source.labels()))
    if largest >= centres.shape[0]:
        raise ArcFaceError(f"{data_url} has labels up to {largest}, but {ckpt} was trained on {centres.shape[0]} "
                           f"classes: another data set?")
    os.makedirs(output, exist_ok=True)
    embed = Embedder(ckpt, meta, batch_size)
    summary = {"images": 0, "kept": 0, "classes": 0, "kept_classes": 0}
    kept_classes, dropped = [], []

    def kept_samples():
        for label, samples, embeddings in classes_of(source, embed, batch_size, workers):
            _, angles = dominant_and_angles(embeddings, centres[label])
            keep = angles <= threshold
            summary["images"] += len(samples)
            summary["classes"] += 1
            summary["kept"] += int(keep.sum())
            dropped.extend((samples[i][0], label, angles[i]) for i in np.flatnonzero(~keep))
            if keep.any():
                kept_classes.append(label)
                yield from ((samples[i][1], len(kept_classes) - 1) for i in np.flatnonzero(keep))

    if list_only:
        for _ in kept_samples():
            pass
    else:
        try:
            write_face_dataset(output, kept_samples())
        except ArcFaceError as exc:
            if "no samples to write" not in str(exc):
                raise
            raise ArcFaceError(f"every image is further than {threshold:g} degrees from its class's dominant "
                               f"sub-centre: nothing to write (a larger --threshold?)") from None
        _write_lines(os.path.join(output, "classes.tsv"), "new_class\toriginal_class",
                     (f"{new}\t{old}" for new, old in enumerate(kept_classes)))
    _write_lines(os.path.join(output, "dropped.tsv"), "key\tclass\tdegrees\twhere",
                 (f"{source.key(i)}\t{label}\t{angle:.2f}\t{source.where(i)}" for i, label, angle in dropped))
    summary["kept_classes"] = len(kept_classes)
    return summary


def _write_lines(path, header, lines):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(header + "\n")
        fh.writelines(line + "\n" for line in lines)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint of a --margin_type subcenter run (rank 0's)")
    parser.add_argument("--data_url", required=True, help="the training set it was trained on")
    parser.add_argument("--output", required=True, help="folder for the cleaned RecordIO set and the lists")
    parser.add_argument("--threshold", type=float, default=75.0, help="largest angle in degrees to the class's "
                                                                      "dominant sub-centre kept (default: 75)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--workers", type=int, default=4, help="decoding threads (default: 4)")
    parser.add_argument("--device_target", default="CPU", choices=("Ascend", "GPU", "CPU"))
    parser.add_argument("--list_only", action="store_true", help="write dropped.tsv only, no cleaned set")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cleaned set in --output")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.workers < 1:
        raise ArcFaceError("--batch_size and --workers must be at least 1")
    from src import runtime
    runtime.setup(args.device_target)
    s = drop(args.ckpt, args.data_url, args.output, args.threshold, args.batch_size, args.list_only, args.workers,
             args.overwrite)
    print(f"kept {s['kept']} of {s['images']} images and {s['kept_classes']} of {s['classes']} classes "
          f"(dropped {s['images'] - s['kept']} further than {args.threshold:g} degrees from their class's dominant "
          f"sub-centre); wrote {args.output}: " + ("dropped.tsv" if args.list_only else
                                                  "train.rec, train.idx, property, classes.tsv, dropped.tsv"))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
