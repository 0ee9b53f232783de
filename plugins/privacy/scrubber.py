"""Find secrets and personal data in free text and replace them with typed placeholders.

``scrub(text) -> (scrubbed, Counter of kinds)`` is a pure function: no I/O, no state kept
between calls. The anonymizer plugin (``plugins/anonymizer.py``) calls it on every free-text
field before anything derived from an interaction reaches the log.

Where the detection comes from:

- **Secrets** through detect-secrets' own plugins: every ``RegexBasedDetector`` it ships
  (AWS, GitHub, Slack, Stripe, OpenAI, JWT, basic-auth URLs, private keys, ...), its
  ``KeywordDetector`` patterns (passwords and secrets assigned in code and config files) and
  its high-entropy string plugins with their Shannon-entropy limits, filtered by its own
  heuristics (UUIDs, sequences, templates, ``$VARS``). A few token formats it does not know
  (Google API keys, OpenAI project keys, GitHub fine-grained tokens, Anthropic and Hugging
  Face tokens, Databricks, Shopify, Vault, ...) are added as detect-secrets plugins of the same
  kind, so they run the same way.
- **Secrets known by their context** (``scrubber_context.py``): the token after
  ``Authorization: Bearer``/``Basic``, the password in ``scheme://user:password@host`` for any
  scheme, CLI password flags (``mysql -p``, ``--password=``, ``PGPASSWORD=``, ``docker login -p``),
  values of secret-named keys in ``.env``/YAML/TOML/JSON/XML/properties files, connection strings
  (``AccountKey=``, ``Password=``).
- **Phone numbers** through ``phonenumbers`` (Google's libphonenumber metadata): any
  international ``+CC`` number, and national formats of the configured regions.
- **Cards and national ids** through ``python-stdnum`` validators (Luhn for cards; the check
  digits of US SSNs, Canadian SINs, Indian Aadhaar numbers, Spanish DNIs, Brazilian CPFs, French
  NIRs and IBANs).
- **E-mail addresses, IP addresses and user names in home-directory paths** by small
  patterns, validated with ``ipaddress`` where that applies; no library covers them better.

Speed: one Hyperscan pass (``scrubber_prefilter.py``) tells each detector the lines it
can match; the detector runs there only. ``Scrubber(prefilter=False)`` scans the whole text with
every detector and finds the same (the tests check it); it is the reference, and the fallback
where ``hyperscan`` is not installed.

We call the detect-secrets plugin objects directly rather than through ``scan_line``: that
one reconfigures global settings and clears caches on every call, may call the vendors' APIs
to verify a finding, and reports a value but not where it is (and for some detectors only the
prefix of a token), while a scrubber needs exact spans.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import phonenumbers
from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
from detect_secrets.filters.heuristic import (
    is_not_alphanumeric_string,
    is_potential_uuid,
    is_sequential_string,
    is_templated_secret,
)
from detect_secrets.plugins import keyword as ds_keyword
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.high_entropy_strings import (
    Base64HighEntropyString,
    HexHighEntropyString,
    HighEntropyStringsPlugin,
)
from phonenumbers.phonenumbermatcher import _LEAD_PATTERN, _MATCHING_BRACKETS, _PUB_PAGES, PhoneNumberMatch
from phonenumbers.phonenumbermatcher import _PATTERN as _MATCHER_PATTERN
from phonenumbers.phonenumberutil import _SECOND_NUMBER_START_PATTERN
from phonenumbers.re_util import fullmatch as _matcher_fullmatch
from stdnum import iban as std_iban
from stdnum import luhn
from stdnum.br import cpf as br_cpf
from stdnum.ca import sin as ca_sin
from stdnum.es import dni as es_dni
from stdnum.fr import nir as fr_nir
from stdnum.in_ import aadhaar as in_aadhaar
from stdnum.us import ssn as us_ssn

from flywheel_loop.plugins.privacy.scrubber_context import CONTEXT_RULES, is_placeholder, is_variable, key_kind
from flywheel_loop.plugins.privacy.scrubber_prefilter import Candidates as PrefilterCandidates
from flywheel_loop.plugins.privacy.scrubber_prefilter import Prefilter, Span, ascii_view

__all__ = [
    "DEFAULT_PHONE_REGIONS",
    "PII_KINDS",
    "SCRUBBER_VERSION",
    "SECRET_KINDS",
    "Finding",
    "Scrubber",
    "placeholder",
    "scrub",
    "versions",
]

#: Bump when detection changes, so a replay can tell which scrubber produced an event.
SCRUBBER_VERSION = "2.0.0"

#: Regions whose *national* phone formats are recognised (international ``+CC`` numbers are
#: recognised for every country whatever this says).
DEFAULT_PHONE_REGIONS: tuple[str, ...] = ("US", "GB", "DE", "FR", "IN", "AU", "BR", "ES")

PII_KINDS = frozenset(
    {"EMAIL", "PHONE", "IP_ADDRESS", "CREDIT_CARD", "SSN", "NATIONAL_ID", "IBAN", "USERNAME"}
)


def placeholder(kind: str) -> str:
    """The text that replaces a finding of ``kind``: ``[EMAIL]``, ``[AWS_ACCESS_KEY]`` ..."""
    return f"[{kind}]"


@dataclass(frozen=True, order=True)
class Finding:
    """One thing to replace: ``text[start:end]`` is of ``kind``; lower ``rank`` wins overlaps."""

    start: int
    end: int
    kind: str
    rank: int = 5


# --------------------------------------------------------------------------- extra detectors


class GoogleApiKeyDetector(RegexBasedDetector):
    """Google Cloud / Maps / Firebase API keys (detect-secrets 1.5 has no plugin for them)."""

    secret_type = "Google API Key"  # pragma: allowlist secret
    denylist = (re.compile(r"\bAIza[0-9A-Za-z_\-]{35}(?![\w-])"),)


class OpenAIProjectKeyDetector(RegexBasedDetector):
    """OpenAI project, service-account and admin keys; detect-secrets only knows legacy ``sk-``."""

    secret_type = "OpenAI Project Key"  # pragma: allowlist secret
    denylist = (re.compile(r"\bsk-(?:proj|svcacct|admin)-[A-Za-z0-9_\-]{40,}"),)


class GitHubFineGrainedTokenDetector(RegexBasedDetector):
    """GitHub fine-grained personal access tokens (``github_pat_``), newer than detect-secrets."""

    secret_type = "GitHub Fine-grained Token"  # pragma: allowlist secret
    denylist = (re.compile(r"\bgithub_pat_[A-Za-z0-9_]{60,}"),)


class AnthropicKeyDetector(RegexBasedDetector):
    """Anthropic API keys."""

    secret_type = "Anthropic Key"  # pragma: allowlist secret
    denylist = (re.compile(r"\bsk-ant-(?:api|admin)\d{2}-[A-Za-z0-9_\-]{40,}"),)


class HuggingFaceTokenDetector(RegexBasedDetector):
    """Hugging Face access tokens, common in the training scripts coding agents touch."""

    secret_type = "Hugging Face Token"  # pragma: allowlist secret
    denylist = (re.compile(r"\bhf_[A-Za-z0-9]{34,}\b"),)


class PasswordArgumentDetector(RegexBasedDetector):
    """Passwords written as the word after the keyword, which KeywordDetector (``=`` and ``:``
    assignments only) misses: ``.netrc`` lines and command-line flags."""

    secret_type = "Password Argument"  # pragma: allowlist secret
    denylist = (
        re.compile(r"(?<![\w-])--?(?:password|passwd|pass)(?:=| +)([^\s'\"]+)", re.IGNORECASE),
        re.compile(r"\bmachine\s+\S+\s+(?:login\s+\S+\s+)?password\s+(\S+)"),
    )


class ProviderTokenDetector(RegexBasedDetector):
    """Token formats providers document that detect-secrets 1.5 lacks or only knows in part
    (Stripe test keys, Slack app tokens); each starts with a fixed prefix."""

    secret_type = "Provider Token"  # pragma: allowlist secret
    denylist = (
        re.compile(r"\b[sr]k_test_[0-9a-zA-Z]{24,}"),  # Stripe test mode: still a live credential
        re.compile(r"\bxapp-\d-[A-Z0-9]+-\d+-[a-f0-9]{32,}"),  # Slack app-level tokens
        re.compile(r"\bdapi[a-f0-9]{32}(?:-\d)?\b"),  # Databricks
        re.compile(r"\bshp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}\b"),  # Shopify
        re.compile(r"\bPMAK-[a-f0-9]{24}-[a-f0-9]{34}\b"),  # Postman
        re.compile(r"\bkey-[0-9a-f]{32}\b"),  # Mailgun
        re.compile(r"\bdo[opr]_v1_[a-f0-9]{64}\b"),  # DigitalOcean
        re.compile(r"\bhv[sbr]\.[A-Za-z0-9_\-]{24,}"),  # HashiCorp Vault
        re.compile(r"\bgl(?:sa|c)_[A-Za-z0-9_+/]{32,}={0,2}"),  # Grafana service accounts, Cloud
        re.compile(r"\bya29\.[0-9A-Za-z_\-]{20,}"),  # Google OAuth access tokens
        re.compile(r"\bdp\.(?:pt|st|sa|ct|scim|audit)\.[A-Za-z0-9]{40,}"),  # Doppler
        re.compile(r"\blin_(?:api|oauth)_[A-Za-z0-9]{40}\b"),  # Linear
        re.compile(r"\bGOCSPX-[A-Za-z0-9_\-]{28}"),  # Google OAuth client secrets
        re.compile(r"\bATATT3[A-Za-z0-9_\-=]{100,}"),  # Atlassian API tokens
        re.compile(r"\bAKCp[A-Za-z0-9]{69}\b"),  # JFrog
    )


EXTRA_DETECTORS: tuple[type[RegexBasedDetector], ...] = (
    ProviderTokenDetector,
    PasswordArgumentDetector,
    GoogleApiKeyDetector,
    OpenAIProjectKeyDetector,
    GitHubFineGrainedTokenDetector,
    AnthropicKeyDetector,
    HuggingFaceTokenDetector,
)

#: detect-secrets' secret_type (and pattern index where one detector finds two kinds) -> kind.
_KIND_BY_TYPE: dict[str, str] = {
    "AWS Access Key": "AWS_ACCESS_KEY",
    "AWS Access Key#1": "AWS_SECRET_KEY",
    "Artifactory Credentials": "ARTIFACTORY_TOKEN",
    "Azure Storage Account access key": "AZURE_STORAGE_KEY",
    "Basic Auth Credentials": "PASSWORD",
    "Password Argument": "PASSWORD",
    "Cloudant Credentials": "CLOUDANT_KEY",
    "Discord Bot Token": "DISCORD_TOKEN",
    "GitHub Token": "GITHUB_TOKEN",
    "GitHub Fine-grained Token": "GITHUB_TOKEN",
    "GitLab Token": "GITLAB_TOKEN",
    "IBM Cloud IAM Key": "IBM_CLOUD_KEY",
    "IBM COS HMAC Credentials": "IBM_COS_KEY",
    "JSON Web Token": "JWT",
    "Mailchimp Access Key": "MAILCHIMP_KEY",
    "NPM tokens": "NPM_TOKEN",
    "OpenAI Token": "OPENAI_KEY",
    "OpenAI Project Key": "OPENAI_KEY",
    "Anthropic Key": "ANTHROPIC_KEY",
    "Hugging Face Token": "HUGGINGFACE_TOKEN",
    "Provider Token": "API_TOKEN",
    "Google API Key": "GOOGLE_API_KEY",
    "PyPI Token": "PYPI_TOKEN",
    "SendGrid API Key": "SENDGRID_KEY",
    "Slack Token": "SLACK_TOKEN",
    "Slack Token#1": "SLACK_WEBHOOK",
    "SoftLayer Credentials": "SOFTLAYER_KEY",
    "Square OAuth Secret": "SQUARE_SECRET",  # pragma: allowlist secret
    "Stripe Access Key": "STRIPE_KEY",
    "Telegram Bot Token": "TELEGRAM_TOKEN",
    "Twilio API Key": "TWILIO_KEY",
}

#: Every kind a secret finding can have (a detector detect-secrets adds later gets a kind
#: named after its secret_type, outside this set).
SECRET_KINDS = frozenset(_KIND_BY_TYPE.values()) | {
    "PRIVATE_KEY",
    "SECRET",
    "HIGH_ENTROPY_SECRET",
    "BEARER_TOKEN",
    "BASIC_AUTH",
}

# Handled elsewhere: private keys span lines; IP addresses are PII with wider rules (private
# ranges, IPv6); keywords and entropy are not RegexBasedDetectors.
_NOT_TOKEN_DETECTORS = {"Private Key", "Public IP (ipv4)"}

# Ranks: the more specific detector names the placeholder when findings overlap.
_RANK_PRIVATE_KEY, _RANK_TOKEN, _RANK_PII, _RANK_PHONE, _RANK_CONTEXT, _RANK_KEYWORD, _RANK_ENTROPY = range(7)

# The keyword-style cloud detectors scan every position with look-behinds (a tenth of a
# millisecond per kilobyte each); their values have a fixed shape, so they only run on the
# lines where that shape occurs (detect-secrets runs every detector line by line anyway).
_VALUE_SHAPE: dict[str, re.Pattern[str]] = {
    "IBM_CLOUD_KEY": re.compile(r"[A-Za-z0-9_\-]{44}"),
    "IBM_COS_KEY": re.compile(r"[a-f0-9]{48}"),
    "SOFTLAYER_KEY": re.compile(r"[a-z0-9]{64}"),
    "CLOUDANT_KEY": re.compile(r"[0-9a-f]{64}|[a-z]{24}"),
    "MAILCHIMP_KEY": re.compile(r"-us\d"),
}

_KEY_END = re.compile(r"-----END [A-Z0-9 ]*-----|---- END SSH2[^\n]*")
#: the characters a token is extended by: a run of them matched at once forwards, looked up one by one backwards
_TOKEN_RUN = re.compile(r"[A-Za-z0-9_\-]*")
_TOKEN_CHAR_SET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_TRIM = " \t\"'=:"
_TRIM_SPAN = _TRIM + "\n\r"


def _token_detectors() -> list[tuple[str, re.Pattern[str]]]:
    """(kind, pattern) for every regex-based detect-secrets plugin plus ours."""
    mapping: dict[str, Any] = get_mapping_from_secret_type_to_class()
    classes: list[Any] = [
        cls
        for name, cls in mapping.items()
        if name not in _NOT_TOKEN_DETECTORS and issubclass(cls, RegexBasedDetector)
    ]
    classes += EXTRA_DETECTORS
    out: list[tuple[str, re.Pattern[str]]] = []
    detector: Any
    for detector in classes:
        for index, pattern in enumerate(detector.denylist):
            kind = _KIND_BY_TYPE.get(f"{detector.secret_type}#{index}") or _KIND_BY_TYPE.get(detector.secret_type)
            out.append((kind or re.sub(r"\W+", "_", detector.secret_type).strip("_").upper(), pattern))
    return out


def _secret_span(match: re.Match[str], text: str) -> tuple[int, int]:
    """Where the secret is inside a detector's match.

    A capturing group that starts the match is a token prefix (``(ghp|gho)_...``): the whole
    match is the secret, extended to the end of the token because some patterns stop at a
    fixed length (Stripe keys are longer than 24 characters now). Otherwise a group of at
    least 4 characters is the secret inside a larger context (``aws_secret = "..."``, the
    password in a URL's user-info part).
    """
    groups = [
        i
        for i in range(1, (match.re.groups or 0) + 1)
        if match.group(i) and match.start(i) > match.start() and len(match.group(i)) >= 4
    ]
    if groups:
        best = max(groups, key=lambda i: match.end(i) - match.start(i))
        return match.start(best), match.end(best)
    start, end = match.start(), match.end()
    while start < end and text[start] in _TRIM_SPAN:
        start += 1
    while end > start and text[end - 1] in _TRIM_SPAN:
        end -= 1
    run = _TOKEN_RUN.match(text, end)
    end = run.end() if run else end
    while start > 0 and text[start - 1] in _TOKEN_CHAR_SET:
        start -= 1
    return start, end


_PLACEHOLDER = re.compile(r"\[[A-Z0-9_]+\]")


_SHELL_VARIABLE = re.compile(r"\$(?:\{[^}]*\}|\([^)]*\))")


def _filtered_out(secret: str) -> bool:
    """detect-secrets' own heuristics for values that are not secrets."""
    return (
        len(secret) < 2  # is_templated_secret treats one character as a false positive too
        or _PLACEHOLDER.fullmatch(secret) is not None  # scrubbed already: scrubbing is idempotent
        or is_templated_secret(secret)
        or _SHELL_VARIABLE.fullmatch(secret) is not None  # ${TOKEN}, $(cat f); not $L8*tej3
        or is_variable(secret)  # $TOKEN; not $aAGwaX5l5q
        or is_placeholder(secret)  # user:pass@host in documentation
        or is_not_alphanumeric_string(secret)
        or is_sequential_string(secret)
        or is_potential_uuid(secret)
    )


# --------------------------------------------------------------------------- keyword rules

_KEYWORD_HINT = re.compile("|".join(ds_keyword.DENYLIST), re.IGNORECASE)
_KEYWORD_NEEDLES = ("key", "pass", "pwd", "secret", "contrase")
# Code patterns first (quoted values), then config-file patterns (unquoted values allowed).
# (The three tables share patterns; each is run once.)
_KEYWORD_PATTERNS: tuple[tuple[re.Pattern[str], int], ...] = tuple(
    dict.fromkeys(
        (
            *ds_keyword.QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP.items(),
            *ds_keyword.CONFIG_DENYLIST_REGEX_TO_GROUP.items(),
            *ds_keyword.GOLANG_DENYLIST_REGEX_TO_GROUP.items(),
        )
    )
)


def _keyword_prefilter(pattern: str) -> str:
    """A part of a keyword pattern that every match holds, without its value group (whose
    runs make Hyperscan report at every offset): what precedes the value, or what follows it
    for the patterns that put the value first (``"..." == password``)."""
    head, _, _ = pattern.partition("((?=[^\\v")
    if "|".join(ds_keyword.DENYLIST) not in head:
        head = pattern.rsplit("(\\1)", 1)[-1]
    # contraseña reads "contrasea" in the prefilter's ASCII view; \v is VT in Python's re and
    # any vertical space in Hyperscan's.
    return head.replace("contraseña", "contrase.a").replace("\\v", "\\x0b")
# An unquoted value that is code, not a literal: ``password = get_password()``, ``secret:
# str``, ``token = self.token``, ``password = None``. (detect-secrets' is_indirect_reference
# looks at the whole line, which also drops a literal passed to a call: ``connect(pw=...)``.)
_CODE_VALUE = re.compile(
    r"^(?:[A-Za-z_][A-Za-z_0-9]*(?:\.[A-Za-z_][A-Za-z_0-9]*)*|None|null|nil|true|false|True|False|undefined)[;,)]*$"
    r"|[()\[\]{}<>;]|\s"
)
# A key that names or points at a secret holds no secret: ``secretName: app-tls``,
# ``password_file: /run/secrets/db``, ``SECRET_ARN=...``.
_REFERENCE_KEY = re.compile(
    r"(?:name|ref|file|path|arn|env|id|type|len|length|ttl|version|manager|store|provider|mount)"
    r"[\]'\"]*\s*[:=!]",
    re.IGNORECASE,
)
_NAME_VALUE = re.compile(r"[A-Za-z_][\w.\-]*")
_KEYWORD_PART = re.compile(
    r"(?:^|[_.\-])(?:" + "|".join(ds_keyword.DENYLIST) + r")(?:$|[_.\-])", re.IGNORECASE
)
_PASSWORDISH = re.compile(r"pass|pwd|contrase", re.IGNORECASE)


def _keyword_kind(key_text: str, value: str) -> str:
    """PASSWORD or SECRET by the key's name; an AWS secret access key by its name and shape."""
    if re.search(r"aws", key_text, re.IGNORECASE) and re.fullmatch(r"[A-Za-z0-9/+]{40}", value):
        return "AWS_SECRET_KEY"
    key = re.split(r"[\s,;({]", key_text.rstrip(" :=\"'`[]"))[-1]
    return "PASSWORD" if _PASSWORDISH.search(key) else "SECRET"


# --------------------------------------------------------------------------- entropy rules


def _entropy_kind(text: str, start: int, value: str) -> str:
    """HIGH_ENTROPY_SECRET, or AWS_SECRET_KEY where the line names AWS and the shape fits."""
    line_start = text.rfind("\n", 0, start) + 1
    if re.fullmatch(r"[A-Za-z0-9/+]{40}", value) and re.search(r"aws", text[line_start:start], re.IGNORECASE):
        return "AWS_SECRET_KEY"
    return "HIGH_ENTROPY_SECRET"


# Quoted hex strings on lines like these are content hashes (commits, checksums, SRI
# integrity), which name data rather than unlock it.
_HASH_CONTEXT = re.compile(
    r"\b(?:sha\d*|commit|hash|digest|checksum|etag|integrity|revision|rev|md5|blob|tree|oid)\b"
    r"|(?<![a-z])git(?![a-z])|version",
    re.IGNORECASE,
)
_SRI_PREFIX = re.compile(r"sha(?:1|256|384|512)-$")
_UNQUOTED_MIN = 32  # unquoted strings shorter than this are words and identifiers, not keys
_DIGIT, _UPPER, _LOWER = re.compile("[0-9]"), re.compile("[A-Z]"), re.compile("[a-z]")


# --------------------------------------------------------------------------- PII patterns

_EMAIL = re.compile(
    r"(?<![\w.%+\-])[A-Za-z0-9](?:[A-Za-z0-9._%+\-]{0,62}[A-Za-z0-9_])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b"
)
# Addresses that reach a service, not a person (``git@github.com:org/repo.git``), and
# user@host targets under names that no public mail domain has (``ssh deploy@db-1.internal``).
_SERVICE_MAILBOXES = frozenset({"git"})
_PRIVATE_TLDS = frozenset(
    {
        "internal",
        "local",
        "localhost",
        "localdomain",
        "lan",
        "home",
        "corp",
        "intranet",
        "svc",
        "cluster",
        "test",
        "invalid",
        "example",
    }
)

_IPV4 = re.compile(r"(?<![\w.\-#])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d|\w)")
_VERSION_CONTEXT = re.compile(r"(?i)version[\W_]{0,8}$|\bv$")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:|:)(?:[0-9A-Fa-f]{0,4}:){1,7}"
    r"(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])"
)

