"""Resolve the indexing ambiguity of every stored image before the merge, by consensus.

In a space group whose lattice has more symmetry than its point group (P 4₃: two settings
related by a twin law; P 3: four), each still is reported in an arbitrary setting.  The
merge's own per-visit choice
(:meth:`~streamvi.merging.model.merging.VariationalMergingModel.choose_ops`) starts from a
posterior in which no setting is preferred, and on sparse patterns (~100 reflections per
still) it may never leave the 50/50 mixture.  This module assigns every image a setting
from the data alone, as Brehm & Diederichs (2014, Acta Cryst. D70, 101) do, in a form that
needs neither a reference nor an images × images matrix.

Method
------
Each observation becomes a centred, resolution-normalised value ``x``: its intensity divided
by ε · the mean intensity of its resolution bin and by its image's mean of that ratio,
clipped (a few zingers must not dominate), then centred and scaled to unit variance per
bin.  For images ``i``, ``j`` and a relative twin law ``g`` the pair score
``r_ij(g) = Σ x_i(h) x_j(g h)`` (over the unique reflections both recorded) is an
un-normalised correlation: its expectation is the number of common reflections times the
signal per product, so each pair weighs as much as it knows, the weighting Brehm &
Diederichs give their per-pair CC.  Friedel mates are merged for this (more overlap).

The twin laws of every space group that has them form an elementary abelian 2-group
(``Z₂`` for P 4, ``Z₂ × Z₂`` for P 3; checked).  For each of its characters χ (±1 per law)
the matrix ``R_χ = Σ_g χ(g) r(g)`` (diagonal removed) has expectation ``n_common · s ·
χ(a_i) χ(a_j)``, where ``a_i`` is image i's setting: for two settings it is the paper's
``CC(same) − CC(twin)``, and ``sᵀ R_χ s`` is largest for ``s_i = χ(a_i)``.  ``R_χ U`` is
applied as ``X Q_χ Xᵀ U`` with the sparse images × reflections matrix ``X`` (never the
images × images matrix), so each product costs O(observations × settings).  The start
maximises ``sᵀ R_χ s`` over unit vectors in R⁴ per image by the projected power method (a
Burer–Monteiro relaxation) and rounds it to signs; the leading eigenvector the paper uses
gave chance-level signs on sparse P 3 data, where a handful of images of similar
orientation (many shared reflections) captured it.  The signs of a basis of characters name
each image's setting; then rounds of "each image takes the setting that agrees best with
the consensus of all the others" (its own contribution removed) polish it.  There the
consensus of a reflection is the shrunken mean ``Σx / (k + λ)`` of its k observations
(λ = 1/ρ² − 1 from the data's own correlation ρ² between two observations of one
reflection) rather than the pair-score sum ``Σx``, which over-trusts often-seen
reflections.

Reliability: the lead of the best setting over the runner-up, in standard errors, gives a
per-image z-score, right when the consensus is; the halves of the data, solved apart and
cross-checked, give ``split_agreement``, which a self-consistent but wrong consensus cannot
fake; ``confidence`` is the lower of the shares the two imply.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from streamvi.symmetry import ReciprocalSpace

if TYPE_CHECKING:
    from streamvi.merging.store import ReflectionStore

log = logging.getLogger(__name__)

#: Observations gathered from the store at a time (bounds the transient memory of a batch,
#: about 70 bytes per observation with its metadata).
GATHER_OBSERVATIONS = 1 << 20
#: Range the normalised intensities I / (ε ⟨I⟩_bin k_image) are clipped to before centring:
#: the tail of the Wilson distribution (and zingers) would otherwise dominate the products.
CLIP_RANGE = (-1.0, 6.0)
#: Resolution bins (equal counts) of the normalisation, at most.
MAX_BINS = 20
#: Dimension of the unit vectors of the relaxed start (Burer–Monteiro rank).
START_RANK = 4
#: Iterations of the projected power method of the start, at most.
START_ITERATIONS = 40
#: Observations the start works on at most when ``max_images`` is not given (the images
#: are then a random subset; all of them are refined): bounds the start's time and memory.
START_OBSERVATIONS = 2_000_000
#: Refinement rounds without a higher total agreement before a stage stops.
REFINE_PATIENCE = 4
#: Floor of the estimated correlation² of two observations of one reflection (caps the
#: consensus's shrinkage λ = 1/ρ² − 1 near 1,000, a plain sum, where no signal is seen yet).
SHRINKAGE_MIN_RHO2 = 1e-3
#: Random hyperplanes tried (besides the principal direction) when rounding the start.
START_ROUNDINGS = 8


@dataclass(frozen=True)
class SettingAssignment:
    """A consensus setting per stored image (:func:`consensus_settings`).

    Attributes
    ----------
    ops
        ``(n_images,)`` int64 index into ``store.space.twin_ops`` per stored image: the
        operator that puts the image into the consensus setting (``asu_id[ops[i]]`` holds its
        rows).  Consistent up to one global twin law, chosen so that as many images as
        possible keep the operator the store already records for them.
    margin_z
        ``(n_images,)`` float64: how far the chosen setting agrees better with the consensus
        of all other images than the runner-up does, in standard errors (0 for images with
        nothing in common with the others).  Optimistic where the consensus is poor: the
        others' settings were chosen to agree with this image too, so even pure noise
        gives every image a lead.
    confidence
        A lower estimate of the share of images placed right: the smaller of
        ``lead_estimate`` and the accuracy ``p`` that ``split_agreement`` ``a`` implies
        (``a = p² + (1 − p)²/(n_ops − 1)``: two independent solutions, each right with
        probability p).  Each misses one kind of error: the lead misses a wrong consensus,
        the split halves miss an image whose own data point the wrong way in both.  On the
        simulator it read from 1 point above to 5 points below the measured share, 22
        below where half the images carry too little signal (1,000 sparse P 3 stills),
        and 0.62 on pure noise (truth 0.5; 1/n_ops is chance).  NaN without ``validate``.
    split_agreement
        The two random halves of the images, each solved on its own: the share of one
        half's images that the other half's consensus puts in the same setting as their
        own half's solution (up to a global law), averaged over both ways.  A
        self-consistent but wrong solution cannot fake it.  NaN without ``validate``.
    lead_estimate
        Mean of Φ(margin_z): the share placed right if the consensus were right.
    share_confident
        Share of images with ``margin_z > 3``.
    n_reflections
        Observations used (Friedel mates and symmetry equivalents of one image counted once).
    rounds
        Refinement rounds run after the start.
    seconds
        Wall time, s.
    """

    ops: np.ndarray
    margin_z: np.ndarray
    confidence: float
    split_agreement: float
    lead_estimate: float
    share_confident: float
    n_reflections: int
    rounds: int
    seconds: float


# ----------------------------------------------------------------------------- the group


@dataclass(frozen=True)
class _Group:
    """The twin laws as permutations of (Friedel-merged) unique reflections."""

    #: ``(n_ops, n_rows)`` int64: ``perm[g, r]`` is where row r goes under law g
    perm: np.ndarray
    #: ``(n_ops, n_ops)`` int64: ``mul[a, b]`` is the law of "b, then a"
    mul: np.ndarray
    #: ``(n_basis, n_ops)`` float64 ±1: a basis of the nontrivial characters
    chars: np.ndarray
    #: ``(n_space_rows,)`` int64: Friedel-merged row of each row of the space
    merged: np.ndarray
    #: per merged row: resolution (Å) and multiplicity factor ε
    d: np.ndarray
    epsilon: np.ndarray


def _group(space: ReciprocalSpace) -> _Group:
    perms = [space.reindex_rows(op) for op in space.twin_ops]
    # Friedel mates share a merged row: a twin law maps a Friedel pair onto a Friedel pair
    _, merged = np.unique(space.hkl, axis=0, return_inverse=True)
    merged = merged.reshape(-1).astype(np.int64)
    n_rows = int(merged.max()) + 1
    mperm = np.empty((len(perms), n_rows), np.int64)
    for g, p in enumerate(perms):
        mperm[g, merged] = merged[p]
        if not np.array_equal(mperm[g, merged], merged[p]):   # pragma: no cover
            raise ValueError("a twin law splits a Friedel pair")
    m = len(perms)
    mul = np.full((m, m), -1, np.int64)
    for a in range(m):
        for b in range(m):
            comp = mperm[a][mperm[b]]                      # b first, then a
            hits = [k for k in range(m) if np.array_equal(mperm[k], comp)]
            if len(hits) != 1:                             # pragma: no cover
                raise ValueError("the twin laws do not form a group on the reflections")
            mul[a, b] = hits[0]
    if np.any(np.diag(mul) != 0) or not np.array_equal(mul, mul.T):
        # every merohedral twin law group in the 230 space groups is Z₂ or Z₂ × Z₂
        raise NotImplementedError("consensus settings need twin laws that are involutions "
                                  "and commute (an elementary abelian 2-group)")
    # characters: ±1 per law, multiplicative; brute force (at most 2^4 sign vectors)
    chars = []
    for bits in range(1, 1 << m):
        c = np.array([-1.0 if bits >> g & 1 else 1.0 for g in range(m)])
        if c[0] == 1 and all(c[mul[a, b]] == c[a] * c[b] for a in range(m) for b in range(m)):
            chars.append(c)
    basis: list[np.ndarray] = []
    span = [np.ones(m)]
    for c in chars:        # greedily, characters not products of those already chosen
        if any(np.array_equal(c, s) for s in span):
            continue
        basis.append(c)
        span = span + [s * c for s in span]
    d = np.zeros(n_rows, np.float64)
    eps = np.ones(n_rows, np.float64)
    d[merged] = space.d
    eps[merged] = space.epsilon
    return _Group(mperm, mul, np.array(basis), merged, d, eps)


# ----------------------------------------------------------------------------- the data


@dataclass
class _Data:
    """Observations as a sparse images × merged-rows matrix ``X``.

    Coordinates sorted by (image, row), one entry per pair, and ``X``, ``Xᵀ`` as CSR
    tensors for the products of the start (sparse × dense products are ~10× faster than
    the same sums by ``np.bincount`` over (observation, column) pairs).
    """

    img: np.ndarray          # (nnz,) int64 position of the image in the list used
    row: np.ndarray          # (nnz,) int64 merged row under the identity
    x: np.ndarray            # (nnz,) float64 centred, normalised value
    n_images: int
    n_rows: int
    #: per law k: ``(pos, partner)``, the entries whose image also recorded the row that k
    #: maps theirs to, and where (an image's pairs with itself, which "all the others"
    #: leaves out); law 0 pairs every entry with itself and is not listed
    pairs: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(init=False, repr=False)
    #: ``(n_ops, n_images)``: ``diag[k, i] = Σ_h x_i(h) x_i(k h)``
    diag: np.ndarray = dataclasses.field(init=False, repr=False)
    X: torch.Tensor = dataclasses.field(init=False, repr=False)
    XT: torch.Tensor = dataclasses.field(init=False, repr=False)
    perm: dataclasses.InitVar[np.ndarray | None] = None

    def __post_init__(self, perm: np.ndarray | None) -> None:
        assert perm is not None
        key = self.img * self.n_rows + self.row           # sorted: (image, row) pairs
        self.pairs = [(np.zeros(0, np.int64), np.zeros(0, np.int64))]
        self.diag = np.zeros((perm.shape[0], self.n_images))
        self.diag[0] = np.bincount(self.img, np.square(self.x), self.n_images)
        for k in range(1, perm.shape[0]):
            other = self.img * self.n_rows + perm[k][self.row]
            at = np.minimum(np.searchsorted(key, other), max(key.shape[0] - 1, 0))
            pos = np.nonzero(key[at] == other)[0]
            self.pairs.append((pos, at[pos]))
            self.diag[k] = np.bincount(self.img[pos], self.x[pos] * self.x[at[pos]],
                                       self.n_images)
        self.X = _csr(self.img, self.row, self.x, self.n_images, self.n_rows)
        order = np.lexsort((self.img, self.row))
        self.XT = _csr(self.row[order], self.img[order], self.x[order], self.n_rows,
                       self.n_images)


def _csr(major: np.ndarray, minor: np.ndarray, values: np.ndarray, n_major: int,
         n_minor: int) -> torch.Tensor:
    """CSR float32 matrix from coordinates sorted by ``major`` (32-bit indices where they
    fit: 8 bytes per entry instead of 12)."""
    index = np.int32 if max(values.shape[0], n_minor) < 2**31 - 1 else np.int64
    crow = np.zeros(n_major + 1, index)
    np.cumsum(np.bincount(major, minlength=n_major), out=crow[1:])
    minor = minor.astype(index)
    with warnings.catch_warnings():
        # "sparse CSR support is in beta": the products used here are long supported
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR.*")
        return torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(minor),
                                       torch.from_numpy(values.astype(np.float32)),
                                       (n_major, n_minor), check_invariants=False)


def _gather(store: "ReflectionStore", image_ids: np.ndarray, group: _Group
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image position, merged identity row, intensity) per observation, gathered from the
    store in blocks of about :data:`GATHER_OBSERVATIONS` observations."""
    imgs, rows, vals = [], [], []
    ends = np.cumsum(store.image_length[image_ids])
    lo = 0
    while lo < image_ids.shape[0]:
        done = ends[lo - 1] if lo else 0
        hi = max(int(np.searchsorted(ends, done + GATHER_OBSERVATIONS, side="right")), lo + 1)
        ids = image_ids[lo:hi]
        b = store.batch(ids, device="cpu")
        # the batch may order images by storage tier: map back to positions in image_ids
        order = np.argsort(ids, kind="stable")
        where = np.searchsorted(ids[order], b.image_id.numpy())
        imgs.append(lo + order[where][b.image_index.numpy()])
        rows.append(group.merged[b.asu_id[0].numpy()])
        vals.append(b.iobs.numpy().astype(np.float64))
        del b
        lo = hi
    if not imgs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(imgs), np.concatenate(rows), np.concatenate(vals)


