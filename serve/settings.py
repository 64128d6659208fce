"""Server settings: flags of `dsmd serve`, or DSMD_* environment variables (containers).

pydantic-settings reads and checks them, so a bad value (`DSMD_MAX_K=-1`, `DSMD_THREADS=x`)
stops start-up with a message naming the variable, instead of failing on the first request.
The limits here are what keeps the server's memory under a ceiling you can state: see
`memory_budget_bytes`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dsmd.errors import UserError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DSMD_", extra="forbid", validate_assignment=True)

    # one collection: a folder each; several: NAME=PATH entries, comma-separated (serve/collections.py); a
    # bundle entry without a name serves every collection that has none of its own
    bundle: str = "artifacts/bundle"
    index: str = "artifacts/index"
    variant: Literal["fp32", "int8", "fp16"] = "fp32"  # the bundle variant to run (whichever it ships)
    backend: Literal["faiss", "milvus"] | None = None  # None: as the index was built; else it must be that one
    milvus_uri: str | None = None  # a Milvus-backed index's vectors, when not at the URI it was built with
    threads: int = Field(0, ge=0)  # ONNX Runtime threads per encoder; 0 = the cores this process may use
    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1, le=10_000)
    min_score: float | None = None  # drop results scoring below this
    # -- writes
    token: str | None = None  # enables POST /items and DELETE /items/{id}, for callers presenting it
    token_file: str | None = None  # read the token from this file (keeps it out of `ps` and the environment)
    writes: bool = True  # False: never write the index (also automatic when its folder cannot be written)
    upload_dir: str | None = None  # where POST /items stores images (default INDEX/uploads; UPLOAD_DIR/NAME each
    # when the server has several collections)
    # -- uploads: what one image may cost
    max_upload_bytes: int = Field(10 * 2**20, ge=1024)
    max_pixels: int = Field(12_000_000, ge=64 * 64)  # after a JPEG's reduced decode; other formats as sent
    # -- admission: past a gate, a short queue; past the queue (or its wait), a fast 503 with Retry-After
    max_text_requests: int = Field(64, ge=1)  # /search and /similar requests inside the server at once
    max_image_requests: int = Field(4, ge=1)  # image uploads being decoded, encoded or searched at once
    max_write_requests: int = Field(2, ge=1)  # POST/DELETE /items at once
    max_thumbnail_requests: int = Field(2, ge=1)  # thumbnails being made at once (each holds a worker thread)
    decode_slots: int = Field(2, ge=1)  # images decoded at the same moment
    admission_queue: int = Field(64, ge=0)  # requests per gate waiting for a slot (0: refuse at once)
    queue_wait_share: float = Field(0.5, gt=0, le=1)  # of request_timeout_s a request may wait in a queue
    max_queue: int = Field(256, ge=1)  # inputs waiting for an encoder
    request_timeout_s: float = Field(5.0, gt=0)  # a request not answered by then (after its body) gets a 503
    header_timeout_s: float = Field(10.0, gt=0)  # a request's headers must be complete by then (408 and close)
    # -- upload bodies: read before a request takes a slot, under a budget of bytes and a minimum rate
    body_budget_bytes: int | None = Field(None, ge=65536)  # bodies held at once; None: 4 of the largest
    body_grace_s: float = Field(5.0, gt=0)  # how long a body may take before the minimum rate applies
    min_upload_rate: float = Field(10_000, gt=0)  # bytes a second a body must keep up after its grace, else 408
    # -- encoders
    batch_wait_ms: float = Field(2.0, ge=0)  # how long an encoder call waits for company from concurrent requests
    max_batch: int = Field(32, ge=1)
    encode_delay_ms: float = Field(0.0, ge=0)  # fault injection for tests: a slow encoder
    compact_delay_ms: float = Field(0.0, ge=0)  # fault injection for tests: a slow background compaction
    # ONNX Runtime's threads spin while waiting for work: on for texts (a text is many small operators,
    # and threads that sleep between them wake for each one), off for images (spinning threads take a
    # core from the decoding of the next upload); the figures: BENCHMARKS.md, "Serving under load"
    text_spinning: bool = True
    image_spinning: bool = False
    # -- caches
    text_cache: int = Field(2048, ge=0)  # recent text queries kept with their embeddings
    thumb_size: int = Field(256, ge=16, le=1024)
    thumb_cache: int = Field(2048, ge=0)
    # -- index maintenance
    reload_check_s: float = Field(2.0, gt=0)  # how often to look for an index rebuilt by another process

    @model_validator(mode="after")
    def _check(self) -> Settings:
        from dsmd.serve.collections import specs

        specs(self.index, self.bundle)  # names and bundles that fit together, before anything loads
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must not exceed max_k ({self.max_k})")
        if self.token_file:
            path = Path(self.token_file)
            if not path.is_file():
                raise ValueError(f"token_file {path} does not exist")
            object.__setattr__(self, "token", path.read_text(encoding="utf-8").strip() or None)
        largest = self.max_upload_bytes * 4 // 3 + 65536  # the body of the largest upload (serve/uploads.py)
        if self.body_budget_bytes is None:
            object.__setattr__(self, "body_budget_bytes", 4 * largest)
        elif self.body_budget_bytes < largest:
            raise ValueError(f"body_budget_bytes ({self.body_budget_bytes:,}) must hold at least one upload of "
                             f"max_upload_bytes ({largest:,} bytes of body): raise it or lower max_upload_bytes")
        return self

    def queue_wait_s(self, left_s: float) -> float:
        """How long a request with `left_s` seconds to its deadline may wait in a gate's queue."""
        return min(self.queue_wait_share * self.request_timeout_s, left_s)

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        """DSMD_* variables override the defaults; keyword arguments (command-line flags) override both.

        Raises:
            UserError: a value is invalid; the message names the setting and its variable.
        """
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as e:
            problems = "; ".join(_describe(err) for err in e.errors())
            raise UserError(f"invalid server settings: {problems}") from None

    def memory_budget_bytes(self) -> int:
        """What requests may add to the resident memory at most, above the loaded model and index
        (serve/memory.py's `budget_bytes`, the one account of it). Upload bodies are held under
        `body_budget_bytes` together, whatever the gates: they are read before a request takes a slot."""
        from dsmd.serve.memory import budget_bytes

        return budget_bytes(self)


def _describe(err: dict) -> str:
    name = "_".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{name} (DSMD_{name.upper()}): {msg}" if name else msg