_CARD = re.compile(r"(?<![\d\-.])\d(?:[ \-]?\d){12,18}(?![\w\-]|\.\d)")
_CARD_HINT = re.compile(r"(?i)card|visa|master|amex|\bcc\b|pan\b|charg|paid|kreditkarte|carte|tarjeta|cart[ãa]o")
_SSN = re.compile(r"(?<![\d\-.])\d{3}([\- ])\d{2}\1\d{4}(?![\w\-]|\.\d)")
_SSN_PLAIN = re.compile(r"(?i)(?:ssn|social security(?: number| no\.?)?)[^\w\n]{0,6}(\d{9})(?!\d)")
_SIN = re.compile(r"(?<![\d\-.])\d{3}([\- ])\d{3}\1\d{3}(?![\w\-]|\.\d)")
_AADHAAR = re.compile(r"(?<![\d\-.])[2-9]\d{3}([\- ])\d{4}\1\d{4}(?![\w\-]|\.\d)")
# Twelve bare digits are as often an AWS account or an order number: only after the word.
_AADHAAR_PLAIN = re.compile(r"(?i)(?:aadhaa?r|uidai|\buid)\b[^\d\n]{0,20}([2-9]\d{11})(?!\d)")
_CPF = re.compile(r"(?<![\d.\-])\d{3}\.\d{3}\.\d{3}-\d{2}(?![\d\-]|\.\d)")
_CPF_PLAIN = re.compile(r"(?i)\bcpf\b[^\d\n]{0,20}(\d{11})(?!\d)")
_NIR = re.compile(  # French social security numbers: sex, year, month, department, commune, order, key
    r"(?<![\w\-.])[1-478] ?\d{2} ?(?:0[1-9]|1[0-2]|[2-9]\d) ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}(?![\w\-]|\.\d)"
)
_DNI = re.compile(r"(?<![\w\-])\d{8}-?[A-HJ-NP-TV-Z](?![\w\-])")
_NATIONAL_IDS: tuple[tuple[re.Pattern[str], Any], ...] = (
    (_SIN, ca_sin),
    (_AADHAAR, in_aadhaar),
    (_DNI, es_dni),
    (_CPF, br_cpf),
    (_NIR, fr_nir),
)
_IBAN = re.compile(r"(?<![\w])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?!\w)")

