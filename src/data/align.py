"""The one face alignment of the project: five landmarks -> the ArcFace 112x112 crop.

IJB evaluation, embed.py --landmarks and align.py (faces found in photos) all warp with this
function, so a face aligned from a photo is the face the models were trained and evaluated on.
Landmark order everywhere: left eye, right eye, nose, left mouth corner, right mouth corner (left
and right as seen in the image), in pixel coordinates of the source image.
"""

from __future__ import annotations

import cv2
import numpy as np

from src.errors import ArcFaceError

__all__ = ["ARCFACE_TEMPLATE", "FACE_SIZE", "similarity_transform", "align_face"]

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


def align_face(image_bgr, landmarks5):
    """Warp a BGR image so its 5 landmarks land on the ArcFace template.

    Returns:
        the aligned face, ``(112, 112, 3)`` uint8 RGB.
    """
    image = np.asarray(image_bgr)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ArcFaceError(f"expected a (H, W, 3) BGR image, got shape {image.shape}")
    matrix = similarity_transform(landmarks5)
    warped = cv2.warpAffine(image, matrix, (FACE_SIZE, FACE_SIZE), borderValue=0.0)
    return cv2.cvtColor(warped, cv2.COLOR_BGR2RGB)
