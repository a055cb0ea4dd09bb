"""Low-rank family: attention approximations and factorized Linear layers.

* ``lowrank.nystrom``   Nyström attention (Nyströmformer) on the trained weights
* ``lowrank.performer`` FAVOR+ random-feature attention (Performer) on the trained weights
* ``lowrank.svd``       truncated-SVD factorization of qkv/proj/fc1/fc2 (and optionally the head)
"""

from __future__ import annotations

from . import nystrom, performer, svd  # noqa: F401  (importing registers the methods)
from ._common import ApproxAttention, swap_attention
from .nystrom import NystromAttention, iterative_pinv, nystrom_attention, segment_means
from .performer import PerformerAttention, favor_attention
from .svd import FactorizedLinear

__all__ = ["ApproxAttention", "FactorizedLinear", "NystromAttention", "PerformerAttention", "favor_attention",
           "iterative_pinv", "nystrom_attention", "segment_means", "swap_attention"]
