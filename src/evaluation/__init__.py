"""Evaluation: embedders (MindSpore, MINDIR, ONNX Runtime with cached exports), the 10-fold
verification protocol, IJB-B/C, and the one evaluation entry used by val.py, eval_onnx.py and training.

May import: src.errors, src.checkpoint, src.runtime, data (the .bin loader), models, deploy (ONNX export).
"""
