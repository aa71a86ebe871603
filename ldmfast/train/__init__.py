"""Training: the first-stage autoencoder (``autoencoder``, ``losses``), the latent diffusion
model (``ldm``), shared machinery (``engine``: DDP, EMA, checkpoints), recipes and the
``python -m ldmfast train`` command.

Submodules are imported on use: ``from ldmfast.train import recipes``.
"""
