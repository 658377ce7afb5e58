"""Float64 NumPy reference of the PNE loss, written from the project's loss specification.

Deliberately naive: Python loops over images, classes and pairs, explicit lists of the
S entries of each set, and an analytic gradient with respect to the embeddings. It
shares no code with pne_jax.
"""

from __future__ import annotations

import numpy as np

NORM_EPSILON = 1e-12


def _tile(pixels: list[int], s: int) -> list[int]:
    """First S entries of the list repeated cyclically (entry i is element i mod n)."""
    return [pixels[i % len(pixels)] for i in range(s)]


def _softmax_max(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(-1, keepdims=True)).max(-1)


def _logsumexp(x: np.ndarray) -> float:
    m = np.max(x)
    return float(m + np.log(np.sum(np.exp(x - m))))


def pne_reference(
    logits,
    labels,
    embeddings,
    *,
    num_samples=100,
    temperature=1.0,
    loss_weight=1.3,
    gate=(0, 199),
    positive_weighting=True,
    ignore_index=255,
    max_pairs_per_image=None,
):
    """Returns (loss, d loss / d embeddings, stats dict) in float64."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    emb = np.asarray(embeddings, np.float64)
    b, h, w, c = logits.shape
    s = num_samples
    grad = np.zeros_like(emb)
    pairs = []  # (image, anchors, positives, negatives, weights of positives, |A|)
    dropped = 0
    for i in range(b):
        lab = labels[i].reshape(-1)
        pred = np.argmax(logits[i].reshape(-1, c), axis=-1)  # first maximum on ties
        conf = _softmax_max(logits[i].reshape(-1, c))
        valid = lab != ignore_index
        correct = valid & (pred == lab)
        kept_here = 0
        for j in sorted(set(lab[valid].tolist())):
            t_j = [p for p in range(h * w) if correct[p] and lab[p] == j]
            wrong_as_j = [p for p in range(h * w) if valid[p] and not correct[p] and pred[p] == j]
            for k in sorted(set(lab[wrong_as_j].tolist())):
                a_jk = [p for p in wrong_as_j if lab[p] == k]
                t_k = [p for p in range(h * w) if correct[p] and lab[p] == k]
                if not t_k or not gate[0] <= len(a_jk) <= gate[1]:
                    continue
                if max_pairs_per_image is not None and kept_here >= max_pairs_per_image:
                    dropped += 1
                    continue
                kept_here += 1
                negatives = t_j if t_j else a_jk
                weights = conf if positive_weighting else np.ones_like(conf)
                pos = _tile(t_k, s)
                pairs.append((i, _tile(a_jk, s), pos, _tile(negatives, s), weights[pos], len(a_jk)))

    num_pairs = len(pairs)
    num_anchors = sum(p[5] for p in pairs)
    stats = {
        "num_pairs": num_pairs,
        "num_anchors": num_anchors,
        "dropped_pairs": dropped,
        "num_entries": num_pairs * s,  # the anchor entries: S per kept pair
    }
    if num_pairs == 0:
        return 0.0, grad, stats

    scale = loss_weight * num_anchors / (num_pairs * s) ** 2
    total = 0.0
    for i, anchors, positives, negatives, weights, _ in pairs:
        e = emb[i].reshape(h * w, -1)
        norms = np.maximum(np.linalg.norm(e, axis=-1), NORM_EPSILON)
        unit = e / norms[:, None]
        for a in anchors:
            # s(a, x) = <e_a, e_x> / (temperature |e_a| |e_x|)
            s_pos = unit[positives] @ unit[a] / temperature
            s_neg = unit[negatives] @ unit[a] / temperature
            log_num = _logsumexp(s_neg)
            log_den = _logsumexp(s_pos + np.log(weights))
            r = np.exp(log_num - log_den)
            total += np.log1p(r)
            # d l / d e_a with |e_a|, the positives, negatives and weights held constant.
            p_neg = np.exp(s_neg - log_num)
            p_pos = np.exp(s_pos + np.log(weights) - log_den)
            d_s = r / (1.0 + r)
            d_unit = d_s * (p_neg @ unit[negatives] - p_pos @ unit[positives]) / temperature
            g = grad[i].reshape(h * w, -1)
            g[a] += scale * d_unit / norms[a]
    return total * scale, grad, stats
