"""The classification head used for training: the margins (one interface: combined, AdaFace,
CurricularFace, MagFace, sub-center) and the class-sharded softmax classifier (one rank holding every
class is the plain full head), with its shard files.

May import: src.errors, src.checkpoint.
Nothing from data, models, training, evaluation, deploy.
"""
