"""The merging model: one module per factor, assembled by :class:`VariationalMergingModel`.

Tensors only: no files, sockets, metrics or configuration parsing here.
"""
from streamvi.model.batch import Batch
from streamvi.model.likelihood import NormalLikelihood, StudentTLikelihood
from streamvi.model.merging import LossTerms, MergedTable, VariationalMergingModel
from streamvi.model.posterior import FoldedNormalPosterior
from streamvi.model.prior import WilsonPrior
from streamvi.model.scale import ImageScaleModel, lognormal_exponential_kl, segment_mean
from streamvi.model.standardize import Standardizer

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
