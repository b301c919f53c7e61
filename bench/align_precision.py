"""Precision of the detector's landmarks and of the re-aligned faces (figures, not a test).

  python bench/align_precision.py              # about a minute on two cores
  python bench/align_precision.py --trials 40

Photos of known geometry (tests/face_photos.py): the fixture face pasted into 640x480 photos under
random similarity transforms (roll, scale, position). For every roll and size band, over --trials
photos each:
- found: photos in which the face was found (and nothing else);
- error: mean and worst landmark distance to the true one, in % of the true inter-ocular distance
  (iod), with the upright re-reading (the default) and with the MTCNN cascade alone;
- corr: median pixel correlation (grey levels) of the face re-aligned from the detected landmarks
  with the fixture aligned by its own, and, for reference, of the face aligned from the true
  landmarks (what resampling alone costs).
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from face_photos import ORIGINAL, correlation, errors, make_photo  # noqa: E402

from src.cli import run_main  # noqa: E402
from src.errors import ArcFaceError  # noqa: E402

ROLLS = (0, 10, 20, 30, 40)
BANDS = ((0.3, 0.45), (0.5, 0.8), (0.8, 1.5))  # scales of the 43 px fixture iod: 13-19, 22-34, 34-64 px


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12, help="photos per roll and size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.trials < 1:
        raise ArcFaceError("--trials must be positive")
    from src.data.align import align_face
    from src.data.detect import FaceDetector

    refined, plain = FaceDetector(), FaceDetector(refine=False)
    rng = np.random.default_rng(args.seed)
    print("| roll (deg) | iod (px) | found | error % iod: mean / worst | cascade alone: mean / worst "
          "| corr detected | corr true landmarks |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for roll in ROLLS:
        for low, high in BANDS:
            found, err, worst, err_plain, worst_plain, corr, corr_true = 0, [], [], [], [], [], []
            for _ in range(args.trials):
                angle = roll * rng.choice([-1, 1]) + rng.uniform(-2, 2) if roll else rng.uniform(-2, 2)
                centre = rng.uniform([200, 170], [440, 310])
                photo, (truth,) = make_photo(rng, [(rng.uniform(low, high), angle, centre)])
                faces = refined.detect(photo)
                if len(faces) != 1:
                    continue
                found += 1
                e = errors(faces[0].landmarks, truth)
                err.append(e.mean())
                worst.append(e.max())
                base = plain.detect(photo)
                if len(base) == 1:
                    e = errors(base[0].landmarks, truth)
                    err_plain.append(e.mean())
                    worst_plain.append(e.max())
                corr.append(correlation(align_face(photo[:, :, ::-1], faces[0].landmarks), ORIGINAL))
                corr_true.append(correlation(align_face(photo[:, :, ::-1], truth), ORIGINAL))
            print(f"| +-{roll} | {43 * low:.0f}-{43 * high:.0f} | {found}/{args.trials} "
                  f"| {np.mean(err):.2f} / {np.max(worst):.2f} | {np.mean(err_plain):.2f} / {np.max(worst_plain):.2f} "
                  f"| {np.median(corr):.4f} | {np.median(corr_true):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