_HOME = re.compile(
    r"(?:(?<![\w.])/(?:home|Users|export/home)/"
    r"|(?<![\w])[A-Za-z]:(?:\\\\|\\|/)(?:Users|Documents and Settings)(?:\\\\|\\|/))"
    r"(?P<name>[^\W\d_][\w.\-]*(?: [^\W\d_][\w.\-]*)?(?=\\|/)|[^\W\d_][\w.\-]*)"
)
# Accounts that belong to a machine or a tool, not to a person.
_SERVICE_USERS = frozenset(
    {
        "root",
        "runner",
        "ubuntu",
        "ec2-user",
        "admin",
        "user",
        "username",
        "public",
        "default",
        "shared",
        "all users",
        "default user",
        "vscode",
        "node",
        "app",
        "jenkins",
        "git",
        "www-data",
        "nobody",
        "circleci",
        "travis",
        "docker",
        "vagrant",
        "codespace",
        "linuxbrew",
        "runneradmin",
        "appveyor",
        "buildkite-agent",
        "gitlab-runner",
    }
)

_PHONE_CANDIDATE = re.compile(
    r"(?<![\w+.\-/])(?:\+|\(\+?)?\d[\d \u00a0().\-/]{5,24}\d(?:[ \t]*(?:x|ext\.?|#)[ \t]*\d{1,5})?(?![\w.\-]\d)"
)
# A record whose fields are named earlier on the line: INSERT INTO t (name, phone) VALUES (...).
_PHONE_FIELD = re.compile(
    r"(?i)\b(?:phone|tel|mobile|cell|telefone|telefon|t[ée]l[ée]phone)(?:_?number|_?no)?\b[^\n]*$"
)
_NOT_A_PHONE = re.compile(r"\d+\.\d+|[1-9]\d*/\d+|\d+\.\.\.?\d+|\d+-{2,}\d+")
_DECIMAL = re.compile(r"\d\.\d{5,}")  # 61717.4130533677: phone formats group dots by 2 to 4 digits
_YEAR_RANGE = re.compile(r"(?:1[89]|20)\d\d ?[-–] ?(?:1[89]|20)\d\d")
_DOTTED_QUAD = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
# The words before a bare run of digits that make it a phone number ("call me on", "phone:").
_PHONE_HINT = re.compile(
    r"(?i)(?:phone|tel|mobile|cell|call|fax|contact|whatsapp|sms|ring|text me|reach me|my number|number is"
    r"|telefon|t[ée]l[ée]phone|tel[ée]fono|telefone|celular|handy|portable|m[óo]vil)[^\d\n]{0,20}$"
)


