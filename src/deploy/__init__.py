"""Deployment: MINDIR/AIR/ONNX export, the file layout of the offline (C++) inference app, and the
import of insightface models.

May import: src.errors, src.cli, src.files, src.runtime, src.checkpoint, src.safe_pickle, src.data, src.models.
Evaluation uses the ONNX export (also run in a fresh process: `python -m src.deploy.exporting`).
"""
