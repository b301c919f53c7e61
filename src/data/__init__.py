"""Training and verification data: files -> sources -> the mindspore.dataset pipeline.

Holds the RecordIO container, the insightface layout, the Source interface and its kinds (RecordIO,
ImageFolder, MindRecord), the one decode/verify loop of the data tools, image decoding and checks, the
safe `.bin` loader, the synthetic demo data, the one five-point face alignment, the face detector and
the photo-to-aligned-faces work of align.py.
May import: src.errors, src.cli, src.runtime, src.files, src.safe_pickle. Nothing from models, heads, training,
evaluation, deploy.
"""
