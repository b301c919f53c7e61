"""The one face alignment of the project: five landmarks -> the ArcFace 112x112 crop.

IJB evaluation, embed.py --landmarks / --detect and align.py (faces found in photos) all warp with
this function, so a face aligned from a photo is the face the models were trained and evaluated on.
Landmark order everywhere: left eye, right eye, nose, left mouth corner, right mouth corner (left
and right as seen in the image), in pixel coordinates of the source image.

Landmarks are checked against the image before warping (`landmark_problem`): points far outside it,
a face far smaller or larger than any the detector returns, or points nearly on one line would give
the embedding of a black or meaningless crop, so they are refused with the reason.
"""

from __future__ import annotations

import cv2
import numpy as np

from src.errors import ArcFaceError

__all__ = ["ARCFACE_TEMPLATE", "FACE_SIZE", "similarity_transform", "landmark_problem", "align_face"]

# Where the five landmarks of an aligned face lie (x, y) in its 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
FACE_SIZE = 112
TEMPLATE_EYES = float(np.linalg.norm(ARCFACE_TEMPLATE[1] - ARCFACE_TEMPLATE[0]))  # 35.2 px in the crop

# Bounds of plausible landmarks, from what the detector (src.data.detect at its smallest face size,
# 12 px) returns on the test fixture's face pasted into photos under random similarity transforms,
# cut by the photo's border, and squeezed sideways as a turned head looks (bench/landmark_bounds.py;
# figures of two runs of 6 photos per setting). The IJB test fixture's landmarks (the template moved
# by similarity transforms of scale 0.95-1.2) lie well inside all of them.
# - Outside the image: faces cut by the border were found with landmarks up to 0.41 inter-ocular
#   distances (iod) outside it; whole faces never. A point more than one iod outside lies where no
#   pixel was seen: the crop is mostly black.
# - Size: the smallest faces found have eyes 4.3 px apart (the alignment enlarges them 8.2 times;
#   the detector finds 1 in 6 faces that small). Twice that enlargement (eyes 2.2 px apart) gives a
#   crop of blur. The largest: eyes as far apart as the side of the largest image the decoder reads
#   (2^25 pixels, 5792 px square; the alignment shrinks 164 times).
# - Shape: the five points' spread across their main direction relative to along it (the smaller
#   singular value of the centred points over the larger): 0.795 for the template, 0.89-0.90 for
#   detected frontal faces, 0.58-0.73 for faces squeezed to 35-50 % of their width (narrower ones
#   are not found); a full profile modelled in 3-D keeps about 0.48 (the nose leaves the eye-mouth
#   line). Points nearly on one line (below 0.15) are no face.
MAX_OUTSIDE_IOD = 1.0
MAX_SCALE = 16.0
MIN_SCALE = TEMPLATE_EYES / 5792.0
MIN_FLATNESS = 0.15


def similarity_transform(landmarks, template=ARCFACE_TEMPLATE):
    """Least-squares similarity (rotation, uniform scale, translation; no reflection).

    Umeyama's closed form.  Returns the ``(2, 3)`` float64 matrix ``M`` with
    ``template ~= M[:, :2] @ p + M[:, 2]`` for the landmark points ``p``.
    """
    src = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(template, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ArcFaceError(f"landmarks must have shape {dst.shape}, got {np.shape(landmarks)}")
    if not np.all(np.isfinite(src)):
        raise ArcFaceError("landmarks contain NaN/Inf values")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = np.sum(src_c ** 2) / len(src)
    if src_var <= 1e-12:
        raise ArcFaceError("degenerate landmarks: all points coincide")
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rotation = u @ np.diag(d) @ vt
    scale = float(np.sum(s * d)) / src_var
    shift = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, shift[:, None]])


def landmark_problem(landmarks, image_shape, matrix=None):
    """Why five landmarks cannot be a face in an image of `image_shape` (H, W, ...), or None (see the
    bounds above). `matrix` is their similarity transform when already computed."""
    points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    matrix = similarity_transform(points) if matrix is None else matrix
    scale = float(np.hypot(matrix[0, 0], matrix[1, 0]))
    eyes = TEMPLATE_EYES / scale  # the face's inter-ocular distance in image pixels, as fitted
    if scale > MAX_SCALE:
        return (f"landmarks of a face with eyes {eyes:.2f} px apart: far smaller than any face the detector "
                f"finds (4 px and more); the crop would be a blur")
    if scale < MIN_SCALE:
        return f"landmarks of a face with eyes {eyes:.0f} px apart: larger than any image (wrong coordinates?)"
    spread = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
    flatness = float(spread[-1] / spread[0])
    if flatness < MIN_FLATNESS:
        return (f"the five landmarks lie nearly on one line (spread across {flatness:.3f} of along it, a face "
                f"has 0.5-0.9): not a face's eyes, nose and mouth corners (wrong columns?)")
    height, width = image_shape[:2]
    outside = np.max([-points[:, 0], -points[:, 1], points[:, 0] - (width - 1), points[:, 1] - (height - 1)],
                     axis=0)  # per point: how far outside the image (negative: inside)
    worst = int(np.argmax(outside))
    if outside[worst] > MAX_OUTSIDE_IOD * eyes:
        x, y = points[worst]
        return (f"landmark ({x:.1f}, {y:.1f}) lies {outside[worst]:.0f} px outside the {width}x{height} image, "
                f"more than the face's eye distance ({eyes:.0f} px): the crop would be mostly black")
    return None


def align_face(image_bgr, landmarks5):
    """Warp a BGR image so its 5 landmarks land on the ArcFace template. Landmarks that cannot be a
    face in this image (`landmark_problem`) are an ArcFaceError.

    Returns:
        the aligned face, ``(112, 112, 3)`` uint8 RGB.
    """
    image = np.asarray(image_bgr)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ArcFaceError(f"expected a (H, W, 3) BGR image, got shape {image.shape}")
    matrix = similarity_transform(landmarks5)
    problem = landmark_problem(landmarks5, image.shape, matrix)
    if problem:
        raise ArcFaceError(problem)
    warped = cv2.warpAffine(image, matrix, (FACE_SIZE, FACE_SIZE), borderValue=0.0)
    return cv2.cvtColor(warped, cv2.COLOR_BGR2RGB)
