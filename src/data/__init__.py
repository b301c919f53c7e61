"""Training and verification data: files -> sources -> the mindspore.dataset pipeline.

Holds the RecordIO reader/writer, the training-source interface (RecordIO, ImageFolder, MindRecord),
image decoding and checks, the safe `.bin` loader, the synthetic demo data, the one five-point face
alignment, the face detector and the photo-to-aligned-faces work of align.py.
May import: src.errors, src.cli, src.runtime. Nothing from models, heads, training, evaluation, deploy.
"""
