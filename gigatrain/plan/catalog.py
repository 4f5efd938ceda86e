"""The hardware catalog: what one accelerator can do, read from hardware.toml.

Figures live in a data file, not in code, so that users add their own machines
(`gigatrain plan --catalog FILE`) and every number carries its source beside it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from gigatrain.config import ConfigError

CATALOG_FILE = Path(__file__).with_name("hardware.toml")


class CatalogError(ConfigError):
    """A bad catalog file or an unknown accelerator; the message is one line for the user.
    A ConfigError, so `gigatrain train` on an unknown GPU ends with that line, not a traceback."""


@dataclass(frozen=True)
class Accelerator:
    name: str
    description: str
    peak_bf16_tflops: float
    peak_fp8_tflops: float
    memory_gb: float
    memory_bw_gbs: float
    scaleup_bw_gbs: float  # NVLink, per GPU, one direction
    scaleup_domain: int  # GPUs in one NVLink domain
    scaleout_bw_gbs: float  # InfiniBand / RoCE, per GPU, one direction
    scaleout_latency_us: float
    tdp_w: float
    gpus_per_node: int
    node_power_w: float
    matmul_efficiency: float
    attention_efficiency: float
    lease_usd_per_gpu_hour: float
    capex_usd_per_gpu: float
    aliases: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def peak_flops(self, precision: str = "bf16") -> float:
        """Dense peak FLOP/s at a precision; fp8 falls back to bf16 where the chip has none."""
        tflops = self.peak_fp8_tflops if precision == "fp8" and self.peak_fp8_tflops > 0 else self.peak_bf16_tflops
        return tflops * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9


_REQUIRED = [f.name for f in fields(Accelerator) if f.name not in ("name", "aliases", "sources", "description")]


def _entry(name: str, table: dict, origin: str) -> Accelerator:
    missing = [key for key in _REQUIRED if key not in table]
    if missing:
        raise CatalogError(f"catalog entry [{name}] in {origin} lacks {', '.join(missing)}; "
                           f"see gigatrain/plan/hardware.toml for the fields an entry needs")
    known = set(_REQUIRED) | {"aliases", "sources", "description"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise CatalogError(f"catalog entry [{name}] in {origin} has unknown field(s) {', '.join(unknown)}; "
                           f"valid fields: {', '.join(sorted(known))}")
    values = {key: table[key] for key in _REQUIRED}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise CatalogError(f"catalog entry [{name}] in {origin}: {key}={value!r} must be a non-negative number")
    values["scaleup_domain"] = max(1, int(values["scaleup_domain"]))
    values["gpus_per_node"] = max(1, int(values["gpus_per_node"]))
    return Accelerator(name=name, description=str(table.get("description", name)),
                       aliases=tuple(table.get("aliases", ())), sources=dict(table.get("sources", {})), **values)


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CatalogError(f"catalog file {str(path)!r} does not exist; pass an existing TOML file") from None
    except tomllib.TOMLDecodeError as err:
        raise CatalogError(f"catalog file {str(path)!r} is not valid TOML: {err}") from None


def load_catalog(extra_files: list[str | Path] = ()) -> dict[str, Accelerator]:
    """The built-in catalog, then each extra file: new names add entries, known names
    replace the fields they set."""
    tables = {name: dict(table) for name, table in _read_toml(CATALOG_FILE).items()}
    origins = {name: str(CATALOG_FILE) for name in tables}
    for path in extra_files:
        for name, table in _read_toml(Path(path)).items():
            if not isinstance(table, dict):
                raise CatalogError(f"catalog file {path}: top-level key {name!r} must be a [name] table")
            key = name.lower()
            merged = tables.get(key, {})
            sources = {**merged.get("sources", {}), **table.get("sources", {})}
            tables[key] = {**merged, **table, "sources": sources}
            origins[key] = str(path)
    return {name: _entry(name, table, origins[name]) for name, table in tables.items()}


def get_accelerator(name: str, catalog: dict[str, Accelerator] | None = None) -> Accelerator:
    catalog = catalog if catalog is not None else load_catalog()
    key = name.lower()
    if key not in catalog:
        raise CatalogError(f"unknown gpu {name!r}; choose one of: {', '.join(catalog)} (or add it with --catalog FILE)")
    return catalog[key]


def accelerator_for_device(device_name: str, catalog: dict[str, Accelerator] | None = None) -> Accelerator:
    """The entry whose alias appears in a CUDA device name such as 'NVIDIA H100 80GB HBM3'.
    The longest matching alias wins, so 'GH200' is not taken for 'H200' and so on."""
    catalog = catalog if catalog is not None else load_catalog()
    matches = [(len(alias), entry) for entry in catalog.values() for alias in entry.aliases
               if alias and alias.lower() in device_name.lower()]
    if not matches:
        raise CatalogError(f"GPU {device_name!r} is not in the hardware catalog; add an entry with an alias "
                           f"for it to a TOML file (see gigatrain/plan/hardware.toml)")
    return max(matches, key=lambda match: match[0])[1]


def peak_bf16_flops_for_device(device_name: str) -> float:
    """Dense bf16 peak FLOP/s of a CUDA device, the denominator of the trainer's MFU."""
    return accelerator_for_device(device_name).peak_flops("bf16")
