"""The GPU catalog: every entry well-formed, sourced, and consistent with what its name says."""

import pytest

from memfit.errors import MemfitError
from memfit.gpus import all_gpus, get_gpu

GIB = 2**30
REQUIRED = ["rtx-3090", "rtx-4090", "rtx-5090", "a10", "a10g", "l4", "l40s", "rtx-a6000", "rtx-6000-ada",
            "a100-40gb", "a100-40gb-pcie", "a100-80gb", "a100-80gb-pcie", "h100-80gb", "h100-80gb-pcie",
            "h100-nvl", "h200", "b200", "mi300x", "t4", "v100-16gb", "v100-32gb"]
# size as sold (in GiB for HBM, GB~GiB for GDDR); the driver total sits 0.5-12% below it (ECC, reserved memory)
SOLD_GB = {"rtx-3090": 24, "rtx-4090": 24, "rtx-5090": 32, "a10": 24, "a10g": 24, "l4": 24, "l40s": 48,
           "rtx-a6000": 48, "rtx-6000-ada": 48, "a100-40gb": 40, "a100-40gb-pcie": 40, "a100-80gb": 80,
           "a100-80gb-pcie": 80, "h100-80gb": 80, "h100-80gb-pcie": 80, "h100-nvl": 94, "h200": 141,
           "b200": 180, "mi300x": 192, "t4": 16, "v100-16gb": 16, "v100-32gb": 32}


def test_catalog_has_the_cards_asked_for():
    names = {g.name for g in all_gpus()}
    assert set(REQUIRED) <= names


@pytest.mark.parametrize("name", REQUIRED)
def test_entry_is_sourced_and_plausible(name):
    g = get_gpu(name)
    assert g.source and g.memory_source
    # the driver total is below the size sold and above 85% of it (loose band: catches unit slips, GB vs MiB)
    assert 0.85 * SOLD_GB[name] * GIB < g.memory_bytes < SOLD_GB[name] * GIB
    assert g.fp16_flops > g.fp32_flops > 0
    assert g.memory_bandwidth_bytes_per_s > 1e11
    assert g.pcie_bytes_per_s > 0 and g.interconnect_bytes_per_s >= g.pcie_bytes_per_s * 0.99


def test_h100_matches_the_committed_records():
    # the H100 records in validation/records report torch total_memory 85029158912 bytes (79.19 GiB)
    assert get_gpu("H100").memory_bytes == 85029158912


def test_aliases_and_unknown_names():
    assert get_gpu("RTX 4090").name == "rtx-4090"
    assert get_gpu("A100").name == "a100-80gb"
    with pytest.raises(MemfitError):
        get_gpu("h1000")


def test_serving_cards_of_the_published_logs():
    """The cards the published vLLM logs name (validation/serving/logs): the 96 GB H20 is `h20` (what
    nvidia-smi calls both variants), the 141 GB one `h20-141gb` (the H200's 139.80 GiB, which the DP8 logs'
    pair of utilizations implies); GB10 reports its unified 119.63 GiB; the China-market A800 / H800 / L20
    keep their siblings' memory and tensor rates with the narrower NVLink."""
    from memfit.gpus import get_gpu

    GiB = 2 ** 30
    assert get_gpu("h20").memory_bytes < 96 * GiB < get_gpu("H20 141GB").memory_bytes
    assert get_gpu("h20-141gb").memory_bytes == get_gpu("h200").memory_bytes
    assert get_gpu("h20").bf16_flops == 148e12 and get_gpu("h20").fp8_flops == 296e12
    assert round(get_gpu("dgx-spark").memory_bytes / GiB, 2) == 119.63
    for card, sibling in (("a800", "a100-80gb"), ("h800", "h100-80gb"), ("l20", "l40s")):
        a, b = get_gpu(card), get_gpu(sibling)
        assert a.memory_bytes == b.memory_bytes and not a.memory_reported
    assert get_gpu("h800").interconnect_bytes_per_s < get_gpu("h100-80gb").interconnect_bytes_per_s
