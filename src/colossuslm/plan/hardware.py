"""The hardware catalogue: accelerators and clusters, read from TOML data.

`hardware.toml` beside this file holds the built-in entries; a user file given with
`--hardware-file` adds or replaces entries by name. Nothing here knows about models.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from colossuslm.errors import ColossusError

BUILTIN_FILE = Path(__file__).with_name("hardware.toml")


@dataclass(frozen=True)
class GPU:
    name: str
    description: str
    peak_bf16: float  # dense FLOP/s
    peak_fp8: float
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    nvlink_domain: int  # GPUs that share one NVLink/NVSwitch fabric
    nvlink_bandwidth: float  # bytes/s per GPU per direction
    scaleout_bandwidth: float  # bytes/s per GPU per direction, across domains
    scaleout_latency: float  # seconds per message hop across the network
    tdp_w: float
    server_power_w: float  # server maximum power per GPU, host included
    gemm_efficiency: float  # fraction of peak a large GEMM reaches
    attention_efficiency: float  # fraction of peak a fused attention kernel reaches
    kernel_overhead: float  # seconds of launch/dispatch cost per kernel
    price_per_hour: float  # US dollars per GPU-hour
    capital_cost: float  # US dollars per GPU, its share of server and network included
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pool:
    gpu: GPU
    count: int


@dataclass(frozen=True)
class Cluster:
    name: str
    description: str
    pools: tuple[Pool, ...]
    gpus_per_node: int
    scaleout_bandwidth: float
    scaleout_latency: float
    pue: float
    storage_write_bandwidth: float  # bytes/s the whole cluster can write checkpoints at
    restart_s: float  # time from a failure to training again (detect, reschedule, reload)
    failures_per_gpu_hour: float
    electricity_per_mwh: float

    @property
    def n_gpus(self) -> int:
        return sum(pool.count for pool in self.pools)

    @property
    def pace_gpu(self) -> GPU:
        """The GPU a synchronous job runs as: slowest peak, then smallest memory, of all pools.

        A step waits for its slowest rank and every rank must fit its shard, so mixing pools
        gains GPUs but not per-GPU speed or memory.
        """
        gpus = [pool.gpu for pool in self.pools]
        slowest = min(g.peak_bf16 for g in gpus)
        gpu = min((g for g in gpus if g.peak_bf16 == slowest), key=lambda g: (g.hbm_bytes, g.hbm_bandwidth))
        # The network is a property of the cluster, not of the GPU's data sheet.
        return dataclasses.replace(
            gpu,
            scaleout_bandwidth=self.scaleout_bandwidth,
            scaleout_latency=self.scaleout_latency,
            nvlink_domain=min(gpu.nvlink_domain, self.gpus_per_node),
        )

    def with_gpus(self, n_gpus: int) -> Cluster:
        """The same cluster resized to `n_gpus`, keeping the pools' proportions."""
        total = self.n_gpus
        pools, left = [], n_gpus
        for i, pool in enumerate(self.pools):
            count = left if i == len(self.pools) - 1 else round(n_gpus * pool.count / total)
            pools.append(Pool(pool.gpu, count))
            left -= count
        return dataclasses.replace(self, pools=tuple(p for p in pools if p.count > 0))


@dataclass(frozen=True)
class Catalogue:
    gpus: dict[str, GPU]
    clusters: dict[str, Cluster]

    def gpu(self, name: str) -> GPU:
        key = name.lower()
        if key in self.gpus:
            return self.gpus[key]
        raise ColossusError(
            f"unknown GPU {name!r}; choose one of: {', '.join(self.gpus)} "
            "(or add a [gpu.NAME] table with --hardware-file)"
        )

    def cluster(self, name: str) -> Cluster:
        if name in self.clusters:
            return self.clusters[name]
        raise ColossusError(
            f"unknown cluster {name!r}; choose one of: {', '.join(self.clusters)} "
            "(or add a [cluster.NAME] table with --hardware-file)"
        )

    def cluster_or_gpus(self, name: str, n_gpus: int | None = None) -> Cluster:
        """A named cluster, or an ad-hoc one of `n_gpus` of the GPU called `name`."""
        if name in self.clusters:
            cluster = self.clusters[name]
            return cluster.with_gpus(n_gpus) if n_gpus else cluster
        gpu = self.gpu(name)
        return ad_hoc_cluster(gpu, n_gpus or gpu.nvlink_domain)

    def match_device(self, device: str) -> GPU | None:
        """The catalogue GPU a runtime device name (e.g. "NVIDIA H100 80GB HBM3") refers to."""
        text = device.lower()
        best: tuple[int, GPU] | None = None
        for gpu in self.gpus.values():
            for alias in (gpu.name, *gpu.aliases):
                a = alias.lower()
                hit = text == a if a == "cpu" else a in text
                if hit and (best is None or len(a) > best[0]):  # the most specific alias wins
                    best = (len(a), gpu)
        return best[1] if best else None


