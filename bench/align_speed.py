"""Speed of face detection and alignment (figures, not a test).

  python bench/align_speed.py                 # about a minute on two cores
  python bench/align_speed.py --photos 40 --large 0

Photos are made from the test fixture (tests/face_photos.py: a real face pasted into a textured
background). Prints photos per second for
- the detector alone (FaceDetector.detect) on one 640x480 photo with one face, one call at a time
  with 1 and 2 ONNX Runtime threads per call, and two calls at a time in two threads;
- align.py's whole work (read, decode, detect, align, write the PNG, faces.csv) on --photos such
  photos on disk, with 1 and 2 workers;
- and seconds for one large photo (--large, e.g. 4000x3000) with the default smallest face (20 px)
  and with --min_size 80.
Each figure is the best of --rounds rounds (the machine's neighbours only ever slow a round down);
the CPU time per photo, which neighbours hardly change, is the mean over the rounds. Two workers can
only be faster than one while the second core is free.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from face_photos import make_photo  # noqa: E402

from src.cli import run_main  # noqa: E402
from src.errors import ArcFaceError  # noqa: E402


def best_rate(func, count, rounds):
    """Calls per second of func() over `count` calls, the best of `rounds` rounds."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            func()
        best = min(best, time.perf_counter() - start)
    return count / best


def size_of(text):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ArcFaceError(f"a size is WIDTHxHEIGHT, got {text!r}") from None
    if width < 64 or height < 64:
        raise ArcFaceError(f"photos must be at least 64x64, got {text}")
    return width, height


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the photos (default: %(default)s)")
    parser.add_argument("--photos", type=int, default=24, help="photos per round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure (default: %(default)s)")
    parser.add_argument("--large", default="4000x3000", help="the large photo, or 0 to skip (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.photos < 1 or args.rounds < 1:
        raise ArcFaceError("--photos and --rounds must be positive")
    width, height = size_of(args.size)
    from src.data.detect import FaceDetector
    from src.data.photos import align_photos

    rng = np.random.default_rng(0)
    scale = min(width, height) / 480 * 0.8  # a face of ~90 px in 640x480
    photo, _ = make_photo(rng, [(scale, 10, (width / 2, height / 2))], size=(height, width))
    print(f"{os.cpu_count()} CPU(s); {width}x{height} photos with one face of inter-ocular distance "
          f"{43 * scale:.0f} px")
    for threads in (1, 2):
        detector = FaceDetector(threads=threads)
        assert len(detector.detect(photo)) == 1
        rate = best_rate(lambda d=detector: d.detect(photo), args.photos, args.rounds)
        print(f"detector alone, one photo at a time, {threads} ONNX Runtime thread(s) per call: {rate:.1f} photos/s "
              f"({1000 / rate:.0f} ms per photo)")
    detector = FaceDetector()
    with ThreadPoolExecutor(2) as pool:
        rate = best_rate(lambda: list(pool.map(detector.detect, [photo] * args.photos)), 1, args.rounds) * args.photos
    print(f"detector alone, two photos at a time (threads), 1 ONNX Runtime thread per call: {rate:.1f} photos/s")

    folder = tempfile.mkdtemp(prefix="align_speed_")
    try:
        os.makedirs(os.path.join(folder, "in"))
        for k in range(args.photos):
            cv2.imwrite(os.path.join(folder, "in", f"{k:03d}.jpg"), photo[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        detector = FaceDetector()
        for workers in (1, 2):
            def whole_run(workers=workers):
                summary = align_photos([os.path.join(folder, "in")], os.path.join(folder, "out"), workers=workers,
                                       overwrite=True, progress=False, warn=lambda line: None, detector=detector)
                assert summary.faces == args.photos
            cpu = time.process_time()
            rate = best_rate(whole_run, 1, args.rounds) * args.photos
            cpu = (time.process_time() - cpu) / args.rounds / args.photos
            print(f"align.py's work, --workers {workers}: {rate:.1f} photos/s (CPU time {1000 * cpu:.0f} ms per photo)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    if args.large != "0":
        width, height = size_of(args.large)
        scale = min(width, height) / 480 * 0.8
        large, _ = make_photo(rng, [(scale, 10, (width / 2, height / 2))], size=(height, width))
        for min_size in (20, 80):
            detector = FaceDetector(min_size=min_size)
            seconds = 1 / best_rate(lambda d=detector: d.detect(large), 1, args.rounds)
            print(f"one {width}x{height} photo, smallest face {min_size} px: {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