_PII_PATTERNS = (
    _EMAIL, _IPV4, _IPV6, _CARD, _SSN, _SSN_PLAIN, _SIN, _AADHAAR, _AADHAAR_PLAIN, _DNI, _CPF, _CPF_PLAIN, _NIR,
    _IBAN, _HOME,
)  # fmt: skip

# --------------------------------------------------------------------------- the scrubber

class Candidates:
    """The prefilter's answer for one text, asked by detector key (see _detector_expressions)."""

    def __init__(self, text: str, found: PrefilterCandidates | None, ids: dict[object, int]) -> None:
        self.whole = [(0, len(text))]
        self.found = found
        self.ids = ids
        # the detectors that may match at all, looked up once: most of some hundred are asked and answer no
        self.may = found.hits() if found is not None else None

    def __call__(self, key: object) -> list[Span]:
        if self.found is None or self.may is None:
            return self.whole
        i = self.ids[key]
        return self.found.spans(i) if i in self.may else []

    def among(self, keys: Sequence[object]) -> list[int]:
        """The indexes in ``keys`` of the detectors that may match, ascending: one pass over the few the
        prefilter reported rather than a lookup per detector (most of a short text's fixed cost)."""
        if self.may is None:
            return list(range(len(keys)))
        first = self.ids[keys[0]] if keys else 0
        return sorted(i - first for i in self.may if first <= i < first + len(keys))

# Prefilter expressions for patterns that end in an unbounded run, for which Hyperscan reports a
# match at every offset of the run: each matches the start of every match of its pattern (which
# starts with a literal, so on the same line), and ends once per token.
_SHORTER = {
    r"eyJ[A-Za-z0-9-_=]+\.[A-Za-z0-9-_=]+\.?[A-Za-z0-9-_.+/=]*?": r"eyJ[A-Za-z0-9_=\-]+\.",
    r"xox(?:a|b|p|o|s|r)-(?:\d+-)+[a-z0-9]+": r"xox[abposr]-\d+-",
    r"\bsk-(?:proj|svcacct|admin)-[A-Za-z0-9_\-]{40,}": r"sk-(?:proj|svcacct|admin)-",
    r"\bsk-ant-(?:api|admin)\d{2}-[A-Za-z0-9_\-]{40,}": r"sk-ant-(?:api|admin)\d{2}-",
    r"\bhv[sbr]\.[A-Za-z0-9_\-]{24,}": r"hv[sbr]\.",
    r"\bya29\.[0-9A-Za-z_\-]{20,}": r"ya29\.",
    r"pypi-AgEIcHlwaS5vcmc[A-Za-z0-9-_]{70,}": r"pypi-AgEIcHlwaS5vcmc",
}


