"""Cross-modal retrieval metrics, registered in the core metrics registry.

They take the whole evaluated split at once, in the registry's `(y_true, scores)` shape:
`y_true` (Q,) gives for each query (a caption) the index of its item (its video), and
`scores` (Q, N) the similarity of every query to every item. Computed over the split's
full similarity matrix, as video-text papers report them, never per batch.

- `t2v_r1`, `t2v_r5`, `t2v_r10`: fraction of queries whose item ranks in the top K.
- `v2t_r1`, `v2t_r5`, `v2t_r10`: per item, the rank of its own captions among the items'
  caption groups, each group scored by its best-matching caption (CLIP4Clip's
  multi-sentence evaluation: a max over each video's captions, then one candidate per
  video). With one caption per video (MSR-VTT 1k-A) it is the rank among the captions.
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
    """(N,) per item with at least one query: the rank of its caption group among all
    groups, a group scoring its best caption's similarity to the item."""
    item_of_query = np.asarray(item_of_query, dtype=int)
    similarity = np.asarray(similarity, dtype=np.float64)
    items = np.unique(item_of_query)
    # (groups, items): each item's caption group, scored against every item by its best caption
    group_best = np.stack([similarity[item_of_query == item].max(axis=0) for item in items])
    own = group_best[np.arange(len(items)), items]
    return (group_best[:, items] >= own[None, :]).sum(axis=0)


def random_ranking_levels(items: int, metric_names) -> dict[str, float]:
    """Each retrieval metric over `items` videos when every similarity is drawn
    independently at random (no ties): the chance level of a model that has learnt
    nothing (one whose embeddings ignore the input scores worse still, since ties count
    against it). Recalls and mean ranks are expected values; median ranks the median of
    the rank distribution, which the median over a split approaches as it grows.

    Text -> video: a query's rank is uniform on 1..N. Video -> text too, pooled over the
    items, whatever their caption counts: a larger group wins more often, but every
    item's column is drawn alike, so summed over the items the chance that an item's own
    group lands at rank r is the chance that some group does, 1. Hence R@K = K/N and mean
    and median rank (N + 1)/2 in both directions."""
    middle = (items + 1) / 2
    levels = {f"{direction}_r{k}": min(k, items) / items for direction in ("t2v", "v2t") for k in (1, 5, 10)}
    levels |= dict.fromkeys(("median_rank", "mean_rank", "v2t_median_rank", "v2t_mean_rank"), middle)
    return {name: levels[name] for name in metric_names if name in levels}


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
        register_metric(_name, _fn, higher_is_better=_higher, scores="ranking")
