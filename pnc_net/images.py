"""Images as a user hands them in, made a model batch: numpy only, so the edge client can use it.

``image_batch(arr)`` accepts ``(H, W)``, ``(N, H, W)`` or ``(N, C, H, W)``,
uint8 (0..255) or float (0..1), and returns ``(N, C, H, W)`` float32.
``picture_batch(pixels)`` does the same for one decoded picture file: ``(H, W)``
grayscale or ``(H, W, C)`` colour, channels last as image libraries give them.
``channels_of(manifest_json)`` reads the channel count a zoo model takes.
"""

from __future__ import annotations

import json

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


def picture_batch(pixels: np.ndarray) -> np.ndarray:
    """(1, C, H, W) float32 in [0, 1] from one decoded picture: ``(H, W)`` (one channel)
    or ``(H, W, C)`` (channels last, as PIL gives an RGB image)."""
    a = np.asarray(pixels)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3:
        a = a.transpose(2, 0, 1)
    else:
        raise InvalidInputError(f"a picture must be (H, W) or (H, W, C); got shape {a.shape}")
    return image_batch(a[None])


def channels_of(manifest_json: str) -> int | None:
    """The channel count ``C`` of a zoo manifest's ``input_shape`` ``(C, H, W)``; None when
    the manifest does not say (not JSON, no such field)."""
    try:
        shape = json.loads(manifest_json).get("input_shape")
    except (ValueError, AttributeError):
        return None
    if isinstance(shape, list) and len(shape) == 3 and isinstance(shape[0], int):
        return shape[0]
    return None