class Scrubber:
    """Detects and replaces; build once (the detectors are compiled here), call many times."""

    def __init__(
        self,
        *,
        base64_limit: float = 4.5,
        hex_limit: float = 3.0,
        phone_regions: Sequence[str] = DEFAULT_PHONE_REGIONS,
        prefilter: bool = True,
    ) -> None:
        """``prefilter=False`` runs every detector on the whole text (the same findings, slower)."""
        self.tokens = _token_detectors()
        self.private_key_headers = [p for _, p in _private_key_patterns()]
        self.base64 = Base64HighEntropyString(limit=base64_limit)
        self.hex = HexHighEntropyString(limit=hex_limit)
        # '=' only as padding at the end: inside a run it is an assignment (KEY=value).
        self.base64_unquoted = re.compile(
            rf"(?<![A-Za-z0-9+/_\-])[A-Za-z0-9+/_\-]{{{_UNQUOTED_MIN},}}={{0,2}}"
        )
        self.phone_regions = tuple(phone_regions)
        if not self.phone_regions:
            raise ValueError("phone_regions: name at least one region, e.g. US")
        self._detectors = self._detector_expressions()
        self._id = {key: i for i, (key, _, _) in enumerate(self._detectors)}
        # each family's keys, in the order of their detector ids (contiguous: Candidates.among)
        self._token_keys = [("token", i) for i in range(len(self.tokens))]
        self._private_key_keys = [("private key", i) for i in range(len(self.private_key_headers))]
        self._context_keys = [("context", i) for i in range(len(CONTEXT_RULES))]
        self._keyword_keys = [("keyword", k) for k in range(len(_KEYWORD_PATTERNS))]
        for keys in (self._token_keys, self._private_key_keys, self._context_keys, self._keyword_keys):
            assert [self._id[k] for k in keys] == list(range(self._id[keys[0]], self._id[keys[0]] + len(keys)))
        self.prefilter = _prefilter(tuple((e, f) for _, e, f in self._detectors)) if prefilter else None

    def _detector_expressions(self) -> list[tuple[object, str | None, int]]:
        """(key, prefilter expression, re flags) for every pattern a detector scans text with.

        The expression is the pattern itself unless a cheaper one holds in every match: the
        keywords of a context rule, the ASCII stem of the keyword list.
        """
        out: list[tuple[object, str | None, int]] = []
        for i, (_, pattern) in enumerate(self.tokens):
            out.append((("token", i), _SHORTER.get(pattern.pattern, pattern.pattern), pattern.flags))
        for i, pattern in enumerate(self.private_key_headers):
            out.append((("private key", i), pattern.pattern, pattern.flags))
        for i, rule in enumerate(CONTEXT_RULES):
            needles = "|".join(re.escape(n) for n in rule.needles) if rule.needles else rule.pattern.pattern
            out.append((("context", i), needles, re.IGNORECASE if rule.needles else rule.pattern.flags))
        for k, (pattern, _) in enumerate(_KEYWORD_PATTERNS):
            out.append((("keyword", k), _keyword_prefilter(pattern.pattern), pattern.flags))
        for pattern in (self.hex.regex, self.base64.regex, *_PII_PATTERNS):
            out.append((pattern, _SHORTER.get(pattern.pattern, pattern.pattern), pattern.flags))
        # Long unquoted runs: Hyperscan would report every offset past the 32nd character of
        # each; one re scan of the whole text is cheaper.
        out.append((self.base64_unquoted, None, 0))
        # Hyperscan reads no \u escapes; a no-break space is whitespace in the ASCII view anyway.
        out.append((_PHONE_CANDIDATE, _PHONE_CANDIDATE.pattern.replace("\\u00a0", ""), 0))
        return out

    def _candidates(self, text: str) -> Candidates:
        """key -> the spans of ``text`` its pattern needs to scan (``.among(keys)``: which of a family may match)."""
        found = self.prefilter.scan(text) if self.prefilter is not None else None
        return Candidates(text, found, self._id)

    # ------------------------------------------------------------------ public

    def scrub(self, text: str) -> tuple[str, Counter[str]]:
        """``text`` with every finding replaced by its placeholder, and the kinds counted."""
        found = self.find(text)
        counts: Counter[str] = Counter()
        if not found:
            return text, counts
        parts: list[str] = []
        last = 0
        for f in found:
            parts.append(text[last : f.start])
            parts.append(placeholder(f.kind))
            counts[f.kind] += 1
            last = f.end
        parts.append(text[last:])
        return "".join(parts), counts

    def find(self, text: str) -> list[Finding]:
        """Every finding, overlaps merged (the lowest rank names the merged span), in order."""
        if not text:
            return []
        at = self._candidates(text)
        raw: list[Finding] = []
        raw += self._private_keys(text, at)
        passwords = list(self._tokens(text, at)) + list(self._context(text, at))
        raw += passwords
        raw += self._keywords(text, at)
        raw += self._entropy(text, at, _Covered(raw))
        raw += self._emails(text, at, [f for f in passwords if f.kind == "PASSWORD"])
        raw += self._ips(text, at)
        raw += self._numbers(text, at)
        raw += self._home_dirs(text, at)
        raw += self._phones(text, at, raw)
        return _merge(raw)

    # ------------------------------------------------------------------ secrets

    def _private_keys(self, text: str, at: Candidates) -> Iterator[Finding]:
        for i in at.among(self._private_key_keys):
            pattern = self.private_key_headers[i]
            for m in _scan(pattern, text, at(("private key", i))):
                line_start = text.rfind("\n", 0, m.start()) + 1
                dashes = text.rfind("-----", line_start, m.start())
                start = dashes if dashes >= 0 else m.start()
                end_match = _KEY_END.search(text, m.end())
                # No end marker: a truncated block (or PuTTY format): the key-material lines.
                end = end_match.end() if end_match else _end_of_key_material(text, m.end())
                yield Finding(start, end, "PRIVATE_KEY", _RANK_PRIVATE_KEY)

    def _tokens(self, text: str, at: Candidates) -> Iterator[Finding]:
        shaped: dict[str, list[Span]] = {}
        if self.prefilter is None:
            shaped = {
                kind: _lines_at(text, (m.start() for m in shape.finditer(text)))
                for kind, shape in _VALUE_SHAPE.items()
            }
        for i in at.among(self._token_keys):
            kind, pattern = self.tokens[i]
            spans = shaped[kind] if kind in shaped else at(("token", i))
            for m in _scan(pattern, text, spans):
                start, end = _secret_span(m, text)
                if start < m.start() and text[m.start() - 1].isalnum():
                    continue  # inside a longer token: AKIA... within a ULID or a base64 blob
                if end > start and not _filtered_out(text[start:end]):
                    yield Finding(start, end, kind, _RANK_TOKEN)

    def _context(self, text: str, at: Candidates) -> Iterator[Finding]:
        """Secrets known by where they stand: auth headers, URL user-info, CLI flags, config keys."""
        # The same length as text, unlike text.lower(); without the prefilter every rule scans
        # plainly, which makes Scrubber(prefilter=False) the reference the fast path must equal.
        lowered = ascii_view(text).lower() if self.prefilter is not None else None
        for i in at.among(self._context_keys):
            rule = CONTEXT_RULES[i]
            for lo, hi in at(("context", i)):
                for start, end, kind in rule.findings(text, lo, hi, lowered):
                    if kind == "SECRET" and _entropy_kind(text, start, text[start:end]) == "AWS_SECRET_KEY":
                        kind = "AWS_SECRET_KEY"  # aws_secret_access_key = <40 characters>
                    yield Finding(start, end, kind, _RANK_CONTEXT)

    def _keywords(self, text: str, at: Candidates) -> Iterator[Finding]:
        gated = self.prefilter is not None and self.prefilter.active
        if gated:
            # The prefilter says which of detect-secrets' keyword patterns can match on which line.
            per_line: dict[Span, list[int]] = {}
            for k in at.among(self._keyword_keys):
                for span in _lines_in(text, at(("keyword", k))):
                    per_line.setdefault(span, []).append(k)
            lines = sorted(per_line)
        else:
            # Every denylisted keyword contains one of these; finding them in lowered text is
            # much cheaper than the case-insensitive alternation, which then confirms per line.
            lowered = text.lower()
            lines = _lines_at(text, (i for needle in _KEYWORD_NEEDLES for i in _find_all(lowered, needle)))
        every = list(range(len(_KEYWORD_PATTERNS)))
        for line_start, line_end in lines:
            line = text[line_start:line_end]
            if not gated and not _KEYWORD_HINT.search(line):
                continue
            for k in per_line[(line_start, line_end)] if gated else every:
                pattern, group = _KEYWORD_PATTERNS[k]
                for m in pattern.finditer(line):
                    value = m.group(group)
                    if not value or _filtered_out(value):
                        continue
                    quoted = m.start(group) > 0 and line[m.start(group) - 1] in "\"'`"
                    if not quoted and _CODE_VALUE.search(value) and not self._random_looking(value):
                        continue
                    if _NAME_VALUE.fullmatch(value) and _KEYWORD_PART.search(value.replace("-", "_")):
                        continue  # a name such as "DB_PASSWORD" or "X-API-Key", not a value
                    key_text = m.group(0)[: m.start(group) - m.start()]
                    key = re.split(r"[^\w.\-]+", key_text.strip(" :=\"'`[]"))[-1]
                    if _REFERENCE_KEY.search(key_text) or key_kind(key) is None:
                        continue  # "secretName: ...", "detect-secrets: filename=..."
                    yield Finding(
                        line_start + m.start(group),
                        line_start + m.end(group),
                        _keyword_kind(line[: m.start(group)], value),
                        _RANK_KEYWORD,
                    )

    def _random_looking(self, value: str) -> bool:
        """A long value with the entropy of a key: not an identifier, whatever its letters."""
        return len(value) >= 20 and _shannon_entropy(self.base64, value) > self.base64.entropy_limit

    def _entropy(self, text: str, at: Candidates, covered: _Covered | None = None) -> Iterator[Finding]:
        """High-entropy strings. One inside a finding already made changes nothing (the worst
        rank, merged into it): ``covered`` skips computing its entropy."""
        covered = covered or _Covered([])
        for plugin in (self.hex, self.base64):
            for m in _scan(plugin.regex, text, at(plugin.regex)):
                for start, value in _segments(m.start(2), m.group(2)):
                    if covered(start, start + len(value)):
                        continue
                    if self._high_entropy(plugin, value) and not self._hash_like(text, start):
                        yield Finding(start, start + len(value), _entropy_kind(text, start, value), _RANK_ENTROPY)
        # detect-secrets' "eager" ad-hoc mode: unquoted strings too, but only long ones, since
        # chat and logs rarely quote what they paste.
        for m in _scan(self.base64_unquoted, text, at(self.base64_unquoted)):
            for start, segment in _segments(m.start(), m.group(0)):
                value = segment.rstrip("=")
                if covered(start, start + len(segment)):
                    continue
                # the character classes first: a run without all three (a hex digest, a path, a
                # wheel's name) is dropped without computing its entropy; the value is ASCII (the pattern)
                if (
                    len(value) >= _UNQUOTED_MIN
                    and _DIGIT.search(value) is not None
                    and _UPPER.search(value) is not None
                    and _LOWER.search(value) is not None
                    and self._high_entropy(self.base64, value)
                    and not self._hash_like(text, start)
                ):
                    yield Finding(start, start + len(segment), _entropy_kind(text, start, value), _RANK_ENTROPY)

    @staticmethod
    def _high_entropy(plugin: HighEntropyStringsPlugin, value: str) -> bool:
        return (
            len(value) >= 16
            and _shannon_entropy(plugin, value) > plugin.entropy_limit
            and not _filtered_out(value)
        )

    @staticmethod
    def _hash_like(text: str, start: int) -> bool:
        """A content hash (commit, checksum, SRI integrity) or an inline file (a ``data:`` URI):
        it names or carries data, it unlocks nothing."""
        if _SRI_PREFIX.search(text, max(0, start - 8), start) or text.endswith(";base64,", 0, start):
            return True
        line_start = text.rfind("\n", 0, start) + 1
        return bool(_HASH_CONTEXT.search(text, line_start, start))

    # ------------------------------------------------------------------ PII

    @staticmethod
    def _emails(text: str, at: Candidates, passwords: list[Finding]) -> Iterator[Finding]:
        for m in _scan(_EMAIL, text, at(_EMAIL)):
            local = m.group(0).split("@", 1)[0]
            if local.lower() in _SERVICE_MAILBOXES or m.group(0).rsplit(".", 1)[-1].lower() in _PRIVATE_TLDS:
                continue
            # In a URL with a password, what follows the password and the @ is a host.
            if any(p.start < m.end() and m.start() < p.end for p in passwords):
                continue
            yield Finding(m.start(), m.end(), "EMAIL", _RANK_PII)

    @staticmethod
    def _ips(text: str, at: Candidates) -> Iterator[Finding]:
        for m in _scan(_IPV4, text, at(_IPV4)):
            try:
                ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(m.group(0))
            except ValueError:
                continue
            if _identifies_nobody(ip):
                continue
            line_start = text.rfind("\n", 0, m.start()) + 1
            if _VERSION_CONTEXT.search(text, line_start, m.start()):
                continue  # __version__ = "1.2.3.4"
            yield Finding(m.start(), m.end(), "IP_ADDRESS", _RANK_PII)
        if ":" not in text:
            return
        for m in _scan(_IPV6, text, at(_IPV6)):
            candidate = m.group(0)
            if sum(1 for g in re.split(r"[:.]", candidate) if g) < 3:
                continue  # "::1"-like fragments and slices such as x[1::2]
            try:
                ip = ipaddress.IPv6Address(candidate)
            except ValueError:
                continue
            if _identifies_nobody(ip):
                continue
            yield Finding(m.start(), m.end(), "IP_ADDRESS", _RANK_PII)

    @staticmethod
    def _numbers(text: str, at: Candidates) -> Iterator[Finding]:
        """Cards (Luhn + issuer prefix), SSNs, SINs, Aadhaar numbers, DNIs, CPFs, NIRs and IBANs."""
        for m in _scan(_CARD, text, at(_CARD)):
            digits = re.sub(r"\D", "", m.group(0))
            if _card_issuer_ok(digits) and luhn.is_valid(digits):
                if digits == m.group(0):
                    # Bare digits are seeds, ids and timestamps more often than cards: only
                    # after a word for cards on the line or the one above (a CSV header).
                    above = text.rfind("\n", 0, max(0, text.rfind("\n", 0, m.start()))) + 1
                    if not _CARD_HINT.search(text, above, m.start()):
                        continue
                yield Finding(m.start(), m.end(), "CREDIT_CARD", _RANK_PII)
        for m in _scan(_SSN, text, at(_SSN)):
            if us_ssn.is_valid(m.group(0).replace(" ", "-")):
                yield Finding(m.start(), m.end(), "SSN", _RANK_PII)
        for m in _scan(_SSN_PLAIN, text, at(_SSN_PLAIN)):
            if us_ssn.is_valid(m.group(1)):
                yield Finding(m.start(1), m.end(1), "SSN", _RANK_PII)
        for pattern, validator in _NATIONAL_IDS:
            for m in _scan(pattern, text, at(pattern)):
                if validator.is_valid(m.group(0)):
                    yield Finding(m.start(), m.end(), "NATIONAL_ID", _RANK_PII)
        for pattern, validator in ((_AADHAAR_PLAIN, in_aadhaar), (_CPF_PLAIN, br_cpf)):
            for m in _scan(pattern, text, at(pattern)):
                if validator.is_valid(m.group(1)):
                    yield Finding(m.start(1), m.end(1), "NATIONAL_ID", _RANK_PII)
        for m in _scan(_IBAN, text, at(_IBAN)):
            if std_iban.is_valid(m.group(0)):
                yield Finding(m.start(), m.end(), "IBAN", _RANK_PII)

    def _phones(self, text: str, at: Candidates, taken: list[Finding]) -> Iterator[Finding]:
        for m in _scan(_PHONE_CANDIDATE, text, at(_PHONE_CANDIDATE)):
            candidate = m.group(0)
            digits = sum(c.isdigit() for c in candidate)
            if digits < 7 or digits > 17:
                continue
            if any(f.start < m.end() and m.start() < f.end for f in taken):
                continue  # already a card, an id, an IP address or part of a token
            if (
                _DOTTED_QUAD.fullmatch(candidate)
                or _NOT_A_PHONE.fullmatch(candidate.strip())
                or _DECIMAL.search(candidate)
            ):
                continue  # a netmask, a decimal (7.39020262), a ratio (21243/21253), a git range
            if not re.search(r"[+\s().\-/]", candidate.strip()):
                # A bare run of digits is a size, a timestamp or an id unless the words
                # before it say it is a phone number.
                line_start = text.rfind("\n", 0, m.start()) + 1
                if not _PHONE_HINT.search(text, max(line_start, m.start() - 40), m.start()) and not (
                    _PHONE_FIELD.search(text, max(line_start, m.start() - 160), m.start())
                ):
                    continue
            if _YEAR_RANGE.fullmatch(candidate.strip()):
                continue  # 1800-2009
            # The matcher (with its checks against dates, times and stray digits around the
            # number) runs on the candidate's neighbourhood within its line.
            lo = max(text.rfind("\n", 0, m.start()) + 1, m.start() - 12)
            hi = m.end() + 12
            nl = text.find("\n", m.end())
            if 0 <= nl < hi:
                hi = nl
            window = text[lo:hi]
            if not _ParseProbe.parses(window, m.end() - lo):
                continue  # the matcher rejects every number-like part of the window up to the candidate's end
            regions = self._phone_regions_of(candidate)
            first = next(regions, None)
            if first is None and (rest := _after_first_group(candidate)):
                regions = self._phone_regions_of(rest)
                first = next(regions, None)
            for region in itertools.chain((first,) if first else (), regions):
                hits = [
                    h
                    for h in _WindowMatcher(window, region, stop=m.end() - lo)
                    if lo + h.start < m.end() and m.start() < lo + h.end
                ]
                for h in hits:
                    yield Finding(lo + h.start, lo + h.end, "PHONE", _RANK_PHONE)
                if hits:
                    break

    def _phone_regions_of(self, candidate: str) -> Iterator[str]:
        """The configured regions in which ``candidate`` is a valid number, one at a time (the matcher runs in
        each before the next is parsed; most numbers are found in the first). Parsing is cheaper than
        matching, so it picks the regions the matcher then runs in."""
        international = candidate.lstrip("( ").startswith("+")
        for region in self.phone_regions:
            try:
                number = phonenumbers.parse(candidate, region)
            except phonenumbers.NumberParseException:
                continue
            if phonenumbers.is_valid_number(number):
                yield region
            if international:
                return  # an international number reads the same in every region

    @staticmethod
    def _home_dirs(text: str, at: Candidates) -> Iterator[Finding]:
        for m in _scan(_HOME, text, at(_HOME)):
            name = m.group("name").rstrip(".")
            if name.lower() in _SERVICE_USERS or not name:
                continue
            yield Finding(m.start("name"), m.start("name") + len(name), "USERNAME", _RANK_PII)


