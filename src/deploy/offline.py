"""The file layout between preprocess.py, the C++ inference app and postprocess.py.

preprocess writes, for a verification set `<name>.bin` with 2N images:
  <result_dir>/<name>_<k:05d>.bin        float32 [B, 3, 112, 112], images k*B .. k*B+B-1
  <result_dir>/<name>_flip_<k:05d>.bin   the same images flipped horizontally
  <label_dir>/<name>_issame_list.npy     the N pair labels
  <label_dir>/<name>_meta.json           {"images": 2N, "batch_size": B}
(normalised (x - 127.5) / 127.5; the last batch is padded by repeating its last image, so a
static-batch model works). The app writes <output_dir>/<input stem>_0.bin with float32 [B, D].
"""
import glob
import json
import os

import numpy as np

from src.data.bins import load_bin
from src.errors import ArcFaceError


def batch_names(name, batches):
    return ([f"{name}_{k:05d}" for k in range(batches)], [f"{name}_flip_{k:05d}" for k in range(batches)])


def write_batches(bin_path, result_dir, label_dir, batch_size, progress=False):
    """Write the normalised batches and labels of one verification set; returns its name."""
    from tqdm import tqdm
    if batch_size < 1:
        raise ArcFaceError(f"--batch_size must be positive, got {batch_size}")
    name = os.path.splitext(os.path.basename(bin_path))[0]
    images, issame = load_bin(bin_path, progress=progress)
    os.makedirs(result_dir, exist_ok=True)
    os.makedirs(label_dir, exist_ok=True)
    batches = -(-len(images) // batch_size)
    plain, flipped = batch_names(name, batches)
    for k in tqdm(range(batches), desc=f"writing {name}", disable=None if progress else True):
        batch = images[k * batch_size:(k + 1) * batch_size]
        if len(batch) < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), axis=0)])
        data = (batch.astype(np.float32) - 127.5) / 127.5
        data = np.ascontiguousarray(data.transpose(0, 3, 1, 2))
        data.tofile(os.path.join(result_dir, plain[k] + ".bin"))
        np.ascontiguousarray(data[:, :, :, ::-1]).tofile(os.path.join(result_dir, flipped[k] + ".bin"))
    np.save(os.path.join(label_dir, f"{name}_issame_list.npy"), issame)
    with open(os.path.join(label_dir, f"{name}_meta.json"), "w", encoding="utf-8") as fh:
        json.dump({"images": int(len(images)), "batch_size": int(batch_size)}, fh)
    return name


def read_embeddings(result_dir, label_dir, name, batch_size=None):
    """(emb, emb_flip, issame) rebuilt from the app's `<stem>_0.bin` outputs."""
    meta_path = os.path.join(label_dir, f"{name}_meta.json")
    issame_path = os.path.join(label_dir, f"{name}_issame_list.npy")
    for path in (meta_path, issame_path):
        if not os.path.isfile(path):
            raise ArcFaceError(f"{path} not found: run preprocess.py for {name} first")
    count, batch = _read_layout(meta_path)
    if batch_size and batch_size != batch:
        raise ArcFaceError(f"--batch_size {batch_size} does not match the preprocessed batches ({batch})")
    if not os.path.isdir(result_dir) or not glob.glob(os.path.join(result_dir, f"{name}_*_0.bin")):
        raise ArcFaceError(f"no inference results {name}_*_0.bin in {result_dir}")
    batches = -(-count // batch)
    outputs = []
    for names in batch_names(name, batches):
        parts = []
        for stem in names:
            path = os.path.join(result_dir, stem + "_0.bin")
            if not os.path.isfile(path):
                raise ArcFaceError(f"missing inference result {path}")
            data = np.fromfile(path, dtype=np.float32)
            if data.size == 0 or data.size % batch:
                raise ArcFaceError(f"{path} holds {data.size} floats, not a multiple of the batch size {batch}")
            parts.append(data.reshape(batch, -1))
        dims = {p.shape[1] for p in parts}
        if len(dims) != 1:
            raise ArcFaceError(f"inference results of {name} in {result_dir} have mixed sizes {sorted(dims)}")
        outputs.append(np.concatenate(parts)[:count])
    issame = _read_issame(issame_path)
    if len(issame) * 2 != count:
        raise ArcFaceError(f"{issame_path}: {len(issame)} pairs for {count} images")
    return outputs[0], outputs[1], issame


def _read_layout(meta_path):
    """(images, batch_size) from preprocess's `<name>_meta.json`, checked."""
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ArcFaceError(f"{meta_path}: not readable JSON ({exc})") from None
    values = {key: meta.get(key) if isinstance(meta, dict) else None for key in ("images", "batch_size")}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArcFaceError(f"{meta_path}: '{key}' must be a positive integer, found {value!r} "
                               f"(run preprocess.py again)")
    if values["images"] % 2:
        raise ArcFaceError(f"{meta_path}: {values['images']} images cannot form pairs")
    return values["images"], values["batch_size"]


def _read_issame(path):
    """The pair labels: a 1-D boolean (or 0/1) array, never a pickle."""
    try:
        issame = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ArcFaceError(f"{path}: not a readable .npy array ({exc})") from None
    flags = issame.dtype.kind == "b" or (issame.dtype.kind in "iu" and np.isin(issame, (0, 1)).all())
    if issame.ndim != 1 or not flags:
        raise ArcFaceError(f"{path}: expected a 1-D array of booleans, found {issame.dtype} {issame.shape}")
    return issame.astype(bool)
