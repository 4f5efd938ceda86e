"""The hardware catalog: every figure sourced, device names resolved, files merged."""

import pytest

from gigatrain.config import ConfigError
from gigatrain.plan.catalog import _REQUIRED, CatalogError, accelerator_for_device, load_catalog, peak_bf16_flops_for_device


def test_every_built_in_figure_has_a_source():
    catalog = load_catalog()
    assert {"a100", "h100", "h200", "b200", "gb200", "cpu"} <= set(catalog)
    for name, entry in catalog.items():
        assert not [k for k in _REQUIRED if not entry.sources.get(k)], name


@pytest.mark.parametrize("device, name, peak", [
    ("NVIDIA A100-SXM4-80GB", "a100", 312e12),
    ("NVIDIA H100 80GB HBM3", "h100", 989e12),
    ("NVIDIA H200", "h200", 989e12),
    ("NVIDIA B200", "b200", 2250e12),
    ("NVIDIA GB200", "gb200", 2500e12),
])
def test_cuda_device_names(device, name, peak):
    assert accelerator_for_device(device).name == name
    assert peak_bf16_flops_for_device(device) == peak


def test_unknown_device_is_a_config_error():
    with pytest.raises(ConfigError, match="not in the hardware catalog"):
        peak_bf16_flops_for_device("Some Future GPU")


def test_bad_catalog_files(tmp_path):
    missing = tmp_path / "missing.toml"
    missing.write_text('[x1]\npeak_bf16_tflops = 1.0\n')
    with pytest.raises(CatalogError, match="lacks"):
        load_catalog([missing])
    typo = tmp_path / "typo.toml"
    typo.write_text('[h100]\nmemroy_gb = 96\n')
    with pytest.raises(CatalogError, match="unknown field"):
        load_catalog([typo])
    override = tmp_path / "h100-96.toml"
    override.write_text('[H100]\nmemory_gb = 96.0\n[H100.sources]\nmemory_gb = "our H100 96GB nodes"\n')
    h100 = load_catalog([override])["h100"]
    assert h100.memory_gb == 96.0 and h100.sources["memory_gb"] == "our H100 96GB nodes"
    assert h100.sources["tdp_w"]  # the other sources stay