def _after_first_group(candidate: str) -> str:
    """The candidate without a leading group of at most four digits and the space after it ("" when it has
    none): the seconds of a time stamp before a number (``10:00:01 (415) 555-2671``) join the candidate and
    make it valid nowhere, while the matcher, which knows times, finds the number after them."""
    head, _, rest = candidate.strip().partition(" ")
    return rest if rest and head.isdigit() and len(head) <= 4 else ""


class _WindowMatcher(phonenumbers.PhoneNumberMatcher):
    """phonenumbers' matcher (leniency VALID) that stops at the first of its candidates starting at or
    after ``stop``: every match it makes from a candidate lies inside the candidate, so those can only
    end past ``stop`` and ``_phones`` (which keeps the matches that overlap its own candidate, ending at
    ``stop`` in the window) drops them; the matches before are made exactly as the whole matcher makes
    them, one after the other. The matcher's own candidates after a phone candidate (the seconds and
    milliseconds after a log's date, the text after an address) were most of what a window cost."""

    def __init__(self, text: str, region: str, stop: int) -> None:
        super().__init__(text, region, leniency=phonenumbers.Leniency.VALID)
        self._stop = stop

    def _find(self, index: int) -> PhoneNumberMatch | None:
        # phonenumbers.PhoneNumberMatcher._find (8.13 to 9.0), with the stop added
        match = _MATCHER_PATTERN.search(self.text, index)
        while self._max_tries > 0 and match is not None and match.start() < self._stop:
            start = match.start()
            candidate = self._trim_after_first_match(_SECOND_NUMBER_START_PATTERN, self.text[start : match.end()])
            if len(candidate) >= self._min_candidate_length:
                found = self._extract_match(candidate, start)
                if found is not None:
                    return found
                self._max_tries -= 1
            index = start + len(candidate)
            match = _MATCHER_PATTERN.search(self.text, index)
        return None


