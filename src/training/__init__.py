"""Training: configuration of a run into a network, one train-step cell, optimizer and lr schedule,
callbacks, checkpoints and resume, the run record and the output-folder lock, the loop.

May import: src.errors, src.files, src.config, src.runtime, src.checkpoint, src.data, src.models, src.heads,
  src.evaluation.
Not src.deploy: evaluation during training gets its embedders from src.evaluation.embedders.embedder_factory.
"""
