"""Which images the next training step visits (DESIGN.md section 5).

A minibatch is a set of whole images: up to ``new_share`` of it from images never visited yet
(oldest arrival first, so every new image is reached within a bounded time), the rest drawn
uniformly from every stored image so old data keep voting, as in epochs.
"""
from __future__ import annotations

import numpy as np


class ImageScheduler:
    """Draws image ids for minibatches.

    Parameters
    ----------
    batch_images
        Images per minibatch.
    new_share
        Fraction of a minibatch reserved for never-visited images (0–1).  When the backlog
        of new images is larger, the whole batch may go to new images if ``fill_new`` is set.
    seed
        Seed of the uniform draws.
    max_new
        Most never-visited images one step may take when a backlog has built up (the beam
        outruns the trainer): the batch then grows to take them, so every image still gets
        its first visit within seconds, at the price of longer steps.  Default
        ``4 * batch_images``.
    """

    def __init__(self, *, batch_images: int = 8, new_share: float = 0.5, seed: int = 0,
                 max_new: int | None = None):
        if batch_images < 1:
            raise ValueError(f"batch_images must be >= 1, got {batch_images}")
        if not 0.0 <= new_share <= 1.0:
            raise ValueError(f"new_share must lie in [0, 1], got {new_share}")
        self.batch_images = batch_images
        self.new_share = new_share
        self.seed = seed
        self.max_new = 4 * batch_images if max_new is None else max(1, int(max_new))
        self.rng = np.random.default_rng(seed)
        #: images with id < cursor have been handed out at least once as "new"
        self.cursor = 0

    def backlog(self, n_images: int) -> int:
        """Images stored but never handed out as new."""
        return max(0, n_images - self.cursor)

    def next_ids(self, n_images: int) -> np.ndarray:
        """Image ids for the next step, given ``n_images`` stored (ids ``0..n_images-1``)."""
        if n_images <= 0:
            return np.zeros(0, np.int64)
        size = min(self.batch_images, n_images)
        backlog = self.backlog(n_images)
        n_new = min(backlog, int(round(self.new_share * size)))
        if n_new == 0 and backlog > 0:
            n_new = 1
        if backlog > size:
            # catching up: the new images fill a larger batch beside the usual old share
            n_old_usual = size - n_new
            n_new = min(backlog, self.max_new)
            size = n_new + n_old_usual
        new = np.arange(self.cursor, self.cursor + n_new, dtype=np.int64)
        self.cursor += n_new
        n_old = min(size - n_new, n_images - n_new)
        if n_old > 0:
            # uniform over everything stored; exclude the new ones to keep images distinct
            pool = n_images - n_new
            old = self.rng.choice(pool, size=min(n_old, pool), replace=False) if pool else \
                np.zeros(0, np.int64)
            old = np.where(old >= new[0], old + n_new, old) if n_new else old
            return np.concatenate([new, old.astype(np.int64)])
        return new

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "rng": self.rng.bit_generator.state,
                "batch_images": self.batch_images, "new_share": self.new_share}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
        self.rng.bit_generator.state = state["rng"]