class _Parsed(Exception):
    """The matcher got as far as parsing a number: what it finds depends on the region."""


class _ParseProbe(_WindowMatcher):
    """The matcher's region-free steps: whether, before ``stop``, any of its candidates passes the checks
    that come before parsing (dates, time stamps, brackets, page ranges, letters around it). Where none
    does, the matcher finds nothing in any region, and nothing needs parsing: a log's time stamps
    (``2024-05-01 11:08:19``) took eight parses and up to three matcher runs each."""

    def __init__(self, text: str, stop: int) -> None:
        super().__init__(text, "ZZ", stop)

    @classmethod
    def parses(cls, text: str, stop: int) -> bool:
        try:
            for _ in cls(text, stop):
                pass
        except _Parsed:
            return True
        return False

    def _parse_and_verify(self, candidate: str, offset: int) -> PhoneNumberMatch | None:
        # phonenumbers.PhoneNumberMatcher._parse_and_verify (8.13 to 9.0) up to its parse, at leniency VALID
        if not _matcher_fullmatch(_MATCHING_BRACKETS, candidate) or _PUB_PAGES.search(candidate):
            return None
        if offset > 0 and not _LEAD_PATTERN.match(candidate):
            previous = self.text[offset - 1]
            if self._is_invalid_punctuation_symbol(previous) or self._is_latin_letter(previous):
                return None
        last = offset + len(candidate)
        if last < len(self.text):
            following = self.text[last]
            if self._is_invalid_punctuation_symbol(following) or self._is_latin_letter(following):
                return None
        raise _Parsed