def _normalise(img: np.ndarray, row: np.ndarray, iobs: np.ndarray, n_images: int,
               group: _Group) -> np.ndarray:
    """Centred, unit-variance normalised intensity per observation (0 for blank images).

    Works in place on a copy of ``iobs``, with resolution bins looked up per row, so that
    it holds about three observation-sized arrays at a time.
    """
    n = iobs.shape[0]
    n_rows = group.d.shape[0]
    # equal-count bins in 1/d², their edges from the observations' count per row
    s_row = 1.0 / np.square(group.d)
    n_bins = int(np.clip(n // 2000, 1, MAX_BINS))
    by_s = np.argsort(s_row)
    cum = np.cumsum(np.bincount(row, minlength=n_rows)[by_s])
    cut = np.searchsorted(cum, np.linspace(0.0, float(n), n_bins + 1)[1:-1], side="right")
    edges = s_row[by_s][np.minimum(cut, n_rows - 1)]
    b = np.searchsorted(edges, s_row)[row]
    cnt = np.maximum(np.bincount(b, minlength=n_bins), 1)
    e = iobs / group.epsilon[row]
    mean = np.bincount(b, e, n_bins) / cnt
    # weak outer bins can average ≤ 0: floor them so the ratio stays finite
    mean = np.maximum(mean, 1e-3 * max(float(mean.max()), 1e-30))
    e /= mean[b]
    # the image's scale (and mean partiality): its mean ratio; blank images get no vote
    k = np.bincount(img, e, n_images) / np.maximum(np.bincount(img, minlength=n_images), 1)
    good = k > 0.05
    e /= np.where(good, k, 1.0)[img]
    np.clip(e, *CLIP_RANGE, out=e)
    # per bin: centred (a product has zero mean without signal) and of unit variance
    e -= (np.bincount(b, e, n_bins) / cnt)[b]
    e /= np.sqrt(np.maximum(np.bincount(b, np.square(e), n_bins) / cnt, 1e-12))[b]
    e[~good[img]] = 0.0
    return e


def _prepare(store: "ReflectionStore", image_ids: np.ndarray, group: _Group) -> _Data:
    img, row, iobs = _gather(store, image_ids, group)
    n_images, n_rows = image_ids.shape[0], group.perm.shape[1]
    ok = np.isfinite(iobs)
    if not ok.all():
        img, row, iobs = img[ok], row[ok], iobs[ok]
    x = _normalise(img, row, iobs, n_images, group)
    del iobs, ok
    # one value per (image, merged row): symmetry and Friedel mates recorded on one still
    # are one reflection for the pair statistics (their mean)
    key = img * n_rows + row
    del img, row
    order = np.argsort(key, kind="stable")
    key = key[order]
    x = x[order]
    del order
    first = np.empty(key.shape[0], bool)
    first[:1] = True
    np.not_equal(key[1:], key[:-1], out=first[1:])
    gid = np.cumsum(first) - 1
    ukey = key[first]
    del key, first
    xm = np.bincount(gid, x) / np.bincount(gid)
    del gid, x
    return _Data(ukey // n_rows, ukey % n_rows, xm, n_images, n_rows, group.perm)


def _subset(data: _Data, ids: np.ndarray, group: _Group) -> _Data:
    """The observations of the (sorted) images ``ids``, renumbered 0..len(ids)−1."""
    pos = np.full(data.n_images, -1, np.int64)
    pos[ids] = np.arange(ids.shape[0])
    keep = pos[data.img] >= 0
    return _Data(pos[data.img[keep]], data.row[keep], data.x[keep], ids.shape[0],
                 data.n_rows, group.perm)


# ----------------------------------------------------------------------------- linear algebra


def _character_operator(data: _Data, group: _Group, chi: np.ndarray
                        ) -> Callable[[np.ndarray], np.ndarray]:
    """U ↦ (X Q_χ Xᵀ − diag) U for ``U`` of shape (n_images, k), with Q_χ = Σ_g χ(g) P_g
    and (P_g u)(r) = u(perm_g r): the pair matrix R_χ applied without forming it."""
    diag = chi @ data.diag

    def apply(U: np.ndarray) -> np.ndarray:
        T = (data.XT @ torch.from_numpy(U.astype(np.float32))).numpy()          # Xᵀ U
        W = sum(chi[g] * T[group.perm[g]] for g in range(chi.shape[0]))       # Q_χ Xᵀ U
        out = (data.X @ torch.from_numpy(W.astype(np.float32))).numpy()      # X Q_χ Xᵀ U
        return out.astype(np.float64) - diag[:, None] * U

    return apply


def _character_signs(apply: Callable[[np.ndarray], np.ndarray], n: int,
                     rng: np.random.Generator, *, rank: int | None = None,
                     iterations: int | None = None) -> np.ndarray:
    """±1 per image maximising ``sᵀ R s`` approximately: the projected power method on
    unit vectors in R^rank (a Burer–Monteiro relaxation), then rounded.

    Unlike the leading eigenvector, every image keeps unit weight, so a few images that
    share many reflections (similar orientations) cannot capture the solution: on 1,000
    sparse P 3 stills the eigenvector's signs were right for 52 % and 69 % of the images
    (two characters), these for 81 % and 83 %.
    """
    rank = START_RANK if rank is None else rank
    iterations = START_ITERATIONS if iterations is None else iterations
    U = rng.standard_normal((n, rank))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    for _ in range(iterations):
        A = apply(U)
        norm = np.linalg.norm(A, axis=1, keepdims=True)
        new = np.where(norm > 0, A / np.maximum(norm, 1e-300), U)
        moved = float(np.max(np.abs(new - U)))
        U = new
        if moved < 1e-4:
            break
    # round: the principal direction and a few random ones; keep the best by sᵀ R s
    _, vecs = np.linalg.eigh(U.T @ U)
    dirs = np.concatenate([vecs[:, -1:], rng.standard_normal((rank, START_ROUNDINGS))], 1)
    S = np.where(U @ dirs >= 0, 1.0, -1.0)
    value = np.einsum("ij,ij->j", S, apply(S))
    return S[:, int(np.argmax(value))]


# ----------------------------------------------------------------------------- refinement


def _targets(data: _Data, group: _Group, ops: np.ndarray,
             voters: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each observation lands under its image's law, its value (0 for non-voters),
    and the number of voting observations per row."""
    target = group.perm.ravel()[ops[data.img] * data.n_rows + data.row]
    if voters is None:
        return target, data.x, np.bincount(target, minlength=data.n_rows).astype(np.float64)
    vote = voters[data.img]
    return (target, np.where(vote, data.x, 0.0),
            np.bincount(target, vote.astype(np.float64), data.n_rows))


def _shrinkage(data: _Data, group: _Group, ops: np.ndarray,
               voters: np.ndarray | None = None) -> float:
    """λ of the consensus ``Σx / (k + λ)``: 1/ρ² − 1, with ρ² the mean product of two
    observations of one reflection (the x have unit variance) under the laws ``ops``."""
    target, x, k = _targets(data, group, ops, voters)
    c = np.bincount(target, x, data.n_rows)
    pairs = float(np.sum(k * (k - 1)))
    rho2 = (float(np.sum(c * c) - np.sum(x * x)) / pairs) if pairs > 0 else 0.0
    return 1.0 / min(max(rho2, SHRINKAGE_MIN_RHO2), 1.0) - 1.0


def _scores(data: _Data, group: _Group, ops: np.ndarray, lam: float,
            voters: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Agreement of each image, put in each law g, with the consensus of all the others in
    their laws ``ops``: ``(n_ops, n_images)``; and the consensus itself ``(n_rows,)``.

    The consensus of a reflection is the shrunken mean ``Σx / (k + λ)`` of its k
    observations, the best estimate of its normalised intensity when each observation
    correlates with it by ρ = (1 + λ)^(−1/2): a reflection seen 40 times is not trusted
    four times as much as one seen 10 times, as a plain sum would (on sparse data this
    placed 1–4 % more images right).  ``voters`` (bool per image): only these images make
    the consensus (default: all).
    """
    m, n = group.perm.shape[0], data.n_images
    target, x, k = _targets(data, group, ops, voters)
    k += lam
    w = np.divide(1.0, k, out=np.zeros_like(k), where=k > 0)   # rows nobody recorded: 0
    consensus = np.bincount(target, x, data.n_rows) * w
    at = np.stack([consensus[group.perm[g]] for g in range(m)], axis=1)   # (n_rows, m)
    scores = (data.X @ torch.from_numpy(at.astype(np.float32))).numpy().T.astype(np.float64)
    # minus the image's own part: under g its row r meets its own row perm_k r, k = a ⊕ g;
    # k = 0 (g = a) is every observation with itself
    own = np.zeros((m, n))
    own[ops, np.arange(n)] = np.bincount(data.img, x * data.x * w[target], n)
    for k_law in range(1, m):
        pos, partner = data.pairs[k_law]
        if pos.shape[0] == 0:
            continue
        i = data.img[pos]
        g = group.mul[ops[i], k_law]
        val = x[pos] * data.x[partner] * w[group.perm[g, data.row[pos]]]
        own += np.bincount(g * n + i, val, m * n).reshape(m, n)
    return scores - own, consensus


def _margins(data: _Data, group: _Group, ops: np.ndarray, scores: np.ndarray,
             consensus: np.ndarray) -> np.ndarray:
    """Chosen law's lead over the runner-up per image, in standard errors."""
    n = data.n_images
    idx = np.arange(n)
    others = scores.copy()
    others[ops, idx] = -np.inf
    second = others.argmax(axis=0)
    # each product x(h) c(g h) is one noisy vote: the lead's variance is Σ x² (c_a − c_b)²
    c_a = consensus[group.perm[ops[data.img], data.row]]
    c_b = consensus[group.perm[second[data.img], data.row]]
    var = np.bincount(data.img, np.square(data.x * (c_a - c_b)), n)
    lead = scores[ops, idx] - scores[second, idx]
    return np.where(var > 0, lead / np.sqrt(np.maximum(var, 1e-300)), 0.0)


def _refine(data: _Data, group: _Group, ops: np.ndarray, rounds: int,
            rng: np.random.Generator) -> tuple[np.ndarray, int, float]:
    """Rounds of "each image to its best law against all the others".

    Each round moves a random half of the images, so that two images that share many
    reflections do not swap back and forth together; it stops once no image wants to
    move or the total agreement has not risen for :data:`REFINE_PATIENCE` rounds.  The
    shrinkage λ is fixed per stage (so that totals compare) and estimated
    again after it, up to three stages.  Returns the assignment of highest total agreement
    in the last stage, the rounds run and λ.
    """
    lam, used = _shrinkage(data, group, ops), 0
    for _ in range(3):
        ops, r = _refine_stage(data, group, ops, rounds - used, rng, lam)
        used += r
        new = _shrinkage(data, group, ops)
        if used >= rounds or abs(new - lam) <= 0.2 * lam:
            break
        lam = new
    return ops, used, lam


def _refine_stage(data: _Data, group: _Group, ops: np.ndarray, rounds: int,
                  rng: np.random.Generator, lam: float) -> tuple[np.ndarray, int]:
    """One stage of :func:`_refine` at a fixed λ: the best assignment and rounds run."""
    best, best_total, since, r = ops.copy(), -np.inf, 0, 0
    n = data.n_images
    for r in range(1, max(rounds, 1) + 1):
        scores, _ = _scores(data, group, ops, lam)
        total = float(scores[ops, np.arange(n)].sum())
        if total > best_total:
            best, best_total, since = ops.copy(), total, 0
        else:
            since += 1
        want = scores.argmax(axis=0)
        # done when nobody wants to move, or when a few images near a tie keep swapping
        # without raising the total agreement
        if np.array_equal(want, ops) or since >= REFINE_PATIENCE:
            break
        ops = np.where(rng.random(n) < 0.5, want, ops)
    return best, r


# ----------------------------------------------------------------------------- public


def consensus_settings(store: "ReflectionStore", *, max_images: int | None = None,
                       seed: int = 0, rounds: int = 40, validate: bool = True,
                       threads: int | None = 1) -> SettingAssignment:
    """Put every stored image into one consistent indexing setting, from the data alone.

    Brehm & Diederichs (2014) consensus: pair scores between images on the reflections
    they share, for each relative twin law; a relaxed maximisation of the total agreement
    per twin-law character gives a start, and rounds of "each image to the setting that
    agrees best with the consensus of all the others" refine it (module docstring).
    Independent of the model and of the order of arrival; deterministic for a ``seed``.
    Call it once the images are stored, before the merge trains on them.

    Parameters
    ----------
    store
        The reflections; ``store.space.twin_ops`` are the settings.  With one operator
        every image gets 0 and ``confidence`` 1.
    max_images
        Images (a random subset) the start works on; all images are refined and get a
        setting.  ``None``: as many as hold :data:`START_OBSERVATIONS` observations (all
        of 18,000 sparse or 5,000 dense stills).
    seed
        Seed of the start, the subsample and the refinement's random halves.
    rounds
        Largest number of refinement rounds (one pass over the observations each).
    validate
        Also solve two random halves of the images on their own, for
        ``split_agreement`` (about doubles the time).
    threads
        torch intra-op threads for the sparse products while the call runs (process-wide,
        restored on return).  One is fastest where cores are shared (on 2 busy cores two
        threads made the products 30× slower); ``None`` leaves the setting alone.

    Returns
    -------
    SettingAssignment
        ``ops``: one index into ``store.space.twin_ops`` per stored image (image ids
        ``0..n_images-1``), consistent up to one global law, chosen so that as many images
        as possible keep the operator the store records for them (``store.image_op``);
        per-image ``margin_z``; ``confidence`` and what it is made of.  Apply with
        ``store.set_ops(torch.arange(n), torch.from_numpy(ops))`` then
        ``store.apply_settings()``.

    Notes
    -----
    Cost: time O(observations × settings) per iteration of the start (≤ 40 per
    character, on at most :data:`START_OBSERVATIONS` observations) and per refinement
    round (typically 2–20), plus one sort of the observations; ``validate`` about doubles
    it.  Memory about 60 bytes per observation while it works and 100 at its peak (the
    store is read in blocks of :data:`GATHER_OBSERVATIONS`), never an images × images or
    images × reflections matrix.  Measured on 2 busy CPU cores with ``validate``
    (``benchmarks/bench_ambiguity.py``): 2,000 stills of ~110 reflections in 0.6 s (P 4₃)
    to 1.4 s (P 3), 20,000 in 7 s; 2,000 stills of ~400 reflections in 1.6–2.6 s, 20,000
    (8 million observations) in 24 s.

    Reliability: an image is placed by its agreement with the consensus of all others,
    so what counts is how much of the structure the other images recorded and how well
    its own intensities measure it (photons, partiality), not pairwise overlaps (one or
    two reflections per pair on sparse patterns).  Each image is only as resolvable as
    its own data: even against the true structure factors 3–9 % of weak sparse stills
    (~100 reflections, the simulator's default flux) fall in the wrong setting, and the
    share placed right approaches that limit as images are added (P 4₃: 95.5 % of 1,000,
    96 % of 2,000, 97 % of 20,000, against 97.1 % with the truth).  ``confidence``
    estimates the share placed right, mostly low (see :class:`SettingAssignment`); near
    1/n_ops the data carry no usable signal and the assignment is arbitrary (``margin_z``
    alone would still read high there: it measures agreement with a consensus the image
    helped to shape).  Twin laws that leave the intensities almost unchanged (a
    structure close to the twin symmetry) give no signal.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _consensus(store, max_images, seed, rounds, validate)
    finally:
        if threads is not None:
            torch.set_num_threads(previous)


def _consensus(store: "ReflectionStore", max_images: int | None, seed: int, rounds: int,
               validate: bool) -> SettingAssignment:
    t0 = time.perf_counter()
    n = int(store.n_images)
    if store.n_ops == 1 or n == 0:
        return SettingAssignment(np.zeros(n, np.int64), np.full(n, np.inf), 1.0, 1.0, 1.0,
                                 1.0, 0, 0, time.perf_counter() - t0)
    group = _group(store.space)
    rng = np.random.default_rng(seed)
    data = _prepare(store, np.arange(n, dtype=np.int64), group)
    ops, n_rounds, lam = _solve(data, group, rng, rounds, max_images)

    scores, consensus = _scores(data, group, ops, lam)
    z = _margins(data, group, ops, scores, consensus)
    split = _split_agreement(data, group, rng, rounds, max_images) if validate else math.nan
    ops = _align(ops, store.image_op[:n], group.mul)
    lead = float(np.mean(0.5 * np.vectorize(math.erfc)(-z / math.sqrt(2.0))))
    out = SettingAssignment(ops, z, min(_accuracy(split, group.mul.shape[0]), lead), split,
                            lead, float(np.mean(z > 3.0)),
                            int(data.x.shape[0]), n_rounds, time.perf_counter() - t0)
    log.info("consensus settings of %d images: share right ≥ %.3f, halves agree on %.3f, "
             "%.1f %% with z > 3, %d rounds, %.1f s", n, out.confidence, split,
             100 * out.share_confident, n_rounds, out.seconds)
    return out


def _solve(data: _Data, group: _Group, rng: np.random.Generator, rounds: int,
           max_images: int | None) -> tuple[np.ndarray, int, float]:
    """Start (relaxed, per character) and refinement: an operator per image of ``data``."""
    n = data.n_images
    if max_images is None:
        # enough images for START_OBSERVATIONS observations (all of most data sets)
        per_image = data.x.shape[0] / max(n, 1)
        max_images = max(int(START_OBSERVATIONS / max(per_image, 1.0)), 1)
    if max_images < n:
        sub = np.sort(rng.choice(n, size=int(max_images), replace=False))
        start = _subset(data, sub, group)
    else:
        sub, start = np.arange(n), data
    signs = np.stack([_character_signs(_character_operator(start, group, chi),
                                       start.n_images, rng) for chi in group.chars], axis=1)
    # the law whose characters match the signs (a basis of characters identifies it)
    ops = np.zeros(n, np.int64)
    ops[sub] = (signs @ group.chars).argmax(axis=1)
    if sub.shape[0] < n:
        # the others join the subset's consensus first
        rest = np.setdiff1d(np.arange(n), sub)
        voters = np.zeros(n, bool)
        voters[sub] = True
        scores, _ = _scores(data, group, ops, _shrinkage(data, group, ops, voters), voters)
        ops[rest] = scores[:, rest].argmax(axis=0)
    return _refine(data, group, ops, rounds, rng)


def _split_agreement(data: _Data, group: _Group, rng: np.random.Generator, rounds: int,
                     max_images: int | None) -> float:
    """Solve two random halves of the images independently; put each half's images against
    the other half's consensus; the share on which that agrees with their own half's
    solution (up to one global law), averaged over both halves."""
    n = data.n_images
    if n < 4:
        return math.nan
    order = rng.permutation(n)
    halves = [np.sort(order[: n // 2]), np.sort(order[n // 2:])]
    own, cross = [], []
    for h in halves:
        ops_h, _, _ = _solve(_subset(data, h, group), group, rng,
                          rounds, None if max_images is None else max_images // 2)
        full = np.zeros(n, np.int64)
        full[h] = ops_h
        own.append(full)
    agree = []
    for k, h in enumerate(halves):
        voters = np.zeros(n, bool)
        voters[halves[1 - k]] = True
        lam = _shrinkage(data, group, own[1 - k], voters)
        scores, _ = _scores(data, group, own[1 - k], lam, voters)
        placed = scores[:, h].argmax(axis=0)
        agree.append(max(float(np.mean(group.mul[g][placed] == own[k][h]))
                         for g in range(group.mul.shape[0])))
    return float(np.mean(agree))


def _accuracy(agreement: float, m: int) -> float:
    """p with ``agreement = p² + (1 − p)²/(m − 1)`` (clamped to chance, 1/m)."""
    if not math.isfinite(agreement):
        return math.nan
    c = 1.0 / (m - 1)
    return (c + math.sqrt(max(agreement * (1.0 + c) - c, 0.0))) / (1.0 + c)


def _align(ops: np.ndarray, current: np.ndarray, mul: np.ndarray) -> np.ndarray:
    """Relabel by the global law that keeps the most images at their current operator."""
    best = max(range(mul.shape[0]), key=lambda g: int(np.sum(mul[g][ops] == current)))
    return mul[best][ops]
