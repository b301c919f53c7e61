"""Photos of known geometry made from one real face, for the detector's tests and benchmarks.

The face is tests/data/face_astronaut.jpg (public domain; source, licence and its five landmarks in
face_astronaut.json). A photo is a textured background with copies of it pasted with a soft edge
under known similarity transforms, so the true landmarks of every face in it are known.
"""
import json
import math
from pathlib import Path

import cv2
import numpy as np

from src.data.align import align_face

DATA = Path(__file__).parent / "data"
FIXTURE = json.loads((DATA / "face_astronaut.json").read_text())
FACE = cv2.cvtColor(cv2.imread(str(DATA / FIXTURE["image"])), cv2.COLOR_BGR2RGB)
TRUTH = np.array(FIXTURE["landmarks"], dtype=np.float64)
ORIGINAL = align_face(FACE[:, :, ::-1], TRUTH)  # the fixture aligned by its own landmarks


# --- photos of known geometry ---------------------------------------------------------------------

def similarity(scale, roll, centre):
    """Maps fixture pixels into a photo: scaled, rolled by `roll` degrees (clockwise as seen, image y
    down) about the landmarks' centre, which lands on `centre`."""
    a = math.radians(roll)
    rotation = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return np.hstack([rotation, (np.asarray(centre, float) - rotation @ TRUTH.mean(axis=0))[:, None]])


def apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def background(rng, height, width):
    """Smooth colour fields, mid-scale blotches and sensor noise."""
    low = cv2.resize(rng.uniform(40, 220, (4, 5, 3)).astype(np.float32), (width, height),
                     interpolation=cv2.INTER_CUBIC)
    mid = cv2.resize(rng.normal(0, 20, (height // 16, width // 16, 3)).astype(np.float32), (width, height),
                     interpolation=cv2.INTER_CUBIC)
    return low + mid + rng.normal(0, 4, (height, width, 3)).astype(np.float32)


_HEAD = cv2.GaussianBlur(cv2.ellipse(np.zeros(FACE.shape[:2], np.float32), (128, 118), (100, 125), 0, 0, 360,
                                     1.0, -1), (0, 0), 8)


def make_photo(rng, placements, size=(480, 640)):
    """(uint8 RGB photo, true landmarks of each face) for placements (scale, roll, centre)."""
    photo = background(rng, *size)
    truths = []
    for scale, roll, centre in placements:
        matrix = similarity(scale, roll, centre)
        face = cv2.warpAffine(FACE.astype(np.float32), matrix, size[::-1], flags=cv2.INTER_LINEAR)
        alpha = cv2.warpAffine(_HEAD, matrix, size[::-1])[..., None]
        photo = photo * (1 - alpha) + face * alpha
        truths.append(apply(matrix, TRUTH))
    return np.clip(photo, 0, 255).astype(np.uint8), truths


def errors(found, truth):
    """Per-landmark distances in percent of the true inter-ocular distance."""
    return np.linalg.norm(found - truth, axis=1) / np.linalg.norm(truth[1] - truth[0]) * 100


def correlation(a, b):
    a = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY).astype(np.float64).ravel()
    b = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY).astype(np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])
