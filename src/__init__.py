"""ArcFace face recognition on MindSpore.

Layout (data flows one way; a package imports only those before it):
  errors, cli, config, runtime, checkpoint    one error type, options, device set-up, checkpoint files
  data/        files -> training sources -> mindspore.dataset pipeline; .bin verification sets
  models/      backbones by name
  heads/       the margin and the class-sharded softmax classifier
  deploy/      export, the offline inference file layout, import of insightface models
  evaluation/  embedders, the verification protocol, IJB-B/C
  training/    train step, optimizer, schedule, callbacks, checkpoints/resume, the loop
"""
import os

# Process-wide limits and settings that must be in place before the libraries read them.
# OpenCV refuses to decode images of more pixels than this (a 250 KB PNG can declare 16000x16000
# pixels, 768 MB decoded); it reads the variable once, when cv2 is imported.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 25))
