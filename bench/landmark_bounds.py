"""What landmarks the detector returns: the figures behind the bounds of src/data/align.py (not a test).

  python bench/landmark_bounds.py            # about a minute on two cores

Photos of known geometry (tests/face_photos.py), the detector at its smallest face size (12 px):
- size: the fixture face pasted ever smaller: how many are found, and the largest enlargement (the
  similarity transform's scale) the alignment of a found face needs;
- border: faces whose centre lies near or beyond the photo's edge: how far outside the photo the
  landmarks of the faces found lie, in inter-ocular distances (iod) of the fitted face;
- shape: faces squeezed sideways (as a head turned aside looks): the five points' spread across
  their main direction relative to along it (smaller singular value of the centred points over the
  larger; the template has 0.795, collinear points 0).
"""
import argparse
import os
import sys

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from face_photos import _HEAD, FACE, background, make_photo, similarity  # noqa: E402

from src.cli import run_main  # noqa: E402
from src.data.align import ARCFACE_TEMPLATE, TEMPLATE_EYES, similarity_transform  # noqa: E402


def measures(points, shape):
    """(transform scale, flatness, outside in iod) of five landmarks in an image of `shape`."""
    matrix = similarity_transform(points)
    scale = float(np.hypot(matrix[0, 0], matrix[1, 0]))
    spread = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
    h, w = shape[:2]
    outside = max(0.0, float(np.max([-points[:, 0], -points[:, 1], points[:, 0] - (w - 1), points[:, 1] - (h - 1)])))
    return scale, float(spread[1] / spread[0]), outside * scale / TEMPLATE_EYES


def near(faces, truth):
    return [f for f in faces if np.linalg.norm(f.landmarks.mean(axis=0) - truth.mean(axis=0)) < 20]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6, help="photos per setting (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from src.data.detect import FaceDetector
    detector = FaceDetector(min_size=12)
    rng = np.random.default_rng(args.seed)

    print("size: fixture scale | found | largest enlargement | smallest eye distance (px)")
    for scale in (0.12, 0.14, 0.16, 0.2, 0.25):
        found = []
        for _ in range(args.trials):
            centre = rng.uniform([100, 100], [540, 380])
            photo, (truth,) = make_photo(rng, [(scale, rng.uniform(-30, 30), centre)])
            found += [measures(f.landmarks, photo.shape)[0] for f in near(detector.detect(photo), truth)]
        most = f"{max(found):.1f} | {TEMPLATE_EYES / max(found):.1f}" if found else "- | -"
        print(f"  {scale:.2f} | {len(found)} of {args.trials} | {most}")

    print("border: faces found with landmarks outside the photo, worst first (iod outside, px outside)")
    outside = []
    for _ in range(args.trials * 7):
        scale = rng.uniform(0.5, 1.5)
        offset = rng.uniform(-0.6, 0.4) * 150 * scale
        centre = [(offset, 240), (640 - offset, 240), (320, offset), (320, 480 - offset)][rng.integers(4)]
        photo, _ = make_photo(rng, [(scale, rng.uniform(-30, 30), centre)])
        for face in detector.detect(photo):
            s, _, out = measures(face.landmarks, photo.shape)
            if out > 0:
                outside.append((out, out * TEMPLATE_EYES / s))
    for out, pixels in sorted(outside, reverse=True)[:5]:
        print(f"  {out:.2f} iod ({pixels:.1f} px)")
    print(f"  ({len(outside)} faces with a landmark outside, of {args.trials * 7} photos)")

    print("shape: width kept | found | flatness of the detected landmarks")
    for squeeze in (1.0, 0.7, 0.5, 0.35, 0.25):
        flat = []
        for _ in range(args.trials):
            photo = np.clip(background(rng, 480, 640), 0, 255)
            matrix = np.vstack([similarity(rng.uniform(0.7, 1.3), rng.uniform(-20, 20), (320, 240)), [0, 0, 1]])
            matrix = (np.array([[squeeze, 0, 320 * (1 - squeeze)], [0, 1, 0], [0, 0, 1]]) @ matrix)[:2]
            face = cv2.warpAffine(FACE.astype(np.float32), matrix, (640, 480))
            alpha = cv2.warpAffine(_HEAD, matrix, (640, 480))[..., None]
            photo = np.clip(photo * (1 - alpha) + face * alpha, 0, 255).astype(np.uint8)
            flat += [measures(f.landmarks, photo.shape)[1] for f in detector.detect(photo)[:1]]
        shown = " ".join(f"{v:.2f}" for v in flat) or "-"
        print(f"  {squeeze:.2f} | {len(flat)} of {args.trials} | {shown}")
    print(f"template flatness {measures(ARCFACE_TEMPLATE, (112, 112))[1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
