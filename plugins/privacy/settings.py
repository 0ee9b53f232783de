"""The privacy feature's settings: ``[anonymizer]``."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr, field_validator

from flywheel_loop.engine.config import PluginSection

#: The anonymizer's hash key when none is configured. Anyone who knows it can test a guessed
#: session or user id against a hash, so ``flywheel`` warns while it is in use.
DEFAULT_ANONYMIZER_KEY = "flywheel-default-anonymizer-key-change-me"


class AnonymizerConfig(PluginSection):
    """How raw intake is scrubbed before anything else sees it (``plugins/anonymizer.py``).

    Session and user ids become keyed hashes (HMAC-SHA256 with ``hash_key``): stable for one
    key, so sessions still group, and unlinkable to the raw ids without it. Set the key with
    ``FLYWHEEL_ANONYMIZER__HASH_KEY`` or in ``flywheel.toml``; changing it re-keys every id.
    """

    section_name: ClassVar[str] = "anonymizer"

    hash_key: SecretStr = Field(
        default=SecretStr(DEFAULT_ANONYMIZER_KEY), description="the HMAC key for session and user ids"
    )
    hash_length: int = Field(default=16, ge=16, le=64, description="hex digits kept of each keyed hash")
    base64_entropy_limit: float = Field(
        default=4.5, gt=0, le=8, description="Shannon entropy above which a base64 string is a secret"
    )
    hex_entropy_limit: float = Field(
        default=3.0, gt=0, le=8, description="Shannon entropy above which a hex string is a secret"
    )
    phone_regions: list[str] = Field(
        default_factory=lambda: ["US", "GB", "DE", "FR", "IN", "AU", "BR", "ES"],
        min_length=1,
        description="regions whose national phone formats are recognised (+CC numbers always are)",
    )

    @field_validator("phone_regions")
    @classmethod
    def _regions(cls, value: list[str]) -> list[str]:
        bad = [r for r in value if not (len(r) == 2 and r.isascii() and r.isalpha() and r.isupper())]
        if bad:
            raise ValueError(f"two-letter upper-case region codes (ISO 3166), got {bad}")
        return value

    @property
    def uses_default_key(self) -> bool:
        return self.hash_key.get_secret_value() == DEFAULT_ANONYMIZER_KEY
