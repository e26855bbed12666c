"""Settings: one object, read from the environment once at startup."""

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.schemas import RequestLimits

MiB = 1024 * 1024
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# A sweep (which also notices dead processes) runs at least this often by default.
SWEEP_INTERVAL_DEFAULT_MAX = 2.0
# Expired jobs are looked for a quarter of the retention apart, within these bounds.
PURGE_INTERVAL_MIN, PURGE_INTERVAL_MAX = 0.5, 30.0


def redact(url: str) -> str:
    """The URL without its password, fit for logs."""
    scheme, separator, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not separator or not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{location}"


class Settings(BaseSettings):
    """Every knob of the service; each is an environment variable of the same name."""

    # Inputs are left out of validation errors: DATABASE_URL may hold a password.
    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", hide_input_in_errors=True
    )

    database_url: str = Field(
        "sqlite:///./data/jobs.db",
        description="Where jobs are stored: sqlite:///relative/path, sqlite:////absolute/path "
        "or postgresql://user:password@host:5432/database.",
    )
    max_body_bytes: int = Field(16 * MiB, gt=0, description="Largest accepted request body.")
    body_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="How long a request may take to arrive: a body not complete this long "
        "after it began is answered 408, and so are headers this long after their first "
        "byte; the connection is then closed.",
    )
    max_items: int = Field(100_000, gt=0, description="Most objects in one job's input_data.")
    max_keys_per_item: int = Field(1_000, gt=0, description="Most keys in one input object.")
    max_key_length: int = Field(1_024, gt=0, description="Longest key, in characters.")
    max_value_length: int = Field(
        1_048_576, gt=0, description="Longest string value, in characters."
    )
    flow_concurrency: int = Field(
        64,
        gt=0,
        description="Jobs one process runs at the same time (large ones: one at a time, or "
        "one per worker process).",
    )
    flow_processes: int = Field(
        0,
        ge=0,
        description="Worker processes for large jobs and bodies; 0 handles them one at a time "
        "on a thread of their own.",
    )
    flow_process_threshold_bytes: int = Field(
        128 * 1024,
        ge=0,
        description="Jobs and bodies at least this large are large: handled one at a time, or "
        "in a worker process.",
    )
    job_lease_seconds: float = Field(
        30.0,
        ge=1,
        description="How long a claim on a running job lasts without a heartbeat (at least "
        "1 s: shorter, a busy event loop would lose leases it is still renewing).",
    )
    job_claim_grace_seconds: float = Field(
        5.0,
        ge=0,
        description="How long a new job waits for its own process before any may take it.",
    )
    job_max_attempts: int = Field(
        3, gt=0, description="Runs a job may start before it is failed as interrupted too often."
    )
    job_timeout_seconds: float = Field(
        600.0, gt=0, description="How long one run of a job may take before it is failed."
    )
    job_retention_seconds: float = Field(
        604_800.0,
        gt=0,
        description="How long a finished job (row, input and result) is kept; then it is "
        "purged and its routes answer 404.",
    )
    max_queued_jobs: int = Field(
        10_000,
        gt=0,
        description="Most unfinished jobs at once; past it submissions answer 429.",
    )
    long_poll_max_waiters: int = Field(
        1_000,
        ge=0,
        description="Most check_status requests waiting (?wait=) at once in a process; past "
        "it they answer at once.",
    )
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated API keys; when set (or API_KEYS_FILE), every job route "
        "needs Authorization: Bearer <key>, and a job belongs to the key that submitted it.",
    )
    api_keys_file: Path | None = Field(
        None, description="A file of API keys, one per line (e.g. a mounted Secret)."
    )
    heartbeat_interval_seconds: float | None = Field(
        None,
        gt=0,
        description="How often running jobs' leases are renewed (below half the lease); "
        "lease / 3 if unset.",
    )
    sweep_interval_seconds: float | None = Field(
        None,
        gt=0,
        description="How often stale jobs and dead processes are looked for (at most the "
        "lease); the smaller of lease / 2 and 2 s if unset.",
    )
    shutdown_timeout_seconds: float = Field(
        15.0, ge=0, description="How long shutdown waits for running jobs before releasing them."
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="SQLite's synchronous pragma (WAL mode)."
    )
    sqlite_busy_timeout_ms: int = Field(
        5_000, ge=0, description="How long a write waits for SQLite's lock."
    )
    database_pool_size: int = Field(
        10, gt=0, description="PostgreSQL: most connections one process opens."
    )
    database_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="PostgreSQL: how long a request waits for a connection before it is "
        "answered 503.",
    )
    database_startup_timeout_seconds: float = Field(
        60.0,
        ge=0,
        description="PostgreSQL: how long startup keeps trying to reach the database.",
    )
    result_retry_after_seconds: int = Field(
        1, ge=1, description="Retry-After sent with a result that is not ready yet."
    )
    log_level: str = Field(
        "INFO", description="Log level of the service's own logger: " + ", ".join(LOG_LEVELS) + "."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: one readable line per record; json: one JSON object per line "
        "(time, level, logger, message, and job_id, attempt, request_id where known).",
    )
    metrics_enabled: bool = Field(
        True, description="Serve Prometheus metrics at /metrics and count HTTP requests."
    )

    @field_validator("database_url")
    @classmethod
    def _supported_database_url(cls, url: str) -> str:
        if url.startswith(POSTGRES_SCHEMES) and len(url) > url.index("//") + 2:
            return url
        if not url.startswith("sqlite:///") or url == "sqlite:///" or "?" in url:
            raise ValueError(
                f"Unsupported DATABASE_URL {redact(url)!r}: expected sqlite:///path/to/jobs.db "
                "(without ?options) or postgresql://user:password@host:5432/database"
            )
        return url

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, level: str) -> str:
        if level.upper() not in LOG_LEVELS:
            raise ValueError(f"LOG_LEVEL {level!r} is not one of {', '.join(LOG_LEVELS)}")
        return level.upper()

    @model_validator(mode="after")
    def _leases_can_be_kept(self) -> Self:
        """Refuse timings under which a healthy process could lose its jobs' leases."""
        lease = self.job_lease_seconds
        if self.heartbeat_interval >= lease / 2:
            raise ValueError(
                f"HEARTBEAT_INTERVAL_SECONDS ({self.heartbeat_interval:g}) must be below half of "
                f"JOB_LEASE_SECONDS ({lease:g}), so every lease is renewed at least twice "
                "before it could run out"
            )
        if self.sweep_interval > lease:
            raise ValueError(
                f"SWEEP_INTERVAL_SECONDS ({self.sweep_interval:g}) must be at most "
                f"JOB_LEASE_SECONDS ({lease:g}), so a job left behind waits at most about "
                "one lease plus one sweep"
            )
        return self

    @model_validator(mode="after")
    def _api_keys_readable(self) -> Self:
        """Refuse key settings that would leave the service open by mistake."""
        if self.api_keys is not None or self.api_keys_file is not None:
            try:
                keys = self.read_api_keys()
            except OSError as error:
                raise ValueError(f"API_KEYS_FILE cannot be read: {error}") from None
            if not keys:
                raise ValueError("API_KEYS / API_KEYS_FILE are set but hold no key")
            if not all(key.isascii() and key.isprintable() and " " not in key for key in keys):
                # A client sends its key as header bytes; only ASCII is the same everywhere.
                raise ValueError("API keys must be printable ASCII characters without spaces")
        return self

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between lease renewals of running jobs."""
        return self.heartbeat_interval_seconds or self.job_lease_seconds / 3

    @property
    def sweep_interval(self) -> float:
        """Seconds between looks for jobs nobody is running (and processes that died)."""
        if self.sweep_interval_seconds is not None:
            return self.sweep_interval_seconds
        return min(self.job_lease_seconds / 2, SWEEP_INTERVAL_DEFAULT_MAX)

    @property
    def purge_interval(self) -> float:
        """Seconds between looks for expired jobs: a quarter of the retention, 0.5 to 30 s."""
        return min(PURGE_INTERVAL_MAX, max(PURGE_INTERVAL_MIN, self.job_retention_seconds / 4))

    def read_api_keys(self) -> tuple[str, ...]:
        """The API keys from API_KEYS and API_KEYS_FILE; none means the service is open."""
        text = self.api_keys.get_secret_value() if self.api_keys is not None else ""
        if self.api_keys_file is not None:
            text += "\n" + self.api_keys_file.read_text()
        keys = [key.strip() for line in text.splitlines() for key in line.split(",")]
        return tuple(dict.fromkeys(key for key in keys if key))

    @property
    def limits(self) -> RequestLimits:
        """The bounds a submission must stay within."""
        return RequestLimits(
            max_items=self.max_items,
            max_keys_per_item=self.max_keys_per_item,
            max_key_length=self.max_key_length,
            max_value_length=self.max_value_length,
        )
