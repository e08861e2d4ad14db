"""Hardware catalogue: built-in entries, user TOML, runtime device names."""

import pytest

from colossuslm.errors import ColossusError
from colossuslm.plan.hardware import load_catalogue


def test_builtin_catalogue():
    cat = load_catalogue()
    for name in ("a100-40gb", "a100-80gb", "h100", "h800", "h200", "b200", "cpu"):
        gpu = cat.gpu(name)
        assert gpu.peak_bf16 > 0 and gpu.hbm_bytes > 0 and gpu.tdp_w > 0
    assert cat.gpu("h100").peak_bf16 == 989e12
    assert cat.gpu("h800").nvlink_bandwidth < cat.gpu("h100").nvlink_bandwidth
    c = cat.cluster("colossus-100k")
    assert c.n_gpus == 100_000 and c.gpus_per_node == 8 and c.scaleout_bandwidth == 50e9
    assert cat.cluster("whatif-1m").n_gpus == 1_000_000


@pytest.mark.parametrize(
    "device, name",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA H800", "h800"),
        ("NVIDIA B200", "b200"),
        ("NVIDIA GB200", "gb200"),
        ("cpu", "cpu"),
    ],
)
def test_device_names(device, name):
    assert load_catalogue().match_device(device).name == name


def test_unknown_names():
    cat = load_catalogue()
    assert cat.match_device("AMD Instinct MI300X") is None
    with pytest.raises(ColossusError, match="unknown GPU"):
        cat.gpu("tpu-v5")
    with pytest.raises(ColossusError, match="unknown cluster"):
        cat.cluster("nope")


def test_user_file_adds_and_overrides(tmp_path):
    path = tmp_path / "hw.toml"
    path.write_text("""
[gpu.mi300x]
description = "AMD MI300X"
peak_bf16 = 1307e12
peak_fp8 = 2615e12
hbm_bytes = 192e9
hbm_bandwidth = 5.3e12
nvlink_domain = 8
nvlink_bandwidth = 448e9
scaleout_bandwidth = 50e9
scaleout_latency = 5e-6
tdp_w = 750
server_power_w = 1300
gemm_efficiency = 0.5
attention_efficiency = 0.35
kernel_overhead = 5e-6
price_per_hour = 2.0
capital_cost = 20000

[cluster.mi300x-4k]
description = "4,096 MI300X"
pools = [{ gpu = "mi300x", count = 4096 }]
gpus_per_node = 8
""")
    cat = load_catalogue(str(path))
    assert cat.gpu("mi300x").peak_bf16 == 1307e12
    cluster = cat.cluster("mi300x-4k")
    assert cluster.n_gpus == 4096 and cluster.pue > 1  # unset fields take defaults
    assert "h100" in cat.gpus  # built-ins stay


def test_user_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[gpu.x]\npeak_bf16 = 1\n")
    with pytest.raises(ColossusError, match="missing"):
        load_catalogue(str(bad))
    with pytest.raises(ColossusError, match="not found"):
        load_catalogue(str(tmp_path / "absent.toml"))
