"""Vector quantizer of the VQ first stage (taming-transformers ``VectorQuantizer2``).

The codebook is ``embedding`` (n_embed, embed_dim), as in the CompVis VQ checkpoints (key
``quantize.embedding.weight``). Remapping of indices to a used subset (``remap``) is not supported.
"""
from __future__ import annotations

import torch
from torch import nn


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantization with a straight-through gradient (van den Oord et al. 2017).

    ``forward(z)`` -> (z_q, loss, (perplexity, min_encodings, indices)) as the original:
    loss = ||sg[z_q] - z||^2 + beta ||z_q - sg[z]||^2 (``legacy=True``; the beta on the other
    term otherwise), means over all elements. Indices are (B*H*W,), or (B, H, W) with
    ``sane_index_shape``.
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, legacy: bool = True,
                 sane_index_shape: bool = False, remap=None):
        super().__init__()
        if remap is not None:
            raise ValueError("VectorQuantizer: index remapping (remap=...) is not supported")
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.legacy = legacy
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(n_e, e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)

    def indices(self, z):
        """Indices (B, H, W) of the nearest codebook entries of z (B, e_dim, H, W)."""
        b, _, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.e_dim)
        e = self.embedding.weight
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e
        d = (flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1)[None]
             - 2 * flat @ e.t())
        return d.argmin(dim=1).reshape(b, h, w)

    def forward(self, z):
        idx = self.indices(z)
        z_q = self.embedding(idx).permute(0, 3, 1, 2)  # (B, e_dim, H, W)
        commit = torch.mean((z_q.detach() - z) ** 2)
        codebook = torch.mean((z_q - z.detach()) ** 2)
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = z + (z_q - z).detach()  # straight-through estimator
        out_idx = idx if self.sane_index_shape else idx.reshape(-1)
        return z_q.contiguous(), loss, (None, None, out_idx)

    def get_codebook_entry(self, indices, shape=None):
        """Codebook vectors of ``indices``; with ``shape`` (B, H, W, C) returned as (B, C, H, W)."""
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.reshape(shape).permute(0, 3, 1, 2).contiguous()
        elif indices.dim() == 3:
            z_q = z_q.permute(0, 3, 1, 2).contiguous()
        return z_q
