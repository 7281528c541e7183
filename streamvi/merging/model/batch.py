"""A minibatch of whole images, ragged: flat per-reflection arrays plus per-image offsets.

The reflection store builds these; the model consumes them.  Nothing is padded: image ``i``
owns reflections ``image_offsets[i]:image_offsets[i+1]`` and every reflection knows its image
through ``image_index``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """Reflections of ``n_images`` whole images.

    Attributes
    ----------
    asu_id
        ``(n_ops, n)`` int64: row of the posterior table for each reflection under each
        twin-law reindexing operator (row 0 is the identity; ``n_ops == 1`` when the space
        group has no indexing ambiguity).
    iobs, sigiobs
        ``(n,)`` float32 intensities and their uncertainties, as measured (not standardised).
    metadata
        ``(n, n_metadata)`` float32 raw per-reflection features (see
        :class:`streamvi.merging.model.metadata.Column`), not standardised.
    image_index
        ``(n,)`` int64 position of each reflection's image within this batch, ``0..n_images-1``.
    image_offsets
        ``(n_images + 1,)`` int64 start of each image's reflections; last entry is ``n``.
    half
        ``(n_images,)`` int64 half-dataset of each image (0 or 1), from a stable hash.
    image_id
        ``(n_images,)`` int64 store-wide id of each image (for visit counters, twin choice).
    obs_weight
        Optional ``(2, n)`` float32: 1 / (observations of the reflection's row) in the whole
        store, for the full table (row 0) and for the image's half table (row 1), those of
        the image's condition when there are several.  With it the
        KL of each row counts once per pass over the data, as in the true ELBO; without it,
        once per minibatch the row appears in (abismal's choice, which weights the prior by
        the multiplicity).
    condition
        Optional ``(n_images,)`` int64 condition of each image (pump–probe: 0 dark, 1 light,
        …): its amplitudes are those of tables ``3c`` (all images of the condition),
        ``3c + 1`` and ``3c + 2`` (its halves).  None: one condition, tables 0, 1, 2.
    image_op
        Optional ``(n_images,)`` int64: the twin-law operator chosen for each image at its
        last visit (0 before the first), with several operators.
    geometry
        Optional ``(n_images, k)`` float32 per-image geometry corrections: the first
        :data:`~streamvi.merging.model.geometry.N_GEOMETRY` columns are the parameters the scale
        model applies to the metadata (the store hands the whole refinement state, ``k =
        STATE_WIDTH``; the trainer passes the parameters alone while it refines them).
    axes
        Optional ``(n_images, 2, 3, 3)`` float32
        :func:`~streamvi.merging.model.geometry.lattice_axes` of each image: its reciprocal basis
        and the inverse (zeros without an orientation); required with ``geometry``.
    """

    asu_id: torch.Tensor
    iobs: torch.Tensor
    sigiobs: torch.Tensor
    metadata: torch.Tensor
    image_index: torch.Tensor
    image_offsets: torch.Tensor
    half: torch.Tensor
    image_id: torch.Tensor
    obs_weight: torch.Tensor | None = None
    condition: torch.Tensor | None = None
    image_op: torch.Tensor | None = None
    geometry: torch.Tensor | None = None
    axes: torch.Tensor | None = None

    @property
    def n_reflections(self) -> int:
        return int(self.iobs.shape[0])

    @property
    def n_images(self) -> int:
        return int(self.image_offsets.shape[0] - 1)

    @property
    def n_ops(self) -> int:
        return int(self.asu_id.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device``."""
        return Batch(**{f.name: None if getattr(self, f.name) is None
                        else getattr(self, f.name).to(device, non_blocking=non_blocking)
                        for f in fields(self)})
