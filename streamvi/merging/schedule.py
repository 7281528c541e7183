"""Which images the next training step visits (DESIGN.md section 5).

A minibatch is a set of whole images: up to ``new_share`` of it from images never visited yet
(oldest arrival first, so every new image is reached within a bounded time), the rest from
every image already visited, in passes: each pass is a fresh random permutation of the images
stored when it began, so within a pass every old image is visited exactly once (random
reshuffling, as epochs are, rather than draws with replacement, which after k epochs leave
e^-k of the images unvisited and others visited twice as often as the mean).
"""
from __future__ import annotations

import numpy as np
import torch


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
        Seed of the passes' permutations.
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
        #: the current pass over old images: ``_pass[_pos:]`` are still to come
        self._pass = np.zeros(0, np.int64)
        self._pos = 0
        #: passes over the old images begun so far
        self.passes = 0

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
        pool = self.cursor          # old images: those already handed out as new
        self.cursor += n_new
        n_old = min(size - n_new, pool)
        if n_old > 0:
            return np.concatenate([new, self._draw_old(n_old, pool)])
        return new

    def _draw_old(self, k: int, pool: int) -> np.ndarray:
        """``k`` distinct ids below ``pool`` from the current pass, starting a new one as needed."""
        out = self._pass[self._pos:self._pos + k]
        self._pos += out.shape[0]
        out = out[out < pool]       # a pass restored from a checkpoint of a larger store
        if out.shape[0] < k:
            # a new pass over everything visited so far; the ids just taken from the end of
            # the old pass go to the end of the new one, so the batch holds distinct images
            perm = self.rng.permutation(pool).astype(np.int64)
            if out.shape[0]:
                taken = np.isin(perm, out)
                perm = np.concatenate([perm[~taken], perm[taken]])
            self._pass, self._pos = perm, 0
            self.passes += 1
            more = self._pass[:k - out.shape[0]]
            self._pos = more.shape[0]
            out = np.concatenate([out, more])
        return out.astype(np.int64, copy=False)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "rng": self.rng.bit_generator.state,
                "batch_images": self.batch_images, "new_share": self.new_share,
                # a tensor, so checkpoints load with torch.load(weights_only=True)
                "pass": torch.from_numpy(self._pass[self._pos:].copy()), "passes": self.passes}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
        self.rng.bit_generator.state = state["rng"]
        # checkpoints from before passes existed start a fresh pass
        remaining = state.get("pass")
        self._pass = (np.zeros(0, np.int64) if remaining is None
                      else np.asarray(remaining, dtype=np.int64).reshape(-1))
        self._pos = 0
        self.passes = int(state.get("passes", 0))
