"""Settings, validated once at start: MIXSERVE_* environment variables and `python -m server` flags."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.auth import Keyring

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)


def parse_bytes(value: int | str) -> int:
    """1000, '512MB', '2GiB', '1.5G' -> bytes (decimal units; binary with 'i')."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (examples: 1000, 512MB, 2GiB)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    power = "kmgt".index(unit[0]) + 1 if unit else 0
    return int(number * (1024 if unit.endswith("i") else 1000) ** power)


DEMO_MODEL = "demo"
DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "model"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MIXSERVE_",
        cli_prog_name="python -m server",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="ignore",
    )

    model: str = Field(DEMO_MODEL, description="local path of a transformers causal LM, or 'demo'")
    served_model_name: str = Field(
        "", description="the base model's id on /v1 (vLLM's --served-model-name); its folder and path work too"
    )
    adapters_dir: Path = Field(Path("adapters_store"), description="the adapter store: one subfolder per adapter")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    listen_fd: int | None = Field(
        None, ge=0, description="serve on this inherited, bound TCP socket instead of host:port (socket activation)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "bnb-nf4", "bnb-fp4", "bnb-int8", "int8-weight-only"] = Field(
        "none",
        description="quantize the base's Linear layers at load (README, 'Quantized base'); adapters stay in dtype",
    )
    max_adapters_per_request: int = Field(8, ge=1, le=64)
    max_new_tokens: int = Field(1024, ge=1, description="the most tokens one request may ask for")
    max_input_tokens: int = Field(4096, ge=1, description="the longest prompt accepted, in tokens")
    max_batch_size: int = Field(32, ge=1, le=1024, description="the most sequences decoded together")
    max_batch_tokens: int = Field(4096, ge=16, description="the most prompt tokens prefilled in one step (padded)")
    max_queue: int = Field(256, ge=0, description="requests waiting beyond this get 429 with Retry-After")
    kv_cache_memory: int | float | None = Field(
        None,
        description="the KV cache's budget: bytes (e.g. 2GB), or on GPU a fraction of free memory (e.g. 0.8);"
        " default: half of free GPU memory, on CPU room for max_batch_size of the longest requests",
    )
    prefix_cache: bool = Field(
        True, description="reuse the KV cache blocks of a prompt prefix seen before with the same adapters (on|off)"
    )
    paged_attention: bool = Field(
        False,
        description="decode passes of rows of 1,024 tokens or more read each row's KV cache blocks in place"
        " (flex_attention, compiled and checked at start) instead of gathering them (on|off; README, 'Paged"
        " attention')",
    )
    max_loaded_adapters: int | None = Field(None, ge=1, description="adapters resident at once (default: no limit)")
    adapter_memory: int | None = Field(None, description="bytes of resident adapters, e.g. 512MB (default: no limit)")
    host_cache: int = Field(parse_bytes("1GB"), description="bytes of evicted adapters kept in host memory")
    preload: str = Field("", description="adapters to load before /health answers, comma-separated")
    load_retry_seconds: float = Field(1.0, ge=0, description="a failed load is retried after this")
    drain_seconds: float = Field(30.0, ge=0, description="on SIGTERM: how long in-flight requests may finish")
    stall_seconds: float = Field(
        60.0, gt=0, description="/ready fails while the engine has requests but has not finished a step for this long"
    )
    replica_id: str = Field("", description="sent as x-replica (default: hostname:port)")
    allow_pickle: bool = Field(False, description="also load adapter_model.bin (pickle) adapters")
    adapter_sources: str = Field(
        "", description="remote sources mounted under names: 'acme/=s3://bucket/prefix/,shared/=hf://org' (sources)"
    )
    s3_endpoint_url: str = Field("", description="S3-compatible endpoint (MinIO, Ceph, R2); default: AWS's own chain")
    disk_cache: int = Field(parse_bytes("10GB"), description="bytes of fetched adapters kept on local disk")
    disk_cache_dir: Path = Field(
        Path.home() / ".cache" / "mixserve" / "adapters", description="the folder of fetched adapters"
    )
    remote_check_seconds: float = Field(30.0, ge=0, description="a mounted adapter's version is checked this often")
    fetch_timeout: float = Field(30.0, gt=0, description="seconds a call to a remote source may take")
    api_keys: str = Field(
        "", description="API keys, comma-separated, each 'key' or 'key:prefix/|prefix/' (server.auth)"
    )
    api_keys_file: Path | None = Field(None, description="a file of API keys, one per line, as in api_keys")
    max_body_bytes: int = Field(parse_bytes("4MB"), description="request bodies over this get 413")
    request_timeout: float | None = Field(
        None, gt=0, description="seconds a request may take, queue included; then 408, its row freed (default: none)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_lora_rank: int = Field(
        64, ge=1, description="the most ranks a low-rank adapter (LoRA, AdaLoRA, factorised LoHa) takes on a layer"
    )
    _notes: list[str] = PrivateAttr(default_factory=list)  # settings adjusted at validation, logged at start

    @property
    def notes(self) -> list[str]:
        return self._notes

    @model_validator(mode="after")
    def _adapters_per_request_fit(self) -> Settings:
        """A request can never have more adapters than can be resident at once: the per-request limit is
        clamped to MIXSERVE_MAX_LOADED_ADAPTERS (and the start-up log says so)."""
        loaded = self.max_loaded_adapters
        if loaded is not None and self.max_adapters_per_request > loaded:
            self._notes.append(
                f"MIXSERVE_MAX_ADAPTERS_PER_REQUEST ({self.max_adapters_per_request}) exceeds"
                f" MIXSERVE_MAX_LOADED_ADAPTERS ({loaded}): clamped to {loaded}"
            )
            self.max_adapters_per_request = loaded
        return self

    @model_validator(mode="after")
    def _quantization_fits(self) -> Settings:
        """The backend is installed; a checkpoint saved quantized is not asked to be quantized again."""
        from server.quantization import check

        check(self.quantization, self.model_path)
        return self

    @field_validator("adapter_memory", "host_cache", "max_body_bytes", mode="before")
    @classmethod
    def _sizes(cls, value):
        return None if value in (None, "") else parse_bytes(value)

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _cache_budget(cls, value):
        """A number below 1 is a fraction (of free GPU memory); anything else a size in bytes."""
        if value in (None, ""):
            return None
        if isinstance(value, float) or (isinstance(value, str) and re.fullmatch(r"\s*0?\.\d+\s*", value)):
            fraction = float(value)
            if not 0 < fraction < 1:
                raise ValueError(f"a fraction of free GPU memory is between 0 and 1, not {value!r}")
            return fraction
        return parse_bytes(value)

    @field_validator("disk_cache", mode="before")
    @classmethod
    def _disk_size(cls, value):
        return parse_bytes(value)

    @field_validator("adapter_sources")
    @classmethod
    def _sources_mount(cls, value: str) -> str:
        """Every mount names an installed source and a well-formed location (nothing is fetched yet)."""
        from server.adapters.sources import SourceOptions, parse_mounts

        parse_mounts(value, SourceOptions())
        return value

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str) -> str:
        if value != DEMO_MODEL and not Path(value).is_dir():
            raise ValueError(f"{value!r} is not a directory (no model hub is reachable: give a local path)")
        return value

    @field_validator("adapters_dir")
    @classmethod
    def _store_exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"adapter store {str(value)!r} is not a directory")
        return value.resolve()

    @field_validator("api_keys")
    @classmethod
    def _keys_parse(cls, value: str) -> str:
        Keyring.parse(value)
        return value

    @field_validator("api_keys_file")
    @classmethod
    def _keys_file_parses(cls, value: Path | None) -> Path | None:
        if value is not None:
            if not value.is_file():
                raise ValueError(f"API keys file {str(value)!r} is not a file")
            Keyring.parse(value.read_text())
        return value

    @field_validator("device")
    @classmethod
    def _cuda_present(cls, value: str) -> str:
        if value == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
        return value

    @property
    def replica(self) -> str:
        return self.replica_id or f"{socket.gethostname()}:{self.port}"

    @property
    def preload_names(self) -> list[str]:
        return [name.strip() for name in self.preload.split(",") if name.strip()]

    @property
    def model_path(self) -> Path:
        return DEMO_MODEL_DIR if self.model == DEMO_MODEL else Path(self.model)

    @property
    def model_id(self) -> str:
        return "mixserve-demo" if self.model == DEMO_MODEL else self.model_path.name

    @property
    def base_model_ids(self) -> list[str]:
        """What names the base model on /v1, the listed id first: the served name, the folder's name, the path."""
        return list(dict.fromkeys(name for name in (self.served_model_name, self.model_id, self.model) if name))

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)
