"""Collective times on hand-computed cases (alpha-beta, hierarchical, ring vs tree)."""

import dataclasses
import math

import pytest

from colossuslm.plan import comm
from colossuslm.plan.hardware import load_catalogue

EFF = comm.BUS_EFFICIENCY


@pytest.fixture()
def gpu():
    # Round numbers: 100 GB/s NVLink, 10 GB/s network per GPU, 10 us per network hop.
    return dataclasses.replace(
        load_catalogue().gpu("h100"),
        nvlink_domain=8,
        nvlink_bandwidth=100e9,
        scaleout_bandwidth=10e9,
        scaleout_latency=10e-6,
    )


def test_group_placement():
    assert comm.group(8, 1, 8) == comm.Group(8, 8)  # TP: all in one domain
    assert comm.group(4, 2, 8) == comm.Group(4, 4)  # CP after TP2: four per domain
    assert comm.group(64, 8, 8) == comm.Group(64, 1)  # DP after TP8: one per domain
    assert comm.group(1, 1, 8).n == 1
    assert comm.Group(64, 8).domains == 8


def test_reduce_scatter_inside_one_domain(gpu):
    nbytes = 800e6
    expected = 7 / 8 * nbytes / (100e9 * EFF) + 7 * comm.NVLINK_LATENCY
    assert comm.reduce_scatter(nbytes, comm.Group(8, 8), gpu) == pytest.approx(expected)
    assert comm.all_gather(nbytes, comm.Group(8, 8), gpu) == pytest.approx(expected)
    assert comm.all_reduce(nbytes, comm.Group(8, 8), gpu) == pytest.approx(2 * expected)


def test_hierarchical_reduce_scatter(gpu):
    # 32 GPUs, 8 per domain, 4 domains: NVLink carries 7/8 of the buffer, the network 3/4 of 1/8 of it.
    nbytes = 800e6
    inside = 7 / 8 * nbytes / (100e9 * EFF)
    across = 3 / 4 * (nbytes / 8) / (10e9 * EFF)
    latency = 7 * comm.NVLINK_LATENCY + min(3, 2) * 10e-6  # ring 3 hops vs tree log2(4) = 2
    assert comm.reduce_scatter(nbytes, comm.Group(32, 8), gpu) == pytest.approx(inside + across + latency)


def test_tree_latency_wins_at_100k_gpus(gpu):
    g = comm.Group(100_000, 1)
    small = comm.all_reduce(8.0, g, gpu)  # latency-bound
    assert small == pytest.approx(2 * (math.ceil(math.log2(100_000)) * 10e-6 + (1 - 1e-5) * 8 / (10e9 * EFF)), rel=1e-3)
    assert small < 1e-3  # a ring would take 2 s of hops


def test_all_to_all_splits_nvlink_and_network(gpu):
    nbytes = 1.6e9
    g = comm.Group(16, 8)
    to_local = nbytes * 7 / 16 / (100e9 * EFF)
    to_remote = nbytes * 8 / 16 / (10e9 * EFF)
    expected = max(to_local, to_remote) + 10e-6 + 16 * comm.ALL_TO_ALL_PEER_COST
    assert comm.all_to_all(nbytes, g, gpu) == pytest.approx(expected)
    assert comm.all_to_all(nbytes, comm.Group(1, 1), gpu) == 0.0


def test_send_recv(gpu):
    assert comm.send_recv(1e9, gpu, across_domains=True) == pytest.approx(1e9 / (10e9 * EFF) + 10e-6)
    assert comm.send_recv(1e9, gpu, across_domains=False) == pytest.approx(1e9 / (100e9 * EFF) + comm.NVLINK_LATENCY)
