"""Reference-based predictors of EVAL.md (numpy / scikit-learn): kNN retrieval and the HEST ridge probe."""

from __future__ import annotations

import numpy as np

ALPHAS = np.logspace(-1, 5, 13)


def knn_retrieval(
    train_features: np.ndarray,
    train_expression: np.ndarray,
    query_features: np.ndarray,
    *,
    k: int = 50,
    temperature: float = 0.1,
    standardize: bool = True,
    batch_size: int = 4096,
) -> np.ndarray:
    """Similarity-weighted mean expression of the ``k`` nearest reference spots (BLEEP / Loki style).

    Features are standardised on the reference spots (``standardize``), L2-normalised and compared by
    cosine; the top ``k`` neighbours are weighted by ``softmax(cos / temperature)``.

    Returns
    -------
    ``(n_query, n_genes)`` predictions.
    """
    tr = np.asarray(train_features, dtype=np.float64)
    q = np.asarray(query_features, dtype=np.float64)
    if standardize:
        mu, sd = tr.mean(0), tr.std(0)
        sd[sd == 0] = 1.0
        tr, q = (tr - mu) / sd, (q - mu) / sd
    tr /= np.maximum(np.linalg.norm(tr, axis=1, keepdims=True), 1e-12)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    y = np.asarray(train_expression, dtype=np.float64)
    k = min(k, len(tr))
    out = np.empty((len(q), y.shape[1]))
    for i in range(0, len(q), batch_size):
        sim = q[i : i + batch_size] @ tr.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        s = np.take_along_axis(sim, top, axis=1) / temperature
        w = np.exp(s - s.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        out[i : i + batch_size] = np.einsum("nk,nkg->ng", w, y[top])
    return out


def _pca_fit(x: np.ndarray, n: int):
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    pca = PCA(n_components=min(n, x.shape[0] - 1, x.shape[1]), random_state=0).fit(scaler.transform(x))
    return lambda z: pca.transform(scaler.transform(z))


def _ridge_path(z: np.ndarray, y: np.ndarray, alphas: np.ndarray):
    """Ridge (with intercept) for every alpha at once, through one SVD: returns ``predict(z_new) -> (A, n, G)``."""
    zm, ym = z.mean(0), y.mean(0)
    u, s, vt = np.linalg.svd(z - zm, full_matrices=False)
    uty = u.T @ (y - ym)
    coefs = [vt.T @ ((s / (s**2 + a))[:, None] * uty) for a in alphas]

    def predict(znew: np.ndarray) -> np.ndarray:
        return np.stack([(znew - zm) @ c + ym for c in coefs])

    return predict


def ridge_probe(
    train_features: np.ndarray,
    train_expression: np.ndarray,
    query_features: np.ndarray,
    *,
    n_pca: int = 256,
    alphas: np.ndarray = ALPHAS,
    n_folds: int = 5,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """HEST's linear probe: StandardScaler -> PCA(256) -> Ridge, one α chosen by random 5-fold CV (MSE).

    The scaler and the PCA are refit in every fold; α comes from a 13-point log grid 1e-1 … 1e5 (EVAL.md)
    and is shared by all columns of ``train_expression`` (call once per gene panel).

    Returns
    -------
    ``(predictions (n_query, n_genes), alpha)``.
    """
    from sklearn.model_selection import KFold

    x = np.asarray(train_features, dtype=np.float64)
    y = np.asarray(train_expression, dtype=np.float64)
    alphas = np.asarray(alphas, dtype=np.float64)
    mse = np.zeros(len(alphas))
    for tr, va in KFold(n_folds, shuffle=True, random_state=seed).split(x):
        proj = _pca_fit(x[tr], n_pca)
        pred = _ridge_path(proj(x[tr]), y[tr], alphas)(proj(x[va]))
        mse += ((pred - y[va][None]) ** 2).mean(axis=(1, 2))
    alpha = float(alphas[int(np.argmin(mse))])
    proj = _pca_fit(x, n_pca)
    pred = _ridge_path(proj(x), y, np.array([alpha]))(proj(np.asarray(query_features, dtype=np.float64)))[0]
    return pred, alpha
