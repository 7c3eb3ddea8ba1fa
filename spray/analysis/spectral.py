"""Normalised graph Laplacian, its smallest eigenpairs, and the eigengap rule.

For an affinity graph ``W`` with degrees ``D`` the symmetric normalised Laplacian is
``L = I - D^-1/2 W D^-1/2``. Its eigenvalues lie in [0, 2]; the number of (near-)zero
eigenvalues is the number of (nearly) disconnected groups of samples, which is what SpRAy
reads off as the number of prediction strategies in a class.

**Eigensolver.** The smallest eigenpairs of ``L`` are the largest of
``M = D^-1/2 W D^-1/2`` (``L = I - M``), found from sparse matrix-vector products alone:

1. Exactly disconnected groups are found first, by a connected-components pass over the
   graph (linear time). Each component ``C`` has the eigenvalue 0 with the known
   eigenvector ``D^1/2 1_C`` (normalised), so these are written down, not computed.
   Lanczos, from a single start vector, cannot tell apart exactly repeated eigenvalues
   and may silently miss some of them; taking them out beforehand avoids that.
2. The remaining eigenpairs come from implicitly restarted Lanczos (ARPACK via
   ``scipy.sparse.linalg.eigsh``, ``which="LA"``) on ``M`` with those eigenvectors
   projected out (deflation), so the solver only ever sees the rest of the spectrum. The
   start vector comes from ``random_state``, so results are reproducible.

Tiny graphs (below ``dense_below`` = 200 samples) use a dense ``numpy.linalg.eigh``
instead, which is faster and exact there. Each eigenvector's sign is fixed
(largest-magnitude entry positive) so that repeated runs return identical vectors.

Algebraic multigrid-preconditioned LOBPCG (``pyamg``) was measured as an alternative on a
100k-sample kNN graph and was several times slower than deflated Lanczos, so it is not
used. Nothing here forms a dense n x n matrix above ``dense_below``.

The number of clusters comes from the eigengap, measured as a *ratio* of consecutive
eigenvalues; :func:`choose_n_clusters` documents the rule and why.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import LinearOperator, eigsh
from threadpoolctl import threadpool_limits

from spray.analysis.config import DEFAULT_MIN_RATIO, DEFAULT_N_EIGEN
DEFAULT_DENSE_BELOW = 200
DEFAULT_FLOOR = 1e-4
DEFAULT_TOL = 1e-8


def normalized_laplacian(graph: sp.spmatrix) -> sp.csr_matrix:
    """``L = I - D^-1/2 W D^-1/2`` as a sparse CSR matrix.

    A sample with no edges (degree 0) gets a zero row in ``D^-1/2 W D^-1/2``, i.e. an
    identity row in ``L``.
    """
    return (sp.identity(graph.shape[0], format="csr") - _normalized_adjacency(graph)).tocsr()


def _normalized_adjacency(graph: sp.spmatrix) -> sp.csr_matrix:
    graph = sp.csr_matrix(graph, dtype=np.float64)
    degree = np.asarray(graph.sum(axis=1)).ravel()
    inv_sqrt = np.zeros_like(degree)
    inv_sqrt[degree > 0] = 1.0 / np.sqrt(degree[degree > 0])
    scale = sp.diags(inv_sqrt)
    return (scale @ graph @ scale).tocsr()


def _fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each column so its largest-magnitude entry is positive (deterministic output)."""
    pivots = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[pivots, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def null_vectors(graph: sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of ``graph`` and the Laplacian null vector of each.

    Returns:
        ``(component, weight)``: component id per sample, numbered by decreasing size
        (ties: smallest first member), and ``weight`` (n,) such that the null vector of
        component ``c`` is ``weight * (component == c)``, of unit length. Samples without
        edges get weight 0 (their Laplacian row is the identity: eigenvalue 1, not 0).
    """
    graph = sp.csr_matrix(graph)
    _, raw = connected_components(graph, directed=False)
    degree = np.asarray(graph.sum(axis=1)).ravel()
    found, first, counts = np.unique(raw, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    renumber = np.empty(len(found), dtype=np.int64)
    renumber[order] = np.arange(len(found))
    component = renumber[np.searchsorted(found, raw)]
    mass = np.bincount(component, weights=degree)
    scale = np.zeros_like(mass)
    scale[mass > 0] = 1.0 / np.sqrt(mass[mass > 0])
    return component, np.sqrt(degree) * scale[component]


def laplacian_eigenpairs(
    graph: sp.spmatrix,
    n_eigen: int = DEFAULT_N_EIGEN,
    random_state: int = 0,
    dense_below: int = DEFAULT_DENSE_BELOW,
    tol: float = DEFAULT_TOL,
) -> tuple[np.ndarray, np.ndarray]:
    """Smallest eigenpairs of the normalised Laplacian of ``graph``.

    Args:
        graph: symmetric (n, n) sparse affinity matrix.
        n_eigen: how many eigenpairs; capped at ``n - 1``.
        random_state: seeds the Lanczos start vector.
        dense_below: below this many samples use a dense eigendecomposition.
        tol: relative accuracy of the Lanczos eigenvalues.

    Returns:
        ``(eigenvalues, eigenvectors)``: (m,) ascending, clipped to [0, 2], and (n, m)
        orthonormal columns in the same order. Exactly disconnected components come
        first, largest component first.
    """
    n = graph.shape[0]
    m = max(1, min(int(n_eigen), n - 1))
    if n < dense_below:
        adjacency = _normalized_adjacency(graph)
        # one BLAS thread: small matrices gain nothing from more, and on a busy machine
        # spinning BLAS threads can make this 50x slower
        with threadpool_limits(limits=1, user_api="blas"):
            values, vectors = np.linalg.eigh(adjacency.toarray())
        values, vectors = values[::-1][:m], vectors[:, ::-1][:, :m]
        return np.clip(1.0 - values, 0.0, 2.0), _fix_signs(vectors)

    component, weight = null_vectors(graph)
    n_components = int(component.max()) + 1
    has_edges = np.bincount(component, weights=weight**2, minlength=n_components) > 0
    null_ids = np.flatnonzero(has_edges)[:m]
    n_null = len(null_ids)
    null = np.zeros((n, n_null))
    for column, cid in enumerate(null_ids):
        members = component == cid
        null[members, column] = weight[members]
    if n_null == m:
        return np.zeros(m), _fix_signs(null)

    adjacency = _normalized_adjacency(graph)
    null_weight = weight  # zero on samples without edges; every null vector is removed

    def deflate(vector: np.ndarray) -> np.ndarray:
        # subtract the projection on every null vector at once: O(n) for any count
        coefficients = np.bincount(component, weights=null_weight * vector, minlength=n_components)
        return vector - null_weight * coefficients[component]

    operator = LinearOperator(
        (n, n), matvec=lambda v: deflate(adjacency @ deflate(np.ravel(v))), dtype=np.float64
    )
    start = deflate(np.random.default_rng(random_state).uniform(0.5, 1.5, size=n))
    k = m - n_null
    values, vectors = eigsh(
        operator,
        k=k,
        which="LA",
        v0=start,
        ncv=min(n, max(2 * k + 1, k + 32)),
        tol=tol,
        maxiter=max(1000, 20 * n),
    )
    order = np.argsort(-values, kind="stable")
    eigenvalues = np.concatenate([np.zeros(n_null), np.clip(1.0 - values[order], 0.0, 2.0)])
    eigenvectors = np.hstack([null, vectors[:, order]])
    # rounding can leave a deflated eigenvalue a hair below a null one: keep them ascending
    ascending = np.argsort(eigenvalues, kind="stable")
    return eigenvalues[ascending], _fix_signs(eigenvectors[:, ascending])


def choose_n_clusters(
    eigenvalues: np.ndarray,
    max_clusters: int,
    min_ratio: float = DEFAULT_MIN_RATIO,
    floor: float = DEFAULT_FLOOR,
) -> int:
    """Number of clusters by the eigengap heuristic, with gaps measured as ratios.

    With ascending eigenvalues ``lambda_1 <= lambda_2 <= ...`` (1-based, ``lambda_1 ~ 0``)
    the gap after the k-th eigenvalue is measured on a log scale,
    ``r_k = (lambda_(k+1) + floor) / (lambda_k + floor)``. The rule:

    1. Candidates are ``k = 2 .. K`` with ``K = min(max_clusters, len(eigenvalues) - 1)``.
    2. ``k* = argmax_k r_k`` (the smallest such ``k`` on ties).
    3. Return ``k*`` if ``r_(k*) >= min_ratio``; otherwise there is no clear gap and the
       answer is 1 (one strategy).

    Why ratios and not differences ``lambda_(k+1) - lambda_k``: heatmaps of one class
    usually vary smoothly (object position, size), so the class forms a continuum whose
    kNN-graph spectrum rises gradually from 0 on a scale that shrinks as the class grows
    (``lambda_2`` ~ 0.03 at 200 samples, ~ 0.01 at 1000). A separate group adds one
    eigenvalue near 0 *below* that continuum: ``0, 0, 0.03, 0.06, ...``. Its absolute gap
    (0.03) is no larger than the continuum's own gaps, but its ratio is orders of magnitude
    larger. For a continuum the ratios stay small: about 2 for a 2-d family of maps and
    at most about 4 for a 1-d family (a path graph's ``lambda_3 / lambda_2`` tends to 4),
    so ``min_ratio = 5`` splits only clearly separate groups. The default is 1.5: splits are
    proposals, and the causal test (``spray.confirm``) decides which cluster is flagged;
    bench Q3's dev split chose it. ``floor`` (1e-4 on the [0, 2] scale) keeps
    numerically-zero eigenvalues of disconnected components from producing meaningless
    ratios between themselves.

    ``k = 1`` is not a candidate because ``lambda_1 = 0`` makes its ratio large for every
    connected graph; it is the answer whenever no later gap is clear.

    Returns 1 when ``max_clusters < 2`` or fewer than three eigenvalues are given.
    """
    values = np.maximum(np.asarray(eigenvalues, dtype=np.float64), 0.0)
    limit = min(int(max_clusters), len(values) - 1)
    if limit < 2:
        return 1
    ratios = (values[2 : limit + 1] + floor) / (values[1:limit] + floor)
    best = int(np.argmax(ratios))
    if ratios[best] < min_ratio:
        return 1
    return best + 2
