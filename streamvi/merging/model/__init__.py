"""The merging model: one module per factor, assembled by :class:`VariationalMergingModel`.

Tensors only: no files, sockets, metrics or configuration parsing here.
"""
from streamvi.merging.model.batch import Batch
from streamvi.merging.model.likelihood import NormalLikelihood, StudentTLikelihood
from streamvi.merging.model.merging import LossTerms, MergedTable, VariationalMergingModel
from streamvi.merging.model.posterior import FoldedNormalPosterior
from streamvi.merging.model.prior import WilsonPrior
from streamvi.merging.model.scale import ImageScaleModel, lognormal_exponential_kl, segment_mean
from streamvi.merging.model.standardize import Standardizer

__all__ = [
    "Batch",
    "FoldedNormalPosterior",
    "ImageScaleModel",
    "LossTerms",
    "MergedTable",
    "NormalLikelihood",
    "StudentTLikelihood",
    "Standardizer",
    "VariationalMergingModel",
    "WilsonPrior",
    "lognormal_exponential_kl",
    "segment_mean",
]
