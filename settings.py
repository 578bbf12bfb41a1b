"""Settings: read once from the environment at startup; a bad value stops the process naming itself."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv import load_dotenv
from environs import Env
from marshmallow import ValidationError
from marshmallow.validate import URL, Length, OneOf, Range, Regexp

from providers.links import AllowedHost, allowed_host
from storage import MAX_OBJECT_BYTES

MiB = 1024 * 1024
BACKENDS = ("placeholder", "openai", "cog", "replicate")
OWNER_SLASH_NAME = Regexp(r"[\w.-]+/[\w.-]+\Z", error="must be owner/name")
NOT_EMPTY = Length(min=1, error="must not be empty")


def without_credentials(value: str) -> None:
    """A URL setting that carries a user and password would send them (Basic auth) instead of the key."""
    if "@" in urlsplit(value).netloc:
        raise ValidationError("must not carry credentials (user:password@): give the key in its own variable")


URL_WITHOUT_CREDENTIALS = [URL(require_tld=False), without_credentials]


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    s3_bucket: str | None = None
    s3_region: str = "us-east-1"
    s3_endpoint_url: str | None = None
    s3_connect_timeout_seconds: float = 2.0
    s3_read_timeout_seconds: float = 5.0
    presign_ttl_seconds: int = 3600
    local_storage_dir: Path = Path("data")
    public_base_url: str | None = None
    max_upload_bytes: int = 100 * MiB
    max_prompt_chars: int = 2000
    api_token: str | None = field(default=None, repr=False)
    s3_checksums: str = "when_supported"
    log_format: str = "text"
    log_level: str = "INFO"
    shutdown_grace_seconds: float = 25.0
    workers: int = 1
    client_body_timeout_seconds: float = 30.0
    # As Kestrel's MinRequestBodyDataRate, over a sliding window (see body_limits.py).
    client_body_min_rate_bytes: int = 240
    max_concurrent_uploads: int = 32
    # Longer than the ALB's idle timeout (60 s by default), so the ALB never reuses a connection we closed.
    keep_alive_seconds: int = 65
    image_backend: str = "placeholder"
    # OpenAI lists this model in its API reference in December 2026; image model names change often.
    image_model: str = "gpt-image-2"
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: str | None = field(default=None, repr=False)
    cog_url: str | None = None
    cog_input: dict[str, Any] = field(default_factory=dict)
    replicate_base_url: str = "https://api.replicate.com/v1"
    replicate_api_token: str | None = field(default=None, repr=False)
    replicate_model: str | None = None
    generate_timeout_seconds: float = 120.0
    # None: the backend's own default (generators.default_concurrency), and 4 waiting per slot.
    generate_concurrency: int | None = None
    generate_queue: int | None = None
    max_image_bytes: int = 50 * MiB
    image_fetch_allowed_hosts: tuple[AllowedHost, ...] = ()


def read_settings() -> Settings:
    """Settings from the environment; a .env file in the working directory fills in what is unset.

    Raises EnvError naming every invalid variable.
    """
    # Exported, not only parsed, so that boto3's credential chain sees AWS_* values from .env too.
    load_dotenv(Path.cwd() / ".env")
    env = Env(eager=False)
    settings = Settings(
        host=env.str("HOST", Settings.host, validate=NOT_EMPTY),
        port=env.int("PORT", Settings.port, validate=Range(1, 65535)),
        s3_bucket=env.str(either("S3_BUCKET", "s3_bucket"), None, validate=NOT_EMPTY),
        s3_region=env.str(either("S3_REGION", "s3_region"), Settings.s3_region, validate=NOT_EMPTY),
        s3_endpoint_url=env.str("S3_ENDPOINT_URL", None, validate=URL_WITHOUT_CREDENTIALS),
        s3_connect_timeout_seconds=env.float(
            "S3_CONNECT_TIMEOUT_SECONDS", Settings.s3_connect_timeout_seconds, validate=Range(0.1, 60)
        ),
        s3_read_timeout_seconds=env.float(
            "S3_READ_TIMEOUT_SECONDS", Settings.s3_read_timeout_seconds, validate=Range(0.1, 300)
        ),
        # SigV4 links cannot live longer than 7 days; S3 would only say so when the link is used.
        presign_ttl_seconds=env.int(
            either("S3_PRESIGN_TTL_SECONDS", "s3_presign_ttl_seconds"),
            Settings.presign_ttl_seconds,
            validate=Range(1, 604800),
        ),
        local_storage_dir=env.path("LOCAL_STORAGE_DIR", Settings.local_storage_dir),
        public_base_url=env.str("PUBLIC_BASE_URL", None, validate=URL_WITHOUT_CREDENTIALS),
        max_upload_bytes=env.int("MAX_UPLOAD_BYTES", Settings.max_upload_bytes, validate=Range(1, MAX_OBJECT_BYTES)),
        max_prompt_chars=env.int("MAX_PROMPT_CHARS", Settings.max_prompt_chars, validate=Range(1, None)),
        api_token=env.str("API_TOKEN", None, validate=NOT_EMPTY),
        s3_checksums=env.str(
            "S3_CHECKSUMS", Settings.s3_checksums, validate=OneOf(["when_supported", "when_required"])
        ),
        log_format=env.str("LOG_FORMAT", Settings.log_format, validate=OneOf(["text", "json"])),
        log_level=env.str("LOG_LEVEL", Settings.log_level, validate=OneOf(["DEBUG", "INFO", "WARNING", "ERROR"])),
        # Under ECS's default 30 s stop timeout, after which the task is killed.
        shutdown_grace_seconds=env.float(
            "SHUTDOWN_GRACE_SECONDS", Settings.shutdown_grace_seconds, validate=Range(0, 3600)
        ),
        workers=env.int("WORKERS", Settings.workers, validate=Range(1, 64)),
        client_body_timeout_seconds=env.float(
            "CLIENT_BODY_TIMEOUT_SECONDS", Settings.client_body_timeout_seconds, validate=Range(0.1, 3600)
        ),
        client_body_min_rate_bytes=env.int(
            "CLIENT_BODY_MIN_RATE_BYTES", Settings.client_body_min_rate_bytes, validate=Range(0, 1024 * MiB)
        ),
        max_concurrent_uploads=env.int(
            "MAX_CONCURRENT_UPLOADS", Settings.max_concurrent_uploads, validate=Range(1, 10_000)
        ),
        keep_alive_seconds=env.int("KEEP_ALIVE_SECONDS", Settings.keep_alive_seconds, validate=Range(1, 4000)),
        **generator_settings(env),
    )
    env.seal()
    return settings


def generator_settings(env: Env) -> dict[str, Any]:
    """The image generator's settings. What the chosen backend needs has no default, so that environs
    reports it missing by name."""
    backend = env.str("IMAGE_BACKEND", Settings.image_backend, validate=OneOf(BACKENDS))
    url = URL_WITHOUT_CREDENTIALS

    def unless(*backends: str) -> dict[str, Any]:
        return {} if backend in backends else {"default": None}

    return {
        "image_backend": backend,
        "image_model": env.str("IMAGE_MODEL", Settings.image_model, validate=NOT_EMPTY),
        "openai_base_url": env.str("OPENAI_BASE_URL", Settings.openai_base_url, validate=url),
        "openai_api_key": env.str("OPENAI_API_KEY", validate=NOT_EMPTY, **unless("openai")),
        "cog_url": env.str("COG_URL", validate=url, **unless("cog")),
        "cog_input": env.json("COG_INPUT", {}, validate=json_object),
        "replicate_base_url": env.str("REPLICATE_BASE_URL", Settings.replicate_base_url, validate=url),
        "replicate_api_token": env.str("REPLICATE_API_TOKEN", validate=NOT_EMPTY, **unless("replicate")),
        "replicate_model": env.str("REPLICATE_MODEL", validate=OWNER_SLASH_NAME, **unless("replicate")),
        "generate_timeout_seconds": env.float(
            "GENERATE_TIMEOUT_SECONDS", Settings.generate_timeout_seconds, validate=Range(1, 3600)
        ),
        "generate_concurrency": env.int("GENERATE_CONCURRENCY", None, validate=Range(1, 10_000)),
        "generate_queue": env.int("GENERATE_QUEUE", None, validate=Range(0, 100_000)),
        "max_image_bytes": env.int("MAX_IMAGE_BYTES", Settings.max_image_bytes, validate=Range(1, 1024 * MiB)),
        "image_fetch_allowed_hosts": tuple(
            allowed_host(entry)
            for entry in env.list("IMAGE_FETCH_ALLOWED_HOSTS", [], subcast=str, validate=allowed_hosts) or []
            if entry.strip()
        ),
    }


def allowed_hosts(entries: list[str]) -> None:
    try:
        for entry in filter(str.strip, entries):
            allowed_host(entry)
    except ValueError as error:
        raise ValidationError(str(error)) from None


def json_object(value: Any) -> None:
    if not isinstance(value, dict):
        raise ValidationError("must be a JSON object")


def either(name: str, old_name: str) -> str:
    """The variable to read: the new name, or the old service's lower-case one if only that is set."""
    return old_name if old_name in os.environ and name not in os.environ else name
