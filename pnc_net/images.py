"""Images as a user hands them in, made a model batch: numpy only, so the edge client can use it.

``image_batch(arr)`` accepts ``(H, W)``, ``(N, H, W)`` or ``(N, C, H, W)``,
uint8 (0..255) or float (0..1), and returns ``(N, C, H, W)`` float32.
"""

from __future__ import annotations

import numpy as np

from pnc_net.errors import InvalidInputError


def image_batch(arr: np.ndarray) -> np.ndarray:
    """(N, C, H, W) float32 in [0, 1] from what a user gave: (H, W), (N, H, W), uint8 ..."""
    a = np.asarray(arr)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    if a.ndim == 2:
        a = a[None, None]
    elif a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise InvalidInputError(f"images must be 2-4 dimensional; got shape {a.shape}")
    return np.ascontiguousarray(a)
