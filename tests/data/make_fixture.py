"""Build the interop fixture `tests/data/mxnet_rec/` byte by byte from the documented RecordIO layout.

Deliberately independent of src/data/recordio.py: every byte is laid out here with `struct`, the way
MXNet's `MXIndexedRecordIO.write_idx` + `recordio.pack_img` store an insightface training set.

Container (dmlc-core RecordIO):
  each physical record: uint32 magic 0xced7230a, uint32 lrecord = cflag << 29 | length,
  `length` payload bytes, zero padding to a multiple of 4.
  A payload holding the magic word at a 4-aligned position (relative to the payload start) is
  cut there and the magic dropped: pieces are stored with cflag 1 (first), 2 (middle), 3 (last);
  a reader puts the magic back between pieces. cflag 0 = a whole record.
  The .idx file has one `key<TAB>offset` line per logical record, in write order.
Payload (pack / pack_img):
  struct '<IfQQ' flag, label, id, id2; if flag > 0, `flag` float32 label values follow (the
  scalar label field is then 0); then the encoded image bytes (none for meta records).
insightface layout:
  key 0: header record, flag 2, label [first_identity_key, end_key], no image;
  keys 1 .. first_identity_key-1: images (label = class id; here key 3 carries an array label
  [class, 7.0] and key 4 a JPEG whose comment segment contains the magic twice at aligned
  positions and once unaligned, so it is stored as three pieces);
  keys first_identity_key .. end_key-1: one record per class, label [first_image_key, end_image_key).
  `property`: num_classes,height,width.

Outputs (committed; re-run only to regenerate):
  mxnet_rec/train.rec, mxnet_rec/train.idx, mxnet_rec/property
  mxnet_rec_expected.json   keys, labels, sha256 of each image's bytes, physical layout
  mxnet_rec_pixels.npy      decoded pixels of the images (N x 8 x 8 x 3, uint8, RGB)

  python tests/data/make_fixture.py
"""
import hashlib
import json
import os
import struct

import cv2
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "mxnet_rec")
MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)


def payload(label, image=b"", id_=0, id2=0):
    """pack(): scalar label in the struct, or flag = n and n float32 values after it."""
    if np.ndim(label) == 0:
        return struct.pack("<IfQQ", 0, float(label), id_, id2) + image
    values = [float(v) for v in label]
    return struct.pack("<IfQQ", len(values), 0.0, id_, id2) + struct.pack(f"<{len(values)}f", *values) + image


def physical(cflag, piece):
    return struct.pack("<II", MAGIC, (cflag << 29) | len(piece)) + piece + b"\0" * ((4 - len(piece) % 4) % 4)


def split(data):
    """Pieces of a payload cut at every 4-aligned magic word (the magic itself dropped)."""
    pieces, start = [], 0
    for i in range(0, len(data) - 3, 4):
        if i >= start and data[i:i + 4] == MAGIC_BYTES:
            pieces.append(data[start:i])
            start = i + 4
    pieces.append(data[start:])
    return pieces


def record_bytes(data):
    pieces = split(data)
    if len(pieces) == 1:
        return physical(0, data), [(0, len(data))]
    layout = []
    out = b""
    for n, piece in enumerate(pieces):
        cflag = 1 if n == 0 else 3 if n == len(pieces) - 1 else 2
        out += physical(cflag, piece)
        layout.append((cflag, len(piece)))
    return out, layout


def tiny_images():
    """Five 8x8 images: four JPEGs (one with a comment segment holding the magic) and one PNG."""
    y, x = np.mgrid[0:8, 0:8]
    rgb = [
        np.stack([x * 32, y * 32, np.full((8, 8), 128)], -1),
        np.stack([255 - x * 30, np.full((8, 8), 60), y * 30], -1),
        np.stack([(x + y) * 16, 255 - (x + y) * 16, np.full((8, 8), 200)], -1),
        np.stack([np.full((8, 8), 30), x * 20 + 40, 250 - y * 25], -1),
        np.stack([(x * y) * 4, np.full((8, 8), 90), 255 - x * 8], -1),
    ]
    encoded = []
    for n, image in enumerate(rgb):
        bgr = np.ascontiguousarray(image.astype(np.uint8)[:, :, ::-1])
        if n == 4:
            encoded.append(cv2.imencode(".png", bgr)[1].tobytes())
        else:
            encoded.append(cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    # Key 4: a comment segment (FF FE, big-endian length incl. itself) right after SOI. In the
    # payload, the comment text starts at 24 (header) + 2 (SOI) + 2 (FF FE) + 2 (length) = 30,
    # so the magic lands at 32 and 40 (aligned: split) and at 47 (unaligned: kept).
    text = b"xy" + MAGIC_BYTES + b"1234" + MAGIC_BYTES + b"zzw" + MAGIC_BYTES + b"!"
    comment = b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text
    encoded[3] = encoded[3][:2] + comment + encoded[3][2:]
    return encoded


def main():
    os.makedirs(OUT, exist_ok=True)
    images = tiny_images()
    labels = [0, 0, 1, 2, 2]
    record_labels = [0.0, 0.0, [1.0, 7.0], 2.0, 2.0]  # key 3: array label, class first
    num_classes = 3
    first_identity = len(images) + 1
    end = first_identity + num_classes

    records = [(0, payload([float(first_identity), float(end)]))]
    for n, image in enumerate(images):
        key = n + 1
        records.append((key, payload(record_labels[n], image, id_=key)))
    for c in range(num_classes):
        keys = [n + 1 for n, lab in enumerate(labels) if lab == c]
        records.append((first_identity + c, payload([float(keys[0]), float(keys[-1] + 1)])))

    rec, idx, layout = b"", "", {}
    for key, data in records:
        blob, pieces = record_bytes(data)
        layout[str(key)] = {"offset": len(rec), "pieces": pieces, "payload_size": len(data)}
        idx += f"{key}\t{len(rec)}\n"
        rec += blob
    assert [p[0] for p in layout["4"]["pieces"]] == [1, 2, 3], layout["4"]

    with open(os.path.join(OUT, "train.rec"), "wb") as fh:
        fh.write(rec)
    with open(os.path.join(OUT, "train.idx"), "w", newline="\n") as fh:
        fh.write(idx)
    with open(os.path.join(OUT, "property"), "w", newline="\n") as fh:
        fh.write(f"{num_classes},8,8\n")

    pixels = np.stack([cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR),
                                    cv2.COLOR_BGR2RGB) for b in images])
    np.save(os.path.join(HERE, "mxnet_rec_pixels.npy"), pixels)
    expected = {
        "num_classes": num_classes,
        "image_keys": list(range(1, len(images) + 1)),
        "labels": labels,
        "formats": ["png" if b.startswith(b"\x89PNG") else "jpeg" for b in images],
        "image_sizes": [len(b) for b in images],
        "sha256": [hashlib.sha256(b).hexdigest() for b in images],
        "header": [first_identity, end],
        "identity_ranges": [[min(k for k, lab in zip(range(1, 6), labels) if lab == c),
                             max(k for k, lab in zip(range(1, 6), labels) if lab == c) + 1]
                            for c in range(num_classes)],
        "records": layout,
    }
    with open(os.path.join(HERE, "mxnet_rec_expected.json"), "w", newline="\n") as fh:
        json.dump(expected, fh, indent=1)
        fh.write("\n")
    print(f"wrote {OUT}: {len(rec)} bytes, {len(records)} records")


if __name__ == "__main__":
    main()