def ad_hoc_cluster(gpu: GPU, n_gpus: int, **overrides: Any) -> Cluster:
    """A homogeneous cluster of `n_gpus` with the GPU's own network figures and plain defaults."""
    values: dict[str, Any] = dict(
        name=f"{n_gpus}x{gpu.name}",
        description=f"{n_gpus} x {gpu.description}",
        pools=(Pool(gpu, n_gpus),),
        gpus_per_node=max(1, gpu.nvlink_domain),
        scaleout_bandwidth=gpu.scaleout_bandwidth,
        scaleout_latency=gpu.scaleout_latency,
        pue=1.3,
        storage_write_bandwidth=max(1e9, 5e8 * n_gpus),
        restart_s=600.0,
        failures_per_gpu_hour=1.97e-5,
        electricity_per_mwh=80.0,
    )
    values.update(overrides)
    return Cluster(**values)


_GPU_FIELDS = {f.name for f in dataclasses.fields(GPU)} - {"name", "aliases"}
_CLUSTER_FIELDS = {f.name for f in dataclasses.fields(Cluster)} - {"name", "pools"}


def _parse_gpu(name: str, raw: dict[str, Any], where: str) -> GPU:
    missing = _GPU_FIELDS - set(raw)
    unknown = set(raw) - _GPU_FIELDS - {"aliases"}
    if missing or unknown:
        problem = f"missing {', '.join(sorted(missing))}" if missing else f"unknown {', '.join(sorted(unknown))}"
        raise ColossusError(f"{where}: [gpu.{name}] has {problem}; every GPU needs: {', '.join(sorted(_GPU_FIELDS))}")
    values = {k: (str(v) if k == "description" else float(v)) for k, v in raw.items() if k != "aliases"}
    values["nvlink_domain"] = int(raw["nvlink_domain"])
    return GPU(name=name, aliases=tuple(raw.get("aliases", ())), **values)


def _parse_cluster(name: str, raw: dict[str, Any], gpus: dict[str, GPU], where: str) -> Cluster:
    known = _CLUSTER_FIELDS | {"pools"}
    unknown = set(raw) - known
    if unknown or "pools" not in raw:
        raise ColossusError(
            f"{where}: [cluster.{name}] needs pools = [{{gpu = NAME, count = N}}] and "
            f"may set: {', '.join(sorted(_CLUSTER_FIELDS))}"
            + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else "")
        )
    pools = []
    for pool in raw["pools"]:
        gpu_name = str(pool.get("gpu", "")).lower()
        if gpu_name not in gpus:
            raise ColossusError(f"{where}: cluster {name!r} uses unknown GPU {gpu_name!r}; known: {', '.join(gpus)}")
        pools.append(Pool(gpus[gpu_name], int(pool["count"])))
    first = pools[0].gpu
    defaults = dataclasses.asdict(ad_hoc_cluster(first, sum(p.count for p in pools)))
    values = {k: defaults[k] for k in _CLUSTER_FIELDS}
    values.update({k: raw[k] for k in raw if k != "pools"})
    values["gpus_per_node"] = int(values["gpus_per_node"])
    for key in _CLUSTER_FIELDS - {"description", "gpus_per_node"}:
        values[key] = float(values[key])
    return Cluster(name=name, pools=tuple(pools), **values)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ColossusError(f"hardware file {str(path)!r} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ColossusError(f"hardware file {path}: not valid TOML: {exc}") from None


@lru_cache(maxsize=8)
def load_catalogue(extra_file: str | None = None) -> Catalogue:
    """The built-in catalogue, with the tables of `extra_file` added or replacing by name."""
    sources = [BUILTIN_FILE] + ([Path(extra_file)] if extra_file else [])
    raw_gpus: dict[str, tuple[dict[str, Any], str]] = {}
    raw_clusters: dict[str, tuple[dict[str, Any], str]] = {}
    for path in sources:
        data = _read_toml(path)
        for section in set(data) - {"gpu", "cluster"}:
            raise ColossusError(f"{path}: unknown table [{section}]; use [gpu.NAME] or [cluster.NAME]")
        for name, table in data.get("gpu", {}).items():
            raw_gpus[name.lower()] = (table, str(path))
        for name, table in data.get("cluster", {}).items():
            raw_clusters[name] = (table, str(path))
    gpus = {name: _parse_gpu(name, table, where) for name, (table, where) in raw_gpus.items()}
    clusters = {name: _parse_cluster(name, table, gpus, where) for name, (table, where) in raw_clusters.items()}
    return Catalogue(gpus=gpus, clusters=clusters)
