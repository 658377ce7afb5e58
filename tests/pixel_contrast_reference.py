"""Float64 NumPy reference of the ICCV 2021 pixel contrast, written from its specification.

Deliberately naive: Python loops over images, classes and anchors, and a gradient with
respect to the embeddings derived by hand (through the L2 normalisation). The random
choice of anchors is the one thing it takes from the implementation (their pixels); it
checks the rules that choice must follow separately (`check_sample`). It shares no code
with pne_jax.
"""

from __future__ import annotations

import numpy as np

NORM_EPSILON = 1e-12


def candidates(logits, labels, *, max_views, max_samples, ignore_index=255):
    """The (image, class) candidates in (image, class) order, n_view, and per candidate
    the hard and easy pixel lists and how many of each are kept."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    b, h, w, c = logits.shape
    found = []
    for i in range(b):
        lab = labels[i].reshape(-1)
        pred = np.argmax(logits[i].reshape(-1, c), axis=-1)  # first maximum on ties
        for cls in sorted(set(lab.tolist()) - {ignore_index}):
            if not 0 <= cls < c:
                continue
            pixels = [p for p in range(h * w) if lab[p] == cls]
            if len(pixels) > max_views:
                hard = [p for p in pixels if pred[p] != cls]
                easy = [p for p in pixels if pred[p] == cls]
                found.append((i, cls, hard, easy))
    total = len(found)
    n_view = min(max_samples // total, max_views) if total else 0
    out = []
    for i, cls, hard, easy in found:
        nh, ne = len(hard), len(easy)
        if nh >= n_view / 2 and ne >= n_view / 2:
            keep_hard = n_view // 2
            keep_easy = n_view - keep_hard
        elif nh >= n_view / 2:
            keep_easy = ne
            keep_hard = n_view - keep_easy
        elif ne >= n_view / 2:
            keep_hard = nh
            keep_easy = n_view - keep_hard
        else:
            raise AssertionError("a candidate has more than max_views >= n_view pixels")
        out.append(dict(image=i, cls=cls, hard=hard, easy=easy, keep=(keep_hard, keep_easy)))
    return out, n_view


def check_sample(sample, logits, labels, *, max_views, max_samples, ignore_index=255):
    """Asserts that the sampled anchors follow the rules; returns (candidates, n_view)."""
    found, n_view = candidates(
        logits, labels, max_views=max_views, max_samples=max_samples, ignore_index=ignore_index
    )
    image, pixel, label, hard, valid = (
        np.asarray(x) for x in (sample.image, sample.pixel, sample.label, sample.hard, sample.valid)
    )
    n = len(found) * n_view
    assert int(sample.num_candidates) == len(found)
    assert int(sample.n_view) == n_view
    assert valid.shape == (max_samples,)
    assert valid.tolist() == [r < n for r in range(max_samples)]
    rows = list(zip(image[:n].tolist(), pixel[:n].tolist(), strict=True))
    assert len(set(rows)) == n, "a pixel was chosen twice"
    for k, cand in enumerate(found):
        block = slice(k * n_view, (k + 1) * n_view)  # candidate after candidate
        assert set(image[block].tolist()) <= {cand["image"]}
        assert set(label[block].tolist()) <= {cand["cls"]}
        chosen_hard = [p for p, hd in zip(pixel[block], hard[block], strict=True) if hd]
        chosen_easy = [p for p, hd in zip(pixel[block], hard[block], strict=True) if not hd]
        assert (len(chosen_hard), len(chosen_easy)) == cand["keep"], (cand["keep"], k)
        assert set(chosen_hard) <= set(cand["hard"])
        assert set(chosen_easy) <= set(cand["easy"])
    # Independently of the candidate blocks: every anchor's label and hardness are right.
    b, hh, ww, c = np.shape(logits)
    labels_flat = np.asarray(labels).reshape(b, -1)
    pred = np.argmax(np.asarray(logits).reshape(b, -1, c), axis=-1)
    for r in range(n):
        assert labels_flat[image[r], pixel[r]] == label[r]
        assert (pred[image[r], pixel[r]] != label[r]) == hard[r]
    return found, n_view


def pixel_contrast_reference(
    labels,
    embeddings,
    anchors,
    *,
    temperature=0.1,
    base_temperature=0.07,
    loss_weight=0.1,
    normalize=True,
):
    """Loss, d loss / d embeddings and stats in float64 for the given anchors.

    Args:
      labels: [B, h, w] ground truth.
      embeddings: [B, h, w, D].
      anchors: list of (image, flat pixel) pairs, the anchors in any order.
    """
    labels = np.asarray(labels)
    emb = np.asarray(embeddings, np.float64)
    b, h, w, d = emb.shape
    x = np.array([emb[i].reshape(h * w, d)[p] for i, p in anchors]).reshape(len(anchors), d)
    y = [int(labels[i].reshape(-1)[p]) for i, p in anchors]
    n = len(anchors)
    if normalize:
        norms = np.maximum(np.linalg.norm(x, axis=-1), NORM_EPSILON)
        f = x / norms[:, None]
    else:
        f = x
    t = temperature
    s = f @ f.T / t
    ratio = t / base_temperature

    per_anchor = {}  # i -> (positives, negatives)
    for i in range(n):
        pos = [j for j in range(n) if j != i and y[j] == y[i]]
        neg = [k for k in range(n) if y[k] != y[i]]
        if pos:
            per_anchor[i] = (pos, neg)
    count = len(per_anchor)
    stats = {"num_anchors": count, "num_sampled": n}
    grad = np.zeros_like(emb)
    if count == 0:
        return 0.0, grad, stats

    total = 0.0
    d_s = np.zeros((n, n))  # d loss / d s
    scale = loss_weight * ratio / count
    for i, (pos, neg) in per_anchor.items():
        if not neg:  # log_prob = s_ij - log(exp(s_ij)) = 0 for every positive
            continue
        top = max(s[i, k] for k in neg)
        lse_neg = top + np.log(sum(np.exp(s[i, k] - top) for k in neg))
        soft_neg = {k: np.exp(s[i, k] - lse_neg) for k in neg}
        for j in pos:
            # -log_prob_ij = log(1 + exp(lse_neg - s_ij))
            z = lse_neg - s[i, j]
            total += np.logaddexp(0.0, z) / len(pos)
            sig = 1.0 / (1.0 + np.exp(-z))
            coef = scale * sig / len(pos)
            d_s[i, j] -= coef
            for k in neg:
                d_s[i, k] += coef * soft_neg[k]
    loss = scale * total
    stats["term_sum"] = ratio * total

    d_f = (d_s + d_s.T) @ f / t
    if normalize:
        d_x = np.empty_like(d_f)
        for r in range(n):
            if np.linalg.norm(x[r]) > NORM_EPSILON:
                d_x[r] = (d_f[r] - f[r] * (f[r] @ d_f[r])) / norms[r]
            else:
                d_x[r] = d_f[r] / NORM_EPSILON
    else:
        d_x = d_f
    for r, (i, p) in enumerate(anchors):
        grad[i].reshape(h * w, d)[p] += d_x[r]
    return loss, grad, stats
