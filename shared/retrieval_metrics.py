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
