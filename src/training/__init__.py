"""Training: configuration of a run into a network, one train-step cell, optimizer and lr schedule,
callbacks, checkpoints and resume, the run record and the output-folder lock, the loop.

May import everything below it: src.config, src.runtime, src.checkpoint, data, models, heads, evaluation.
"""
