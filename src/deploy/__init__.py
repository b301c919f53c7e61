"""Deployment: MINDIR/AIR/ONNX export, the file layout of the offline (C++) inference app, and the
import of insightface models.

May import: src.errors, src.files, src.checkpoint, src.safe_pickle, data, models (evaluation uses the ONNX export).
"""
