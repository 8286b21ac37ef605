"""Cross-modal retrieval metrics, registered in the core metrics registry.

They take the whole evaluated split at once, in the registry's `(y_true, scores)` shape:
`y_true` (Q,) gives for each query (a caption) the index of its item (its video), and
`scores` (Q, N) the similarity of every query to every item. Computed over the split's
full similarity matrix, as video-text papers report them, never per batch.

- `t2v_r1`, `t2v_r5`, `t2v_r10`: fraction of queries whose item ranks in the top K.
- `v2t_r1`, `v2t_r5`, `v2t_r10`: per item, the best rank among its queries, over all
  queries (an item with several captions counts as found when any of them is in the top
  K; the multi-caption convention of CLIP4Clip's evaluation).
- `median_rank`, `mean_rank` (text -> video, the MdR / MnR of CLIP4Clip) and
  `v2t_median_rank`, `v2t_mean_rank`; lower is better. Ranks start at 1.

Ties count against the model: a rank is 1 + the number of other candidates scoring at
least as high, so a model that scores everything equally gets the worst rank, not the
best one.
"""

from __future__ import annotations

import numpy as np
from peftlab.shared.metrics import list_metrics, register_metric


def text_to_video_ranks(item_of_query: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """(Q,) rank (from 1) of each query's own item among all items."""
    item_of_query = np.asarray(item_of_query, dtype=int)
    similarity = np.asarray(similarity, dtype=np.float64)
    own = similarity[np.arange(len(item_of_query)), item_of_query]
    return (similarity >= own[:, None]).sum(axis=1)  # counts the item itself once: rank >= 1


def video_to_text_ranks(item_of_query: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """(N,) per item with at least one query: the best rank of its queries among all queries."""
    item_of_query = np.asarray(item_of_query, dtype=int)
    columns = np.asarray(similarity, dtype=np.float64).T  # (N, Q): each item against every query
    ranks = []
    for item in np.unique(item_of_query):
        own = columns[item, item_of_query == item]
        ranks.append(int((columns[item][None, :] >= own[:, None]).sum(axis=1).min()))
    return np.array(ranks)


def random_ranking_levels(item_of_query: np.ndarray, metric_names) -> dict[str, float]:
    """Each retrieval metric under a uniformly random order of the candidates (no ties):
    the chance level of a model that has learnt nothing (one whose embeddings ignore the
    input scores worse still, since ties count against it). Recalls and mean ranks are
    expected values; median ranks the median of the rank distribution, which the median
    over a split approaches as the split grows.

    Text -> video: a query's rank is uniform on 1..N (N items), so R@K = K/N and the mean
    and median rank (N + 1)/2. Video -> text: an item with m of the Q queries has its best
    rank r with P(best > r) = C(Q - m, r) / C(Q, r); the R@K are the mean of that over
    items, the mean rank the mean of (Q + 1)/(m + 1), the median rank the median of the
    items' pooled distribution."""
    item_of_query = np.asarray(item_of_query, dtype=int)
    queries = len(item_of_query)
    captions_per_item = np.unique(item_of_query, return_counts=True)[1]
    items = len(captions_per_item)
    uniform_ranks = np.arange(1, items + 1)
    # P(best rank > r) for r = 0..Q, one row per item: the running product of (Q - m - i)/(Q - i)
    i = np.arange(queries)
    survival = np.ones((items, queries + 1))
    survival[:, 1:] = np.cumprod(np.clip((queries - captions_per_item[:, None] - i) / (queries - i), 0, None), axis=1)
    pooled_cdf = 1 - survival.mean(axis=0)
    levels = {
        **{f"t2v_r{k}": min(k, items) / items for k in (1, 5, 10)},
        **{f"v2t_r{k}": float(pooled_cdf[min(k, queries)]) for k in (1, 5, 10)},
        "median_rank": float(np.median(uniform_ranks)),
        "mean_rank": float(uniform_ranks.mean()),
        "v2t_median_rank": _median_of(pooled_cdf),
        "v2t_mean_rank": float(np.mean((queries + 1) / (captions_per_item + 1))),
    }
    return {name: levels[name] for name in metric_names if name in levels}


def _median_of(cdf: np.ndarray) -> float:
    """The median of a distribution on 0, 1, 2, ... given its CDF, halfway between two
    ranks where the CDF reaches exactly 1/2 (as `np.median` of an even count)."""
    rank = int(np.argmax(cdf >= 0.5 - 1e-12))
    return rank + 0.5 if np.isclose(cdf[rank], 0.5) else float(rank)


def _recall_at(k: int, ranks_of):
    return lambda y, scores: float(np.mean(ranks_of(y, scores) <= k))


_METRICS = {
    **{f"t2v_r{k}": (_recall_at(k, text_to_video_ranks), True) for k in (1, 5, 10)},
    **{f"v2t_r{k}": (_recall_at(k, video_to_text_ranks), True) for k in (1, 5, 10)},
    "median_rank": (lambda y, s: float(np.median(text_to_video_ranks(y, s))), False),
    "mean_rank": (lambda y, s: float(np.mean(text_to_video_ranks(y, s))), False),
    "v2t_median_rank": (lambda y, s: float(np.median(video_to_text_ranks(y, s))), False),
    "v2t_mean_rank": (lambda y, s: float(np.mean(video_to_text_ranks(y, s))), False),
}
RETRIEVAL_METRICS = tuple(_METRICS)

# Registered once, on first import (a re-import finds them there).
for _name, (_fn, _higher) in _METRICS.items():
    if _name not in list_metrics():
        register_metric(_name, _fn, higher_is_better=_higher)
