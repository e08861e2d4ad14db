"""Time of one collective: alpha-beta model, hierarchical over NVLink domains and the network.

A group of n GPUs has g members inside each NVLink domain and spans k = n / g domains. NCCL's
algorithms move data inside a domain over NVLink first, so across domains each GPU sends only
its 1/g share through its own NIC (every GPU has one). Latency is per hop: a ring pays one per
member, NCCL's double binary tree log2 of the domains, and NCCL picks the cheaper; at 100,000
GPUs that choice is the difference between milliseconds and a quarter of a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from colossuslm.plan.hardware import GPU

# Achieved bus bandwidth over link bandwidth, as nccl-tests report on NVLink and 400G fabrics.
BUS_EFFICIENCY = 0.8
NVLINK_LATENCY = 3e-6  # seconds per hop inside a domain
ALL_TO_ALL_PEER_COST = 0.5e-6  # seconds of set-up per peer of an all-to-all


@dataclass(frozen=True)
class Group:
    """n GPUs, `local` of them per NVLink domain."""

    n: int
    local: int

    @property
    def domains(self) -> int:
        return max(1, self.n // max(1, self.local))


def group(size: int, stride: int, domain: int) -> Group:
    """A communicator of `size` ranks spaced `stride` apart in rank order (inner dimensions first)."""
    if size <= 1:
        return Group(1, 1)
    per_domain = max(1, domain // stride) if stride < domain else 1
    return Group(size, min(size, per_domain))


def _bandwidths(gpu: GPU) -> tuple[float, float]:
    return gpu.nvlink_bandwidth * BUS_EFFICIENCY, gpu.scaleout_bandwidth * BUS_EFFICIENCY


def _latency(g: Group, gpu: GPU, passes: int) -> float:
    """Per-hop latency of `passes` sweeps (2 for all-reduce): ring or tree, whichever is cheaper."""
    inside = passes * (g.local - 1) * NVLINK_LATENCY
    k = g.domains
    if k <= 1:
        return inside
    ring = passes * (k - 1) * gpu.scaleout_latency
    tree = passes * math.ceil(math.log2(k)) * gpu.scaleout_latency
    return inside + min(ring, tree)


def reduce_scatter(nbytes: float, g: Group, gpu: GPU) -> float:
    """Each GPU starts with `nbytes` and ends with its 1/n share reduced (all-gather: the reverse)."""
    if g.n <= 1 or nbytes <= 0:
        return 0.0
    nvlink, network = _bandwidths(gpu)
    local, k = g.local, g.domains
    inside = (local - 1) / local * nbytes / nvlink
    across = (k - 1) / k * (nbytes / local) / network if k > 1 else 0.0
    return inside + across + _latency(g, gpu, 1)


all_gather = reduce_scatter  # same traffic, opposite direction


def all_reduce(nbytes: float, g: Group, gpu: GPU) -> float:
    """Reduce-scatter then all-gather, the bandwidth-optimal all-reduce."""
    return 2.0 * reduce_scatter(nbytes, g, gpu)


def all_to_all(nbytes: float, g: Group, gpu: GPU) -> float:
    """Each GPU sends `nbytes` spread evenly over the group; NVLink and NIC traffic run in parallel."""
    if g.n <= 1 or nbytes <= 0:
        return 0.0
    return exchange(nbytes * (g.local - 1) / g.n, nbytes * (g.n - g.local) / g.n, g, gpu)


def exchange(nvlink_bytes: float, network_bytes: float, g: Group, gpu: GPU) -> float:
    """An all-to-all-like exchange: this GPU's bytes to peers in its domain and beyond it."""
    nvlink, network = _bandwidths(gpu)
    latency = (gpu.scaleout_latency if g.domains > 1 else NVLINK_LATENCY) + g.n * ALL_TO_ALL_PEER_COST
    return max(nvlink_bytes / nvlink, network_bytes / network) + latency


def send_recv(nbytes: float, gpu: GPU, across_domains: bool) -> float:
    """One point-to-point transfer (pipeline stages)."""
    if nbytes <= 0:
        return 0.0
    nvlink, network = _bandwidths(gpu)
    if across_domains:
        return nbytes / network + gpu.scaleout_latency
    return nbytes / nvlink + NVLINK_LATENCY
