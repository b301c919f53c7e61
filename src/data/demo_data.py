"""A small synthetic face-identity dataset in the real formats, made deterministically from a seed.

Each identity is a set of continuous facial attributes (face shape, skin, hair, eye spacing and
colour, brows, nose, mouth, ...). Each image renders the identity's attributes, slightly perturbed,
under nuisance variation (position, rotation, scale, lighting, background, noise, JPEG quality).
A network has to learn which variations change identity and which do not, so verification works
on identities it never saw. Output:
  <out>/train/train.rec, train.idx, property    RecordIO, insightface layout (header record)
  <out>/demo.bin                                 verification pairs of held-out identities

  python -m src.data.demo_data --output demo_data
"""
import argparse
import os
import sys

import cv2
import numpy as np
from tqdm import tqdm

from src.data.bins import save_bin
from src.data.face_rec import write_face_dataset

SIZE = 112
_SS = 2  # render at 2x and downsample: anti-aliased edges


def random_identity(rng):
    """Attributes of one synthetic person (all continuous, in ranges that keep faces plausible)."""
    return {
        "face_w": rng.uniform(30, 42), "face_h": rng.uniform(40, 52),
        "skin": rng.uniform([110, 80, 60], [235, 205, 190]),
        "hair": rng.uniform(0, 255, 3), "hairline": rng.uniform(0.15, 0.55),
        "hair_side": rng.uniform(0.0, 1.0),
        "eye_dx": rng.uniform(12, 20), "eye_y": rng.uniform(-10, -2), "eye_r": rng.uniform(3, 6),
        "iris": rng.uniform(0, 200, 3),
        "brow_dy": rng.uniform(5, 11), "brow_tilt": rng.uniform(-0.35, 0.35), "brow_w": rng.uniform(1.5, 4),
        "nose_len": rng.uniform(8, 18), "nose_w": rng.uniform(3, 9),
        "mouth_y": rng.uniform(16, 26), "mouth_w": rng.uniform(8, 18), "mouth_curve": rng.uniform(-4, 5),
        "lip": rng.uniform([110, 40, 40], [210, 110, 120]),
        "mark": rng.uniform(-1, 1, 2), "mark_on": rng.uniform() < 0.5,
    }


