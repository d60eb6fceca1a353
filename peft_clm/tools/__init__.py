"""What is built on the CLM tuner: loading models, data files, training (TRL), generation and evaluation, sweeps,
alignment vectors, the `peft-clm` command line and the server.

The tuner itself (`peft_clm.config`, `.alpha`, `.layer`, `.logits_mode`, `.model`) does not import from here.
"""
