"""Connected clusters of selected atoms (solid-like atoms in a melt), as tensor ops.

Nodes are the selected atoms (e.g. ``dH <= 0`` against a reference solid); an edge joins two
selected atoms of the same structure at most ``cutoff`` apart, periodic images included
(default :data:`DEFAULT_CLUSTER_CUTOFF`, 3.0 Å). Clusters are the connected components of that
graph, found by min-label propagation with pointer jumping (``scatter_reduce(amin)`` over the
edges, then ``label = label[label]``) until nothing changes: vectorised, on the device of the
inputs, no Python loop over atoms; the number of sweeps grows like the logarithm of the cluster
diameter.
"""

from __future__ import annotations

import torch

from .checks import DEFAULT_CLUSTER_CUTOFF, check_cutoff
from .neighbors import find_neighbor_pairs

__all__ = ["DEFAULT_CLUSTER_CUTOFF", "cluster_labels", "connected_components", "largest_cluster"]

#: Å added to the cutoff so that pairs exactly ``cutoff`` apart are joined (``d <= cutoff``)
_EDGE_MARGIN = 1e-9


def connected_components(n_nodes: int, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Label of the connected component of every node of an undirected graph.

    Args:
        n_nodes: number of nodes.
        src: ``[n_edges]`` int64 edge ends.
        dst: ``[n_edges]`` int64 other edge ends (each edge may be given in one or both
            directions).

    Returns:
        ``[n_nodes]`` int64: the smallest node index of each node's component.
    """
    device = src.device
    label = torch.arange(n_nodes, device=device)
    if src.numel() == 0:
        return label
    a = torch.cat([src, dst])
    b = torch.cat([dst, src])
    while True:
        new = label.scatter_reduce(0, a, label[b], reduce="amin", include_self=True)
        new = new[new]
        new = new[new]
        if torch.equal(new, label):
            return label
        label = new


def largest_cluster(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
    mask: torch.Tensor,
    cutoff: float = DEFAULT_CLUSTER_CUTOFF,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size of the largest cluster of selected atoms in every structure of a batch.

    Args:
        positions: ``[n_atoms, 3]`` Cartesian positions (Å).
        cell: ``[n_systems, 3, 3]`` lattice vectors as rows.
        pbc: ``[n_systems, 3]`` bool periodicity along each lattice vector.
        system_idx: ``[n_atoms]`` sorted structure index of each atom.
        mask: ``[n_atoms]`` bool, the selected atoms (graph nodes).
        cutoff: largest edge length between two selected atoms (Å, default 3.0).

    Returns:
        ``(sizes, labels)``: ``[n_systems]`` int64 number of atoms in the largest cluster
        of each structure (0 when it has no selected atom) and the ``[n_atoms]`` int64
        cluster label of every atom: for a selected atom the smallest atom index of its
        cluster (global index into ``positions``), ``-1`` for atoms not selected.
    """
    if mask.shape != system_idx.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"`mask` must be a bool tensor of shape {tuple(system_idx.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    cutoff = check_cutoff(cutoff)
    n = positions.shape[0]
    with torch.no_grad():
        # only the selected atoms are searched (pairs of other atoms are no edges: with a
        # fraction f selected, f of the atoms and ~f^2 of the pairs). The pair search keeps
        # d < r; the small margin makes the edges d <= cutoff
        sel = torch.nonzero(mask).squeeze(1)  # increasing: the smallest index stays smallest
        pairs = find_neighbor_pairs(
            positions.detach().index_select(0, sel),
            cell.detach(),
            pbc,
            system_idx.index_select(0, sel),
            cutoff + _EDGE_MARGIN,
        )
        label = connected_components(sel.shape[0], pairs.center, pairs.neighbor)
        labels = torch.full((n,), -1, dtype=torch.int64, device=positions.device)
        labels[sel] = sel[label]
    sel = labels[mask]
    size = torch.bincount(sel, minlength=n)  # size[root] = atoms in that cluster
    best = torch.zeros(cell.shape[0], dtype=torch.int64, device=positions.device)
    best.scatter_reduce_(0, system_idx, size, reduce="amax", include_self=True)
    return best, labels


def cluster_labels(*args, **kwargs) -> torch.Tensor:
    """The ``[n_atoms]`` cluster labels alone: ``largest_cluster(...)[1]``.

    Args:
        *args: the arguments of :func:`largest_cluster`.
        **kwargs: its keywords.

    Returns:
        ``[n_atoms]`` int64: for a selected atom the smallest atom index of its cluster,
        ``-1`` for atoms not selected.
    """
    return largest_cluster(*args, **kwargs)[1]