def render(identity, rng):
    """One 112x112 RGB uint8 image of `identity` with random nuisance variation."""
    s = _SS
    jitter = lambda v, scale: v + rng.normal(0, scale)  # noqa: E731  small intra-identity change
    bg = rng.uniform(0, 255, 3)
    canvas = np.empty((SIZE * s, SIZE * s, 3), np.float32)
    canvas[:] = bg
    cx, cy = SIZE * s / 2, SIZE * s / 2 + 4 * s

    def pt(x, y):
        return int(round(cx + x * s)), int(round(cy + y * s))

    fw, fh = jitter(identity["face_w"], 0.6), jitter(identity["face_h"], 0.6)
    hair = tuple(float(c) for c in np.clip(identity["hair"] + rng.normal(0, 6, 3), 0, 255))
    skin = tuple(float(c) for c in np.clip(identity["skin"] + rng.normal(0, 6, 3), 0, 255))
    # hair: a larger ellipse behind the face, cut by the hairline
    cv2.ellipse(canvas, pt(0, -fh * 0.15), (int((fw + 5) * s), int((fh + 6) * s)), 0, 0, 360, hair, -1)
    cv2.ellipse(canvas, pt(0, 0), (int(fw * s), int(fh * s)), 0, 0, 360, skin, -1)
    top = -fh + 2 * fh * identity["hairline"] * 0.5
    side = identity["hair_side"]
    cv2.ellipse(canvas, pt((side - 0.5) * fw * 0.6, top - fh * 0.25), (int(fw * 1.05 * s), int(fh * 0.45 * s)),
                (side - 0.5) * 30, 0, 360, hair, -1)
    # eyes, irises, brows
    eye_dx, eye_y, eye_r = identity["eye_dx"], jitter(identity["eye_y"], 0.3), identity["eye_r"]
    iris = tuple(float(c) for c in identity["iris"])
    for sign in (-1, 1):
        ex = sign * jitter(eye_dx, 0.3)
        cv2.ellipse(canvas, pt(ex, eye_y), (int(eye_r * 1.6 * s), int(eye_r * s)), 0, 0, 360,
                    (245, 245, 245), -1)
        cv2.circle(canvas, pt(ex + rng.normal(0, 0.6), eye_y), int(eye_r * 0.75 * s), iris, -1)
        cv2.circle(canvas, pt(ex, eye_y), max(1, int(eye_r * 0.3 * s)), (10, 10, 10), -1)
        by = eye_y - identity["brow_dy"]
        tilt = identity["brow_tilt"] * sign * 8
        cv2.line(canvas, pt(ex - 7, by + tilt), pt(ex + 7, by - tilt), hair,
                 max(1, int(identity["brow_w"] * s)), cv2.LINE_AA)
    # nose
    nl, nw = identity["nose_len"], identity["nose_w"]
    shade = tuple(float(c) * 0.75 for c in skin)
    nose = np.array([pt(0, eye_y + 2), pt(-nw, eye_y + nl), pt(nw, eye_y + nl)], np.int32)
    cv2.fillConvexPoly(canvas, nose, shade, cv2.LINE_AA)
    # mouth: a parabola whose curvature is part of the identity (plus a little expression)
    mw, my = identity["mouth_w"], identity["mouth_y"]
    curve = identity["mouth_curve"] + rng.normal(0, 0.8)
    xs = np.linspace(-mw, mw, 12)
    mouth = np.array([pt(x, my + curve * ((x / mw) ** 2 - 0.5)) for x in xs], np.int32)
    cv2.polylines(canvas, [mouth], False, tuple(float(c) for c in identity["lip"]), int(3 * s), cv2.LINE_AA)
    if identity["mark_on"]:
        mx, my2 = identity["mark"]
        cv2.circle(canvas, pt(mx * fw * 0.6, 8 + my2 * 6), int(1.8 * s), (40, 30, 30), -1, cv2.LINE_AA)

    # nuisance: similarity transform, lighting, blur, noise
    angle, scale = rng.normal(0, 5), 1 + rng.normal(0, 0.04)
    shift = rng.normal(0, 2.5, 2) * s
    matrix = cv2.getRotationMatrix2D((SIZE * s / 2, SIZE * s / 2), angle, scale)
    matrix[:, 2] += shift
    canvas = cv2.warpAffine(canvas, matrix, (SIZE * s, SIZE * s), borderMode=cv2.BORDER_REPLICATE)
    image = cv2.resize(canvas, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    gradient = np.linspace(-1, 1, SIZE)[None, :, None] * rng.normal(0, 12)
    image = image * rng.uniform(0.75, 1.2) + rng.normal(0, 12) + gradient
    if rng.uniform() < 0.3:
        image = cv2.GaussianBlur(image, (3, 3), rng.uniform(0.3, 1.0))
    image = image + rng.normal(0, rng.uniform(2, 7), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode_jpeg(rgb, quality):
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    assert ok
    return data.tobytes()


def make_demo_data(output, num_train_ids=300, images_per_id=20, num_test_ids=100, num_pairs=600, seed=0,
                   progress=True):
    """Write the training RecordIO folder and the held-out verification .bin; returns their paths."""
    rng = np.random.default_rng(seed)
    identities = [random_identity(rng) for _ in range(num_train_ids + num_test_ids)]
    train_ids, test_ids = identities[:num_train_ids], identities[num_train_ids:]

    samples = []
    bar = tqdm(total=num_train_ids * images_per_id + 2 * num_pairs, desc="demo data",
               disable=None if progress else True)
    for label, identity in enumerate(train_ids):
        for _ in range(images_per_id):
            samples.append((encode_jpeg(render(identity, rng), rng.integers(70, 96)), label))
            bar.update(1)
    train_dir = os.path.join(output, "train")
    os.makedirs(train_dir, exist_ok=True)
    write_face_dataset(train_dir, samples)

    images, issame = [], []
    for k in range(num_pairs):
        same = k % 2 == 0
        a = int(rng.integers(num_test_ids))
        b = a if same else int((a + rng.integers(1, num_test_ids)) % num_test_ids)
        for index in (a, b):
            images.append(encode_jpeg(render(test_ids[index], rng), rng.integers(70, 96)))
            bar.update(1)
        issame.append(same)
    bar.close()
    bin_path = os.path.join(output, "demo.bin")
    save_bin(bin_path, images, issame)
    return train_dir, bin_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_data", help="output folder")
    parser.add_argument("--train_ids", type=int, default=300, help="training identities")
    parser.add_argument("--images_per_id", type=int, default=20, help="training images per identity")
    parser.add_argument("--test_ids", type=int, default=100, help="held-out identities for verification")
    parser.add_argument("--pairs", type=int, default=600, help="verification pairs (half genuine)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    train_dir, bin_path = make_demo_data(args.output, args.train_ids, args.images_per_id, args.test_ids,
                                         args.pairs, args.seed)
    print(f"wrote {train_dir} ({args.train_ids} identities x {args.images_per_id} images) and {bin_path} "
          f"({args.pairs} pairs of {args.test_ids} held-out identities)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
