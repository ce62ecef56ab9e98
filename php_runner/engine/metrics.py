"""Retrieval metrics R1/R5/R10, mAP and mINP with the official definitions (spec 7).

Vectorised on the similarity matrix's device and chunked over queries, so memory is bounded by
``chunk_size x gallery`` whatever the number of queries. Ranking uses a *stable* descending sort: among
equal similarities the lower gallery index ranks first. The official code uses torch's default
(non-stable) sort, which leaves the order of ties to the sort implementation; a stable sort makes ties
deterministic and agrees with it whenever there are no ties.

Image-to-text retrieval is the same call on the transposed matrix:
``retrieval_metrics(similarity.t(), gallery_pids, query_pids)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

CMC_RANKS = (1, 5, 10)


def retrieval_metrics(
    similarity: Tensor, query_pids: Tensor, gallery_pids: Tensor, max_rank: int = 10, chunk_size: int = 1024
) -> dict[str, float]:
    """``{"R1", "R5", "R10", "mAP", "mINP"}`` as percentages; rows of ``similarity`` are queries.

    ``max_rank`` is the official CMC depth; it must reach 10 for R10. mAP and mINP use the full ranking.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be 2-D, got shape {tuple(similarity.shape)}")
    num_queries, num_gallery = similarity.shape
    if query_pids.numel() != num_queries or gallery_pids.numel() != num_gallery:
        raise ValueError(
            f"pids do not match similarity {tuple(similarity.shape)}: "
            f"{query_pids.numel()} query pids, {gallery_pids.numel()} gallery pids"
        )
    if max_rank < max(CMC_RANKS):
        raise ValueError(f"max_rank must be at least {max(CMC_RANKS)}, got {max_rank}")
    if num_queries == 0 or chunk_size < 1:
        raise ValueError("need at least one query and a positive chunk_size")
    device = similarity.device
    query_pids = query_pids.reshape(-1).to(device)
    gallery_pids = gallery_pids.reshape(-1).to(device)
    positions = torch.arange(1, num_gallery + 1, device=device, dtype=torch.float32)

    hits_at = {k: torch.zeros((), device=device, dtype=torch.float64) for k in CMC_RANKS}
    # Per-query values are kept (one float each) so that the result does not depend on the chunking.
    average_precision = torch.empty(num_queries, device=device, dtype=torch.float64)
    inverse_negative_penalty = torch.empty(num_queries, device=device, dtype=torch.float64)
    for start in range(0, num_queries, chunk_size):
        scores = similarity[start : start + chunk_size]
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        matches = gallery_pids[order] == query_pids[start : start + chunk_size, None]
        num_relevant = matches.sum(dim=1)
        if bool((num_relevant == 0).any()):
            first = start + int((num_relevant == 0).nonzero()[0])
            raise ValueError(f"query {first} has no matching gallery item; AP and mINP are undefined")
        for k in CMC_RANKS:
            hits_at[k] += matches[:, :k].any(dim=1).sum()
        hits_so_far = matches.cumsum(dim=1, dtype=torch.float32)  # exact: counts stay below 2**24
        rows = slice(start, start + scores.shape[0])
        average_precision[rows] = ((hits_so_far / positions) * matches).sum(dim=1).double() / num_relevant
        last_match = (matches * positions).amax(dim=1)  # 1-based position of the last relevant item
        inverse_negative_penalty[rows] = num_relevant.double() / last_match.double()
    metrics = {f"R{k}": 100.0 * float(hits_at[k]) / num_queries for k in CMC_RANKS}
    metrics["mAP"] = 100.0 * float(average_precision.mean())
    metrics["mINP"] = 100.0 * float(inverse_negative_penalty.mean())
    return metrics
