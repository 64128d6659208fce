"""Server settings: flags of `dsmd serve`, or DSMD_* environment variables (containers)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields


@dataclass
class Settings:
    bundle: str = "artifacts/bundle"
    index: str = "artifacts/index"
    variant: str = "fp32"  # the bundle variant to run: fp32, int8, fp16 (whichever it ships)
    threads: int = 0  # ONNX Runtime threads per encoder; 0 = the machine's cores
    default_k: int = 10
    max_k: int = 100
    min_score: float | None = None  # drop results scoring below this
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000  # decompression-bomb limit of uploads
    batch_wait_ms: float = 2.0  # how long an encoder call waits for company from concurrent requests
    max_batch: int = 32
    text_cache: int = 2048  # recent text queries kept with their embeddings
    thumb_size: int = 256
    thumb_cache: int = 2048
    token: str | None = None  # enables POST /items and DELETE /items/{id}, for callers presenting it
    upload_dir: str | None = None  # where POST /items stores images (default INDEX/uploads)

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """DSMD_BUNDLE, DSMD_INDEX, DSMD_TOKEN, ... override the defaults; keyword arguments override both."""
        values = {}
        for f in fields(cls):
            raw = os.environ.get(f"DSMD_{f.name.upper()}")
            if raw is None:
                continue
            kind = type(f.default) if f.default is not None else str
            values[f.name] = float(raw) if f.name == "min_score" else kind(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
