"""Evaluation: embedders and open_model, the one way to open a model (MindSpore, MINDIR, ONNX Runtime with
verified cached exports), the embedder factory of evaluation during training, the 10-fold verification
protocol, IJB-B/C, the one evaluation entry used by val.py and eval_onnx.py, and embed.py's logic.

May import: src.errors, src.cli, src.files, src.runtime, src.checkpoint, src.data, src.models, src.deploy.
"""
