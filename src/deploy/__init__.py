"""Deployment: MINDIR/AIR/ONNX export and the file layout of the offline (C++) inference app.

May import: src.errors, src.checkpoint, data, models, evaluation.
"""
