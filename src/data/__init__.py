"""Training and verification data: files -> sources -> the mindspore.dataset pipeline.

Holds the RecordIO reader/writer, the training-source interface (RecordIO, ImageFolder, MindRecord),
image decoding and checks, the safe `.bin` loader and the synthetic demo data.
May import: src.errors, src.cli, src.files, src.runtime, src.safe_pickle.
Nothing from models, heads, training, evaluation, deploy.
"""