class _Covered:
    """Whether a span lies inside the union of some findings."""

    def __init__(self, findings: Iterable[Finding]) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        for f in sorted(findings):
            if self.ends and f.start < self.ends[-1]:  # overlapping, as _merge joins them
                self.ends[-1] = max(self.ends[-1], f.end)
            else:
                self.starts.append(f.start)
                self.ends.append(f.end)

    def __call__(self, start: int, end: int) -> bool:
        i = bisect_right(self.starts, start) - 1
        return i >= 0 and end <= self.ends[i]


@lru_cache(maxsize=8)
def _charset_order(charset: str) -> dict[str, int]:
    return {c: i for i, c in enumerate(charset)}


def _shannon_entropy(plugin: HighEntropyStringsPlugin, data: str) -> float:
    """detect-secrets' calculate_shannon_entropy, counted once instead of once per character
    of the charset; the sum runs in the same order, so the value is the same to the bit."""
    order = _charset_order(plugin.charset)
    counts = Counter(data)
    size = len(data)
    entropy = 0.0
    for x in sorted((c for c in counts if c in order), key=order.__getitem__):
        p_x = float(counts[x]) / size
        entropy += -p_x * math.log(p_x, 2)
    if isinstance(plugin, HexHighEntropyString) and size > 1:
        try:
            int(data)  # all digits: detect-secrets lowers the entropy of numbers
            entropy -= 1.2 / math.log(size, 2)
        except ValueError:
            pass
    return entropy


def _scan(pattern: re.Pattern[str], text: str, spans: list[Span]) -> Iterator[re.Match[str]]:
    for lo, hi in spans:
        yield from pattern.finditer(text, lo, hi)


def _lines_in(text: str, spans: list[Span]) -> list[Span]:
    """The lines within candidate spans (which reach one character into their neighbours)."""
    out: list[Span] = []
    for lo, hi in spans:
        start = lo + 1 if lo > 0 and text[lo] == "\n" else lo
        end = hi - 1 if hi > start and text[hi - 1] == "\n" else hi
        while start <= end:
            nl = text.find("\n", start, end)
            stop = end if nl < 0 else nl
            out.append((start, stop))
            start = stop + 1
    return out


@lru_cache(maxsize=4)
def _prefilter(expressions: tuple[tuple[str | None, int], ...]) -> Prefilter:
    """One compiled database per set of expressions, shared by every Scrubber of a process."""
    return Prefilter(expressions)


def _segments(start: int, value: str) -> Iterator[tuple[int, str]]:
    """``value``, or its ``/``-separated parts when it mixes base64's ``/`` with base64url's
    ``-`` or ``_``: no encoded key does, while paths and model ids
    (``HuggingFaceTB/SmolLM2-135M-Instruct``) do, and only a part of them can be a secret."""
    if "/" not in value or ("-" not in value and "_" not in value):
        yield start, value
        return
    for part in value.split("/"):
        if part:
            yield start, part
        start += len(part) + 1


def _find_all(text: str, needle: str) -> Iterator[int]:
    i = text.find(needle)
    while i >= 0:
        yield i
        i = text.find(needle, i + 1)


def _lines_at(text: str, positions: Iterable[int]) -> list[tuple[int, int]]:
    """The (start, end) of each distinct line holding one of ``positions``, in order."""
    spans: dict[int, int] = {}
    for pos in positions:
        start = text.rfind("\n", 0, pos) + 1
        if start not in spans:
            end = text.find("\n", pos)
            spans[start] = end if end >= 0 else len(text)
    return sorted(spans.items())


def _private_key_patterns() -> list[tuple[str, re.Pattern[str]]]:
    cls: Any = get_mapping_from_secret_type_to_class()["Private Key"]
    # detect-secrets lists the headers it knows; PKCS#8 encrypted keys and others differ only
    # in the words before PRIVATE KEY.
    return [("PRIVATE_KEY", p) for p in cls.denylist] + [
        ("PRIVATE_KEY", re.compile(r"BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"))
    ]


def _end_of_key_material(text: str, pos: int) -> int:
    """End of the run of non-blank lines after a key header (base64 body, PuTTY fields)."""
    end = text.find("\n", pos)
    if end < 0:
        return len(text)
    while True:
        nxt = text.find("\n", end + 1)
        line = text[end + 1 : nxt if nxt >= 0 else len(text)]
        if not line.strip() or not re.fullmatch(r"[A-Za-z0-9+/=:\- ]+", line.strip()):
            return end
        end = nxt if nxt >= 0 else len(text)
        if nxt < 0:
            return end


def _identifies_nobody(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, unspecified, multicast and reserved addresses (and netmasks) name no host;
    neither does 0.x.x.x ("this network"), which is more often a version number."""
    if ip.version == 4 and ip.packed[0] == 0:
        return True
    return ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_reserved


def _card_issuer_ok(digits: str) -> bool:
    """Length and issuer prefix of the major card networks (cuts Luhn's 1-in-10 false hits)."""
    n = len(digits)
    two, four = int(digits[:2]), int(digits[:4])
    return (
        (digits[0] == "4" and n in (13, 16, 19))  # Visa
        or ((51 <= two <= 55 or 2221 <= four <= 2720) and n == 16)  # Mastercard
        or (two in (34, 37) and n == 15)  # American Express
        or ((digits.startswith("6011") or two == 65 or 644 <= int(digits[:3]) <= 649) and 16 <= n <= 19)
        or (digits.startswith("35") and 16 <= n <= 19)  # JCB (3528-3589 issued; generators use all of 35)
        or ((300 <= int(digits[:3]) <= 305 or two in (36, 38)) and 14 <= n <= 19)  # Diners
        or (two == 62 and 16 <= n <= 19)  # UnionPay
    )


def _merge(findings: Iterable[Finding]) -> list[Finding]:
    """Union overlapping findings (nothing detected survives); the best rank names the union."""
    ordered = sorted(f for f in findings if f.end > f.start)
    merged: list[Finding] = []
    for f in ordered:
        if merged and f.start < merged[-1].end:
            top = merged[-1]
            best = min((top, f), key=lambda x: (x.rank, -(x.end - x.start)))
            merged[-1] = Finding(top.start, max(top.end, f.end), best.kind, best.rank)
        else:
            merged.append(f)
    return merged


# --------------------------------------------------------------------------- module API


@lru_cache(maxsize=1)
def _default() -> Scrubber:
    return Scrubber()


def scrub(text: str) -> tuple[str, Counter[str]]:
    """Scrub ``text`` with the default settings; see ``Scrubber`` for tuned ones."""
    return _default().scrub(text)


def versions() -> dict[str, str]:
    """anonymizer component -> version, recorded in each event's findings."""
    out = {"scrubber": SCRUBBER_VERSION}
    for dist in ("detect-secrets", "phonenumbers", "python-stdnum"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:  # pragma: no cover - an install without metadata
            out[dist] = "unknown"
    return out
