"""An out-of-sample planted corpus: secrets and personal data the scrubber was not written against.

This module must not import the scrubber, its settings or the in-sample corpus
(``tests/planted_corpus.py``, written with the scrubber): what it plants comes from elsewhere.

- **Personal data** from Faker (MIT), in eight locales: names, e-mail addresses, phone numbers
  (kept only where Google's libphonenumber metadata says the number is valid in its region, so
  the area codes exist), public IPv4 addresses, IPv6 addresses in the blocks IANA allocated to
  the regional registries, card numbers of real lengths with a Luhn check digit, US SSNs,
  Canadian SINs, Spanish DNIs, Brazilian CPFs, French NIRs, Aadhaar numbers (Faker's check digit
  is random; python-stdnum's Verhoeff computes the real one) and IBANs.
- **Secrets** from two sources, both turned into concrete strings by ``rstr`` (BSD):
  the regexes of truffleHog's rule set, read as data from the ``truffleHogRegexes`` package
  (GPL; a test-time dependency only), and the token formats that providers document (AWS,
  GitHub, GitLab, Slack, Stripe, OpenAI, Anthropic, Hugging Face, Google, npm, PyPI, ...),
  written below as regexes. Passwords come from Faker.
- **Carriers**: what a coding agent's transcript holds: curl commands with auth headers and
  ``-u user:pass``, code calling HTTP libraries, ``.env`` files, YAML/TOML/JSON/INI configs,
  connection strings in many URL schemes, CLI password flags, cloud connection strings, stack
  traces, chat messages and tool-call outputs.

``generate(seed)`` is deterministic for a seed (and the installed package versions), and
``evaluate(corpus, scrub)`` gives recall per kind, per carrier and per category. An item is
found only when no ten-character piece of it (or the whole value, if shorter) is left.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import version
from importlib.resources import files
from typing import Any
from urllib.parse import quote

import phonenumbers
import rstr
from faker import Faker
from stdnum import verhoeff

SECRET, PII = "secret", "pii"
LEAK_WINDOW = 10
#: the latest time Faker may draw: its default, now, made the same seed give other microseconds a moment later
CLOCK = datetime(2026, 1, 1)

#: Faker locale -> the phone region its numbers must be valid in.
LOCALES: dict[str, str] = {
    "en_US": "US",
    "en_GB": "GB",
    "de_DE": "DE",
    "fr_FR": "FR",
    "es_ES": "ES",
    "pt_BR": "BR",
    "en_IN": "IN",
    "en_AU": "AU",
}

__all__ = ["LOCALES", "PII", "SECRET", "Corpus", "Document", "Evaluation", "Item", "evaluate", "generate", "leaked"]


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Item:
    """One planted value: ``text[start:end] == value`` in its document."""

    kind: str
    category: str
    value: str
    start: int
    end: int
    parts: tuple[str, ...] = ()  # what must vanish when that is not the whole value (key bodies)

    def must_vanish(self) -> tuple[str, ...]:
        return self.parts or (self.value,)


@dataclass(frozen=True)
class Document:
    text: str
    carrier: str
    items: tuple[Item, ...]


@dataclass(frozen=True)
class Corpus:
    seed: int
    documents: tuple[Document, ...]
    source: str

    @property
    def items(self) -> list[Item]:
        return [i for d in self.documents for i in d.items]


@dataclass
class Evaluation:
    """Found and planted counts per kind and per carrier, and what was left."""

    found: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    carrier_found: Counter[str] = field(default_factory=Counter)
    carrier_total: Counter[str] = field(default_factory=Counter)
    category: dict[str, str] = field(default_factory=dict)
    missed: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, carrier, the line)

    def recall(self, category: str | None = None) -> float:
        kinds = [k for k, c in self.category.items() if category in (None, c)]
        return sum(self.found[k] for k in kinds) / max(1, sum(self.total[k] for k in kinds))

    def items(self, category: str | None = None) -> int:
        return sum(n for k, n in self.total.items() if category in (None, self.category[k]))


def evaluate(corpus: Corpus, scrub: Callable[[str], tuple[str, Any]]) -> Evaluation:
    result = Evaluation()
    for doc in corpus.documents:
        out, _ = scrub(doc.text)
        for item in doc.items:
            key = f"{item.category}:{doc.carrier}"
            result.total[item.kind] += 1
            result.carrier_total[key] += 1
            result.category[item.kind] = item.category
            if any(leaked(part, out) for part in item.must_vanish()):
                line_start = doc.text.rfind("\n", 0, item.start) + 1
                line_end = doc.text.find("\n", item.end)
                line = doc.text[line_start : line_end if line_end >= 0 else len(doc.text)]
                result.missed.append((item.kind, doc.carrier, line[:300]))
            else:
                result.found[item.kind] += 1
                result.carrier_found[key] += 1
    return result


def leaked(value: str, text: str, window: int = LEAK_WINDOW) -> bool:
    """Whether any ``window``-long piece of ``value`` (or all of a shorter one) is in ``text``."""
    w = min(len(value), window)
    return any(value[i : i + w] in text for i in range(len(value) - w + 1))


# --------------------------------------------------------------------------- secret formats

#: Token formats as the providers document them (prefixes, alphabets, lengths).
PROVIDER_FORMATS: dict[str, tuple[str, ...]] = {
    "aws_access_key": (r"(AKIA|ASIA)[A-Z2-7]{16}",),
    "aws_secret_key": (r"[A-Za-z0-9/+]{40}",),
    "github_token": (r"gh[pousr]_[A-Za-z0-9]{36}", r"github_pat_11[A-Z0-9]{20}_[A-Za-z0-9]{59}"),
    "gitlab_token": (r"glpat-[A-Za-z0-9_\-]{20}",),
    "slack_token": (
        r"xoxb-[0-9]{11,13}-[0-9]{11,13}-[A-Za-z0-9]{24}",
        r"xoxp-[0-9]{11,13}-[0-9]{11,13}-[0-9]{11,13}-[a-f0-9]{32}",
        r"xapp-1-A[0-9A-Z]{10}-[0-9]{13}-[a-f0-9]{64}",
    ),
    "slack_webhook": (r"https://hooks\.slack\.com/services/T[A-Z0-9]{8,10}/B[A-Z0-9]{8,10}/[A-Za-z0-9]{24}",),
    "stripe_key": (r"(sk|rk)_(live|test)_[A-Za-z0-9]{24,99}",),
    "openai_key": (
        r"sk-(proj|svcacct|admin)-[A-Za-z0-9_\-]{74}T3BlbkFJ[A-Za-z0-9_\-]{74}",
        r"sk-[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}",
    ),
    "anthropic_key": (r"sk-ant-(api03|admin01)-[A-Za-z0-9_\-]{93}AA",),
    "huggingface_token": (r"hf_[A-Za-z]{34}",),
    "google_api_key": (r"AIza[0-9A-Za-z_\-]{35}",),
    "google_oauth_token": (r"ya29\.[0-9A-Za-z_\-]{100,160}",),
    "npm_token": (r"npm_[A-Za-z0-9]{36}",),
    "pypi_token": (r"pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_\-]{70,150}",),
    "sendgrid_key": (r"SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}",),
    "digitalocean_token": (r"dop_v1_[a-f0-9]{64}",),
    "databricks_token": (r"dapi[a-f0-9]{32}",),
    "shopify_token": (r"shpat_[a-fA-F0-9]{32}",),
    "telegram_bot_token": (r"[0-9]{8,10}:AA[0-9A-Za-z_\-]{33}",),
    "mailgun_key": (r"key-[0-9a-f]{32}",),
    "postman_key": (r"PMAK-[a-f0-9]{24}-[a-f0-9]{34}",),
    "vault_token": (r"hvs\.[A-Za-z0-9_\-]{90,100}",),
    "grafana_token": (r"glsa_[A-Za-z0-9]{32}_[a-f0-9]{8}",),
    "twilio_key": (r"SK[0-9a-f]{32}",),
}

#: The environment-variable name a project gives each provider's token.
ENV_NAMES: dict[str, tuple[str, ...]] = {
    "aws_access_key": ("AWS_ACCESS_KEY_ID",),
    "aws_secret_key": ("AWS_SECRET_ACCESS_KEY",),
    "github_token": ("GITHUB_TOKEN", "GH_TOKEN", "GITHUB_PAT"),
    "gitlab_token": ("GITLAB_TOKEN", "CI_JOB_TOKEN", "GL_TOKEN"),
    "slack_token": ("SLACK_BOT_TOKEN", "SLACK_TOKEN"),
    "slack_webhook": ("SLACK_WEBHOOK_URL",),
    "stripe_key": ("STRIPE_SECRET_KEY", "STRIPE_API_KEY"),
    "openai_key": ("OPENAI_API_KEY",),
    "anthropic_key": ("ANTHROPIC_API_KEY",),
    "huggingface_token": ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
    "google_api_key": ("GOOGLE_API_KEY", "GEMINI_API_KEY", "MAPS_KEY"),
    "google_oauth_token": ("GOOGLE_ACCESS_TOKEN",),
    "npm_token": ("NPM_TOKEN", "NODE_AUTH_TOKEN"),
    "pypi_token": ("PYPI_TOKEN", "TWINE_PASSWORD"),
    "sendgrid_key": ("SENDGRID_API_KEY",),
    "digitalocean_token": ("DIGITALOCEAN_TOKEN", "DO_TOKEN"),
    "databricks_token": ("DATABRICKS_TOKEN",),
    "shopify_token": ("SHOPIFY_ACCESS_TOKEN",),
    "telegram_bot_token": ("TELEGRAM_BOT_TOKEN",),
    "mailgun_key": ("MAILGUN_API_KEY",),
    "postman_key": ("POSTMAN_API_KEY",),
    "vault_token": ("VAULT_TOKEN",),
    "grafana_token": ("GRAFANA_SERVICE_ACCOUNT_TOKEN",),
    "twilio_key": ("TWILIO_API_KEY",),
}


@dataclass(frozen=True)
class Rule:
    """One truffleHog rule: a keyword that must precede the value on its line (or none)."""

    name: str
    keyword: str | None
    value: str


def trufflehog_rules() -> list[Rule]:
    """truffleHog's rules as (keyword, value pattern), read from the package's JSON file.

    Their classes are written ``[a|A]``, which also matches ``|``; the ``|`` is dropped so the
    strings generated are the ones the rule means. Rules that match a fixed header or a JSON
    key rather than a value become carriers instead (private keys, the service-account file).
    """
    data: dict[str, str] = json.loads(files("truffleHogRegexes").joinpath("regexes.json").read_text())
    rules = []
    for name, raw in sorted(data.items()):
        pattern = re.sub(r"\[([^\]]*)\]", lambda m: "[" + m.group(1).replace("|", "") + "]", raw)
        if "PRIVATE KEY" in pattern or "service_account" in pattern or "://" in pattern and "@" in pattern:
            continue
        pattern = re.sub(r"(?<=[a-z])\.(?=[a-z])", r"\\.", pattern)  # hooks.slack.com: dots meant literally
        if ".*" in pattern:
            keyword, value = pattern.split(".*", 1)
            value = re.sub(r"^\['\"\]|\['\"\]$", "", value)
            rules.append(Rule(name, keyword, value))
        elif name == "Google Oauth":
            rules.append(Rule(name, "client_secret", re.sub(r'^\("client_secret":"|"\)$', "", pattern)))
        else:
            rules.append(Rule(name, None, pattern))
    return rules


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Put:
    """A value to plant where it stands in a carrier."""

    kind: str
    category: str
    value: str
    parts: tuple[str, ...] = ()


Piece = str | Put

# IANA's allocations of global unicast IPv6 to the regional registries (the /12s and 2001::/16).
IPV6_BLOCKS = (
    "2001", "2400", "2401", "2404", "2600", "2601", "2602", "2605", "2800", "2803", "2a00", "2a01", "2a02", "2c0f"
)

CARD_TYPES = ("visa16", "visa16", "visa19", "mastercard", "mastercard", "amex", "discover", "jcb16", "diners")

URL_SCHEMES = (
    ("postgresql", 5432, "{db}"),
    ("postgres", 5432, "{db}?sslmode=require"),
    ("mysql", 3306, "{db}"),
    ("mysql+pymysql", 3306, "{db}?charset=utf8mb4"),
    ("postgresql+asyncpg", 5432, "{db}"),
    ("redis", 6379, "0"),
    ("rediss", 6380, "0"),
    ("mongodb", 27017, "{db}?authSource=admin"),
    ("mongodb+srv", None, "{db}?retryWrites=true&w=majority"),
    ("amqp", 5672, "%2F"),
    ("amqps", 5671, "vhost"),
    ("https", None, "{db}.git"),
    ("ftp", 21, "uploads/"),
    ("sftp", 22, "data/"),
    ("smtp", 587, ""),
    ("ldap", 389, "dc=corp,dc=local"),
    ("mssql+pyodbc", 1433, "{db}?driver=ODBC+Driver+18+for+SQL+Server"),
    ("clickhouse", 9000, "{db}"),
    ("nats", 4222, ""),
    ("kafka", 9092, ""),
)


class Values:
    """Every value generator, sharing one seeded ``random.Random`` and one Faker per locale."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.x = rstr.Rstr(rng)
        self.fakers: dict[str, Faker] = {}
        for locale in (*LOCALES, "en_CA"):
            f = Faker(locale)
            f.seed_instance(rng.randrange(2**32))
            self.fakers[locale] = f
        self.rules = trufflehog_rules()

    # ---------------------------------------------------------------- helpers

    def faker(self, locale: str | None = None) -> Faker:
        return self.fakers[locale or self.rng.choice(list(LOCALES))]

    def pick(self, seq: Iterable[str]) -> str:
        items = list(seq)
        return items[self.rng.randrange(len(items))]

    def host(self) -> str:
        f = self.faker()
        name = self.pick(["db", "pg", "mysql", "cache", "mq", "api", "auth", "search", "primary", "replica"])
        return self.pick(
            [
                f"{name}.{f.domain_name()}",
                f"{name}-{self.rng.randint(0, 3)}.{f.domain_word()}.internal",
                f"{name}.{self.pick(['eu-west-1', 'us-east-1', 'ap-south-1'])}.rds.amazonaws.com",
                f"{f.domain_word()}-{name}.postgres.database.azure.com",
                f"{name}",
            ]
        )

    def user(self) -> str:
        return self.pick(["app", "admin", "postgres", "svc_reader", "deploy", "etl", "api", "root", "default"])

    # ---------------------------------------------------------------- secrets

    def provider_token(self, kind: str | None = None) -> Put:
        kind = kind or self.pick(PROVIDER_FORMATS)
        return Put(kind, SECRET, self.x.xeger(self.pick(PROVIDER_FORMATS[kind])))

    def rule_token(self, rule: Rule | None = None) -> tuple[Rule, Put]:
        rule = rule or self.rng.choice(self.rules)
        return rule, Put(f"trufflehog: {rule.name}", SECRET, self.x.xeger(rule.value))

    def password(self, kind: str = "password") -> Put:
        f = self.faker()
        roll = self.rng.random()
        if roll < 0.5:
            value = f.password(length=self.rng.randint(10, 24), special_chars=self.rng.random() < 0.6)
        elif roll < 0.8:  # the passwords people choose: a word, a year, a sign
            value = f"{f.word().title()}{self.rng.randint(1970, 2025)}{self.pick('!#$%*?.')}"
        else:  # generated by a password manager or `openssl rand -base64`
            value = base64.b64encode(self.rng.randbytes(self.rng.choice([12, 18, 24]))).decode().rstrip("=")
        return Put(kind, SECRET, value)

    def bearer(self) -> Put:
        roll = self.rng.random()
        if roll < 0.3:
            return self.jwt()
        if roll < 0.6:
            return self.provider_token(self.pick(["github_token", "openai_key", "huggingface_token",
                                                  "google_oauth_token", "gitlab_token", "anthropic_key"]))
        alphabet = self.pick([r"[A-Za-z0-9]", r"[A-Za-z0-9_\-]", r"[a-f0-9]", r"[A-Za-z0-9._~+/\-]"])
        return Put("bearer_token", SECRET, self.x.xeger(f"{alphabet}{{{self.rng.randint(24, 64)}}}"))

    def jwt(self) -> Put:
        f = self.faker()
        now = self.rng.randint(1_650_000_000, 1_800_000_000)
        header = {"alg": self.pick(["HS256", "RS256", "ES256"]), "typ": "JWT"}
        claims: dict[str, Any] = {"sub": str(f.uuid4()), "iat": now, "exp": now + self.rng.choice([900, 3600, 86400])}
        if self.rng.random() < 0.5:
            claims.update(email=f.email(safe=False), name=f.name())
        if self.rng.random() < 0.5:
            claims.update(iss=f"https://{f.domain_name()}/", aud=self.pick(["api", "web", "mobile"]))

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        body = [b64(json.dumps(x, separators=(",", ":")).encode()) for x in (header, claims)]
        signature = b64(self.rng.randbytes(256 if header["alg"] == "RS256" else 32))
        return Put("jwt", SECRET, ".".join([*body, signature]))

    def private_key(self, label: str | None = None, escaped: bool = False) -> Put:
        label = label or self.pick(["RSA PRIVATE KEY", "OPENSSH PRIVATE KEY", "EC PRIVATE KEY", "PRIVATE KEY",
                                    "DSA PRIVATE KEY", "PGP PRIVATE KEY BLOCK", "ENCRYPTED PRIVATE KEY"])
        body = base64.b64encode(self.rng.randbytes(self.rng.choice([121, 227, 400, 1190]))).decode()
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        sep = "\\n" if escaped else "\n"
        block = sep.join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"])
        # The last line can be a few characters: a leak window of 10 would never test it.
        return Put("private_key", SECRET, block, tuple(x for x in lines if len(x) >= 16))

    def azure_key(self) -> Put:
        return Put("azure_storage_key", SECRET, base64.b64encode(self.rng.randbytes(64)).decode())

    def basic_auth(self) -> tuple[str, Put]:
        user = self.pick([self.faker().user_name(), self.user()])
        secret = self.password().value
        return user, Put("basic_auth", SECRET, base64.b64encode(f"{user}:{secret}".encode()).decode())

    def git_secret(self) -> Put:
        """What stands for the password in a clone URL: a token, or a percent-encoded password."""
        kind = self.pick(["github_token", "gitlab_token", "password"])
        if kind == "password":
            pw = self.password("url_password")
            return Put(pw.kind, pw.category, quote(pw.value, safe=""))
        return self.provider_token(kind)

    def any_secret(self, shaped: bool = False) -> Put:
        """A secret for a carrier that says it is one (a header, a key); ``shaped``: for one
        that does not (a chat message), so only values whose format tells what they are."""
        roll = self.rng.random()
        if roll < 0.6:
            return self.provider_token()
        if roll < 0.75:
            rules = [r for r in self.rules if r.keyword is None] if shaped else self.rules
            return self.rule_token(self.rng.choice(rules))[1]
        if roll < 0.85 or shaped:
            return self.jwt()
        return self.bearer()

    # ---------------------------------------------------------------- personal data

    def email(self, locale: str | None = None) -> Put:
        f = self.faker(locale)
        roll = self.rng.random()
        value = f.free_email() if roll < 0.4 else f.company_email() if roll < 0.7 else f.email(safe=False)
        return Put("email", PII, value)

    def phone(self, locale: str | None = None) -> Put:
        locale = locale or self.pick(LOCALES)
        f, region = self.fakers[locale], LOCALES[locale]
        for _ in range(200):
            value = f.phone_number()
            try:
                number = phonenumbers.parse(value, region)
            except phonenumbers.NumberParseException:
                continue
            if phonenumbers.is_valid_number(number) and phonenumbers.region_code_for_number(number) == region:
                return Put("phone", PII, value)
        raise RuntimeError(f"no valid {region} number from Faker in 200 tries")

    def ipv4(self) -> Put:
        if self.rng.random() < 0.3:  # an organisation's hosts: the anonymizer's policy replaces them too
            return Put("ipv4_private", PII, self.faker().ipv4_private())
        return Put("ipv4_public", PII, self.faker().ipv4_public())

    def ipv6(self) -> Put:
        rest = ipaddress.IPv6Address(self.faker().ipv6()).exploded.split(":")[1:]
        if self.rng.random() < 0.5:
            rest[2:5] = ["0000"] * 3  # hosts numbered from a subnet's start compress
        addr = ipaddress.IPv6Address(":".join([self.pick(IPV6_BLOCKS), *rest]))
        return Put("ipv6", PII, addr.compressed if self.rng.random() < 0.85 else addr.exploded)

    def ip(self) -> Put:
        return self.ipv6() if self.rng.random() < 0.3 else self.ipv4()

    def card(self) -> Put:
        digits = self.faker("en_US").credit_card_number(self.pick(CARD_TYPES))
        sep = self.pick(["", " ", "-", " "])
        if len(digits) == 15 or len(digits) == 14:
            groups = [digits[:4], digits[4:10], digits[10:]]
        else:
            groups = [digits[i : i + 4] for i in range(0, len(digits), 4)]
        return Put("credit_card", PII, sep.join(groups))

    def national_id(self, which: str | None = None) -> Put:
        which = which or self.pick(["us_ssn", "us_ssn", "ca_sin", "es_dni", "br_cpf", "fr_nir", "in_aadhaar"])
        if which == "us_ssn":
            return Put(which, PII, self.fakers["en_US"].ssn())
        if which == "ca_sin":
            return Put(which, PII, self.fakers["en_CA"].ssn())
        if which == "es_dni":  # as Faker's es_ES nif(), which draws from the global random: not seeded
            body = self.rng.randrange(10**8)
            return Put(which, PII, f"{body:08d}{'TRWAGMYFPDXBNJZSQVHLCKE'[body % 23]}")
        if which == "br_cpf":
            return Put(which, PII, self.fakers["pt_BR"].cpf())
        if which == "fr_nir":
            return Put(which, PII, self.fakers["fr_FR"].ssn())
        body = self.fakers["en_IN"].aadhaar_id()[:11]
        if body[0] in "01":  # UIDAI issues no number starting with 0 or 1
            body = str(self.rng.randint(2, 9)) + body[1:]
        digits = body + verhoeff.calc_check_digit(body)
        value = digits if self.rng.random() < 0.4 else " ".join([digits[:4], digits[4:8], digits[8:]])
        return Put(which, PII, value)

    def iban(self) -> Put:
        value = self.faker(self.pick(["de_DE", "fr_FR", "es_ES", "en_GB", "pt_BR"])).iban()
        if self.rng.random() < 0.5:
            value = " ".join(value[i : i + 4] for i in range(0, len(value), 4))
        return Put("iban", PII, value)

    def home_user(self) -> Put:
        f = self.faker()
        return Put("home_dir_user", PII, f.user_name() if self.rng.random() < 0.8 else f.first_name())

    def pick_maker(self, makers: list[Callable[[], Put]]) -> Callable[[], Put]:
        return makers[self.rng.randrange(len(makers))]

    def any_pii(self) -> Put:
        makers: list[Callable[[], Put]] = [self.email, self.phone, self.ip, self.card, self.national_id, self.iban]
        return self.rng.choice(makers)()


# --------------------------------------------------------------------------- carriers

#: How a record names a field of each kind, and how a person introduces one in a message.
FIELD = {"us_ssn": "ssn", "ca_sin": "sin", "es_dni": "dni", "br_cpf": "cpf", "fr_nir": "nir", "in_aadhaar": "aadhaar",
         "credit_card": "card_number", "iban": "iban", "ipv4_public": "ip", "ipv4_private": "ip", "ipv6": "ip"}
LEADS = {
    "email": ("email me at", "my email is", "send it to", "cc", "write to"),
    "phone": ("call me at", "my number is", "phone:", "reach me on", "WhatsApp", "tel."),
    "ip": ("the server at", "requests come from", "host", "it resolves to", "connecting to"),
    "credit_card": ("my card", "card number", "it was charged to", "paid with card"),
    "us_ssn": ("my SSN is", "SSN", "social security number"),
    "ca_sin": ("my SIN is", "SIN"),
    "es_dni": ("mi DNI es", "DNI"),
    "br_cpf": ("meu CPF é", "CPF"),
    "fr_nir": ("mon numéro de sécu est", "NIR"),
    "in_aadhaar": ("my Aadhaar number is", "Aadhaar no."),
    "iban": ("IBAN", "please transfer to", "refund to account"),
    "secret": ("my key is", "token:", "use", "here's the key", "we rotated", "it still works with"),
}
SHELL_SPECIAL = set("&;|<>()$`\\\"' *?!#~[]{}^%")


def shell_word(put: Put) -> list[Piece]:
    """How a person types a value on a command line: quoted when the shell would split it."""
    return ["'", put, "'"] if set(put.value) & SHELL_SPECIAL else [put]


class Builder:
    """Assembles one document from text and planted values, keeping their spans."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.items: list[Item] = []
        self.size = 0

    def add(self, *pieces: Piece) -> Builder:
        for piece in pieces:
            if isinstance(piece, Put):
                self.items.append(
                    Item(piece.kind, piece.category, piece.value, self.size, self.size + len(piece.value), piece.parts)
                )
                text = piece.value
            else:
                text = piece
            self.parts.append(text)
            self.size += len(text)
        return self

    def line(self, *pieces: Piece) -> Builder:
        return self.add(*pieces, "\n")

    def document(self, carrier: str) -> Document:
        text = "".join(self.parts).rstrip("\n")
        for item in self.items:
            assert text[item.start : item.end] == item.value, (carrier, item.kind)
        return Document(text, carrier, tuple(self.items))


Carrier = Callable[[Values, Builder], None]


def _api_url(v: Values) -> str:
    f = v.faker()
    path = v.pick(["v1/me", "v1/chat/completions", "api/v2/orders", "repos/org/app/issues", "v1/models", "graphql"])
    return f"https://{v.pick(['api.', ''])}{f.domain_name()}/{path}"


def curl_bearer(v: Values, b: Builder) -> None:
    q = v.pick(["'", '"'])
    b.line(f"$ curl -sS -X {v.pick(['GET', 'POST'])} {_api_url(v)} \\")
    b.line(f"    -H {q}Authorization: Bearer ", v.bearer(), f"{q} \\")
    b.line(f"    -H {q}Content-Type: application/json{q} -d '{{\"limit\": {v.rng.randint(1, 50)}}}'")
    b.line('{"error": {"message": "Unauthorized", "code": 401}}')


def curl_api_key_header(v: Values, b: Builder) -> None:
    header = v.pick(["x-api-key", "X-API-Key", "api-key", "X-Auth-Token", "PRIVATE-TOKEN", "apikey"])
    b.line(f"curl {_api_url(v)} -H \"{header}: ", v.any_secret(), '" -H "anthropic-version: 2023-06-01"')


def curl_basic(v: Values, b: Builder) -> None:
    roll = v.rng.random()
    if roll < 0.4:
        user = v.pick([v.faker().user_name(), v.user()])
        pw = v.password("basic_password")
        q = "'" if set(pw.value) & SHELL_SPECIAL else ""
        b.line(f"curl -u {q}{user}:", pw, f"{q} {_api_url(v)}")
    elif roll < 0.7:
        b.line(f"curl -u {v.pick(['api', ''])}:", v.any_secret(), f" {_api_url(v)} -d amount=2000")
    else:
        _, put = v.basic_auth()
        b.line("curl -H 'Authorization: Basic ", put, f"' {_api_url(v)}")


def code_http_client(v: Values, b: Builder) -> None:
    lang = v.pick(["requests", "httpx", "fetch", "axios", "go", "aiohttp"])
    url = _api_url(v)
    token = v.bearer()
    if lang == "requests":
        b.line("import requests")
        b.line(f'resp = requests.get("{url}", headers={{"Authorization": "Bearer ', token, '"}, timeout=10)')
        b.line("resp.raise_for_status()")
    elif lang == "httpx":
        b.line("async with httpx.AsyncClient(")
        b.line(f'    base_url="{url}",')
        b.line('    headers={"Authorization": f"Bearer ', token, '", "Accept": "application/json"},')
        b.line(") as client:")
    elif lang == "fetch":
        b.line(f"const res = await fetch(\"{url}\", {{")
        b.line("  headers: { Authorization: \"Bearer ", token, '", "Content-Type": "application/json" },')
        b.line("});")
    elif lang == "axios":
        b.line("axios.defaults.headers.common['Authorization'] = 'Bearer ", token, "';")
        b.line(f"const {{ data }} = await axios.get('{url}');")
    elif lang == "go":
        b.line(f'req, _ := http.NewRequest("GET", "{url}", nil)')
        b.line('req.Header.Set("Authorization", "Bearer ', token, '")')
    else:
        b.line("session = aiohttp.ClientSession(headers={'authorization': 'Bearer ", token, "'})")


def code_sdk_client(v: Values, b: Builder) -> None:
    kind = v.pick(["openai_key", "anthropic_key", "stripe_key", "huggingface_token", "github_token", "slack_token",
                   "sendgrid_key", "google_api_key", "aws_access_key"])
    put = v.provider_token(kind)
    lines: dict[str, list[Piece]] = {
        "openai_key": ["client = OpenAI(api_key=\"", put, "\")"],
        "anthropic_key": ["client = anthropic.Anthropic(api_key='", put, "')"],
        "stripe_key": ["stripe.api_key = \"", put, "\""],
        "huggingface_token": ["login(token=\"", put, "\")  # huggingface_hub"],
        "github_token": ["g = Github(auth=Auth.Token(\"", put, "\"))"],
        "slack_token": ["client = WebClient(token=os.environ.get(\"SLACK_TOKEN\", \"", put, "\"))"],
        "sendgrid_key": ["sg = SendGridAPIClient('", put, "')"],
        "google_api_key": ["genai.configure(api_key=\"", put, "\")"],
        "aws_access_key": ["s3 = boto3.client('s3', aws_access_key_id='", put, "',"],
    }
    b.line("import os")
    b.line(*lines[kind])
    if kind == "aws_access_key":
        b.line("                  aws_secret_access_key='", v.provider_token("aws_secret_key"), "')")


def dotenv(v: Values, b: Builder) -> None:
    b.line("# .env")
    b.line(f"APP_ENV={v.pick(['production', 'staging', 'dev'])}")
    for _ in range(v.rng.randint(2, 4)):
        roll = v.rng.random()
        if roll < 0.45:
            put = v.provider_token()
            b.line(f"{v.pick(ENV_NAMES[put.kind])}=", put)
        elif roll < 0.7:
            key = v.pick(["DB_PASSWORD", "POSTGRES_PASSWORD", "MYSQL_ROOT_PASSWORD", "REDIS_PASSWORD",
                          "SMTP_PASSWORD", "ADMIN_PASS", "RABBITMQ_DEFAULT_PASS", "KEYCLOAK_ADMIN_PASSWORD"])
            q = v.pick(["", "", '"', "'"])
            b.line(f"{key}={q}", v.password(), q)
        elif roll < 0.85:
            key = v.pick(["SECRET_KEY", "JWT_SECRET", "SESSION_SECRET", "NEXTAUTH_SECRET", "APP_KEY",
                          "ENCRYPTION_KEY", "WEBHOOK_SECRET"])
            value = v.pick([
                v.x.xeger(r"[A-Za-z0-9]{32,64}"),
                base64.b64encode(v.rng.randbytes(32)).decode(),
                v.rng.randbytes(32).hex(),
                v.x.xeger(r"[a-z0-9!@#%^&*(\-_=+)]{50}"),
            ])
            b.line(f"{key}=", Put("app_secret", SECRET, value))
        else:
            b.line("DATABASE_URL=", *_url_with_password(v))
        if v.rng.random() < 0.4:
            b.line(f"PORT={v.rng.choice([3000, 8000, 8080])}")


def _url_with_password(v: Values, scheme: tuple[str, int | None, str] | None = None) -> list[Piece]:
    name, port, path = scheme or URL_SCHEMES[v.rng.randrange(len(URL_SCHEMES))]
    user = v.pick([v.user(), v.faker().user_name()])
    if name == "https":
        secret: Put = v.git_secret()
        host = v.pick(["github.com/org", "gitlab.com/group", "bitbucket.org/team", "git.corp.net/infra"])
    else:
        pw = v.password("url_password")
        secret = Put(pw.kind, pw.category, quote(pw.value, safe=""))  # userinfo is percent-encoded
        host = v.host() if port is None else f"{v.host()}:{port}"
    db = v.faker().domain_word().replace("-", "_")
    return [f"{name}://{user}:", secret, f"@{host}/{path.format(db=db)}"]


def connection_urls(v: Values, b: Builder) -> None:
    form = v.pick(["python", "yaml", "log", "shell", "chat", "toml"])
    schemes = [s for s in URL_SCHEMES if s[0] != "https"]  # clone URLs are in the tool outputs
    url = _url_with_password(v, schemes[v.rng.randrange(len(schemes))])
    if form == "python":
        b.line("engine = create_engine(\"", *url, "\", pool_pre_ping=True)")
    elif form == "yaml":
        b.line("spring:")
        b.line("  datasource:")
        b.line("    url: ", *url)
    elif form == "log":
        b.line(f"{v.faker().iso8601(end_datetime=CLOCK)} INFO connecting to ", *url)
        b.line("Traceback (most recent call last):")
        b.line('  File "/srv/app/db.py", line 12, in connect')
        b.line("ConnectionRefusedError: [Errno 111] Connection refused")
    elif form == "shell":
        b.line("$ docker run -e DATABASE_URL='", *url, "' ghcr.io/org/api:latest")
    elif form == "toml":
        b.line("[database]")
        b.line('url = "', *url, '"')
    else:
        b.line("hey, the worker can't reach ", *url, " since this morning, any idea?")


def cli_password(v: Values, b: Builder) -> None:
    pw = v.password("cli_password")
    user, host = v.user(), v.host()
    w = shell_word(pw)
    forms: list[list[Piece]] = [
        [f"mysql -h {host} -u {user} -p'", pw, "' orders < dump.sql"],
        [f"mysql -u{user} -p", *w, " -e 'SHOW DATABASES'"],
        [f"mysqldump --user={user} --password=", *w, " --single-transaction shop > shop.sql"],
        ["PGPASSWORD=", *w, f" psql -h {host} -U {user} -d analytics -c 'select 1'"],
        ["PGPASSWORD='", pw, f"' pg_dump -h {host} -U {user} app > app.sql"],
        [f"redis-cli -h {host} -a ", *w, " INFO"],
        [f"mongosh \"mongodb://{host}:27017\" --username {user} --password '", pw, "'"],
        [f"docker login -u {user} -p ", *w, " registry.gitlab.com"],
        ["echo '", pw, f"' | docker login --username {user} --password-stdin ghcr.io"],
        ["sshpass -p '", pw, f"' ssh {user}@{host}"],
        [f"./manage.py createsuperuser --username {user} --password ", *w],
        [f"az login --service-principal -u {v.faker().uuid4()} --password ", *w, " --tenant contoso.onmicrosoft.com"],
        [f"kubectl create secret generic db --from-literal=username={user} --from-literal=password=", *w],
        [f"htpasswd -b -c .htpasswd {user} ", *w],
        ["openssl pkcs12 -export -in cert.pem -inkey key.pem -out bundle.p12 -passout pass:", *w],
        ["java -jar app.jar --spring.datasource.password=", *w],
    ]
    b.line("$ ", *forms[v.rng.randrange(len(forms))])
    if v.rng.random() < 0.5:
        b.line(v.pick(["ERROR 1045 (28000): Access denied", "Login Succeeded", "psql: error: connection refused"]))


def config_files(v: Values, b: Builder) -> None:
    form = v.pick(["yaml", "toml", "json", "ini", "xml", "properties", "compose"])
    pw, token = v.password("config_password"), v.any_secret()
    user = v.user()
    if form == "yaml":
        b.line("database:")
        b.line(f"  host: {v.host()}")
        b.line(f"  user: {user}")
        b.line(f"  {v.pick(['password', 'pass', 'db_password', 'passwd'])}: ", *_maybe_quoted(v, pw))
        b.line(f"  {v.pick(['api_key', 'token', 'apiKey', 'auth_token', 'access_token'])}: ", *_maybe_quoted(v, token))
    elif form == "toml":
        b.line("[tool.poetry.http-basic.private]" if v.rng.random() < 0.3 else "[database]")
        b.line(f'username = "{user}"')
        b.line('password = "', pw, '"')
        b.line(f"{v.pick(['token', 'api_key', 'secret'])} = \"", token, '"')
    elif form == "json":
        b.line("{")
        b.line(f'  "user": "{user}",')
        b.line('  "password": "', pw, '",')
        b.line(f'  "{v.pick(["apiKey", "api_key", "token", "clientSecret"])}": "', token, '"')
        b.line("}")
    elif form == "ini":
        b.line(f"[{v.pick(['default', 'profile ci', 'pypi', 'smtp'])}]")
        b.line(f"username = {user}")
        b.line(f"{v.pick(['password', 'passwd', 'pass'])} = ", pw)
        b.line(f"{v.pick(['token', 'secret', 'api_key'])} = ", token)
    elif form == "xml":
        b.line(f"<server><id>nexus</id><username>{user}</username><password>", pw, "</password></server>")
        b.line('<add key="ApiKey" value="', token, '" />')
    elif form == "properties":
        b.line(f"spring.datasource.username={user}")
        b.line("spring.datasource.password=", pw)
        b.line(f"{v.pick(['app.api.key', 'jwt.secret', 'oauth.client-secret'])}=", token)
    else:
        b.line("services:")
        b.line("  db:")
        b.line("    image: postgres:16")
        b.line("    environment:")
        b.line("      POSTGRES_PASSWORD: ", *_maybe_quoted(v, pw))
        b.line("      - API_TOKEN=", token)


def _maybe_quoted(v: Values, put: Put) -> list[Piece]:
    q = v.pick(["", "", '"', "'"])
    return [q, put, q]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def cloud_connection_strings(v: Values, b: Builder) -> None:
    f = v.faker()
    account = re.sub(r"[^a-z0-9]", "", f.domain_word().lower())[:18] + str(v.rng.randint(1, 99))
    form = v.pick(["storage", "servicebus", "sas", "cosmos", "sql", "redis", "gcp_sa", "aws_ini"])
    if form == "storage":
        b.line("AZURE_STORAGE_CONNECTION_STRING=\"DefaultEndpointsProtocol=https;AccountName=", account,
               ";AccountKey=", v.azure_key(), ";EndpointSuffix=core.windows.net\"")
    elif form == "servicebus":
        b.line(f"Endpoint=sb://{account}.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;"
               "SharedAccessKey=", Put("azure_shared_access_key", SECRET, _b64(v.rng.randbytes(32))))
    elif form == "sas":
        sig = quote(base64.b64encode(v.rng.randbytes(32)).decode(), safe="")
        b.line(f"https://{account}.blob.core.windows.net/backups/db.bak?sv=2022-11-02&ss=b&srt=co&sp=rl"
               "&se=2025-01-01T00:00:00Z&sig=", Put("azure_sas_signature", SECRET, sig))
    elif form == "cosmos":
        b.line(f"AccountEndpoint=https://{account}.documents.azure.com:443/;AccountKey=", v.azure_key(), ";")
    elif form == "sql":
        pw = v.password("cloud_password")
        b.line(f"Server=tcp:{account}.database.windows.net,1433;Initial Catalog=app;User ID={v.user()};Password=",
               pw, ";Encrypt=True;")
    elif form == "redis":
        b.line(f"REDIS_CONNECTION={account}.redis.cache.windows.net:6380,password=",
               Put("azure_redis_key", SECRET, base64.b64encode(v.rng.randbytes(32)).decode()),
               ",ssl=True,abortConnect=False")
    elif form == "gcp_sa":
        key = v.private_key("PRIVATE KEY", escaped=True)
        b.line("{")
        b.line('  "type": "service_account",')
        b.line(f'  "project_id": "{f.domain_word()}-prod",')
        b.line(f'  "private_key_id": "{v.rng.randbytes(20).hex()}",')  # names the key, unlocks nothing
        b.line('  "private_key": "', key, '\\n",')
        b.line(f'  "client_email": "deployer@{f.domain_word()}-prod.iam.gserviceaccount.com"')
        b.line("}")
    else:
        b.line("[default]")
        b.line("aws_access_key_id = ", v.provider_token("aws_access_key"))
        b.line("aws_secret_access_key = ", v.provider_token("aws_secret_key"))
        b.line("region = eu-central-1")


def truffle_context(v: Values, b: Builder) -> None:
    """A truffleHog rule's value where its keyword stands before it on the line."""
    rule, put = v.rule_token()
    if rule.keyword is None:
        form = v.pick(["env", "code", "chat"])
        name = re.sub(r"\W+", "_", rule.name).upper()
        if form == "env":
            b.line(f"{name}=", put)
        elif form == "code":
            b.line(f"{name.lower()} = \"", put, "\"")
        else:
            b.line("this one is still in the old config: ", put, " — can we rotate it?")
        return
    keyword = v.x.xeger(rule.keyword).lower()
    if rule.name == "Google Oauth":
        b.line('{"installed":{"client_id":"', f"{v.rng.randint(10**11, 10**12)}-{v.x.xeger('[a-z0-9]{32}')}",
               '.apps.googleusercontent.com","client_secret":"', put, '","redirect_uris":["http://localhost"]}')
        return
    suffix = v.pick(["_secret", "_token", "_key", "_api_key", "", "_client_secret", "_oauth"])
    form = v.pick(["python", "json", "js", "yaml", "shell"])
    if form == "python":
        b.line(f"{keyword}{suffix} = '", put, "'")
    elif form == "json":
        b.line(f'  "{keyword}{suffix}": "', put, '",')
    elif form == "js":
        b.line(f"const {keyword}Config = {{ secret: \"", put, '" };')
    elif form == "yaml":
        b.line(f"{keyword}{suffix}: \"", put, '"')
    else:
        b.line(f"export {keyword.upper()}{suffix.upper()}=\"", put, '"')


def private_key_files(v: Values, b: Builder) -> None:
    form = v.pick(["cat", "yaml", "python", "json"])
    if form == "cat":
        b.line("$ cat ~/.ssh/id_rsa")
        b.line(v.private_key())
    elif form == "yaml":
        key = v.private_key()
        b.line("tls:")
        b.line("  key: |")
        indented = key.value.replace("\n", "\n    ")
        parts = tuple(p for p in key.parts)
        b.line("    ", Put(key.kind, key.category, indented, parts))
    elif form == "python":
        b.line('PRIVATE_KEY = """', v.private_key(), '"""')
    else:
        b.line('{"key": "', v.private_key(escaped=True), '"}')


def tool_outputs(v: Values, b: Builder) -> None:
    form = v.pick(["printenv", "kubectl", "docker_inspect", "git_remote", "netrc", "pgpass", "npmrc", "docker_cfg",
                   "git_credentials"])
    if form == "printenv":
        b.line('{"tool": "bash", "command": "env | sort", "exit_code": 0, "stdout": "HOME=/root\\nLANG=C.UTF-8\\n')
        put = v.provider_token()
        b.add(f"{v.pick(ENV_NAMES[put.kind])}=", put, "\\nPATH=/usr/local/bin:/usr/bin\\nPWD=/workspace\\n\"}")
    elif form == "kubectl":
        pw = v.password("k8s_secret")
        encoded = base64.b64encode(pw.value.encode()).decode()
        b.line("$ kubectl get secret db-credentials -o yaml")
        b.line("apiVersion: v1")
        b.line("data:")
        b.line("  password: ", Put("k8s_secret_base64", SECRET, encoded))
        b.line(f"  username: {base64.b64encode(v.user().encode()).decode()}")
        b.line("kind: Secret")
    elif form == "docker_inspect":
        b.line('            "Env": [')
        b.line('                "POSTGRES_PASSWORD=', v.password(), '",')
        b.line('                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin",')
        b.line('                "PG_VERSION=16.2"')
        b.line("            ],")
    elif form == "git_remote":
        b.line("$ git remote -v")
        url = _url_with_password(v, ("https", None, "{db}.git"))
        b.line("origin\t", *url, " (fetch)")
    elif form == "netrc":
        b.line("$ cat ~/.netrc")
        b.line(f"machine api.{v.faker().domain_name()} login {v.faker().email(safe=False)} password ", v.password())
    elif form == "pgpass":
        b.line("$ cat ~/.pgpass")
        b.line(f"{v.host()}:5432:*:{v.user()}:", v.password())
    elif form == "npmrc":
        b.line("//registry.npmjs.org/:_authToken=", v.provider_token("npm_token"))
    elif form == "docker_cfg":
        _, put = v.basic_auth()
        b.line('{"auths": {"ghcr.io": {"auth": "', put, '"}}}')
    else:
        b.line("$ cat ~/.git-credentials")
        b.line("https://", v.faker().user_name(), ":", v.provider_token("github_token"), "@github.com")


def stack_traces(v: Values, b: Builder) -> None:
    f = v.faker()
    user = v.home_user()
    b.line("Traceback (most recent call last):")
    b.line('  File "/home/', user, f'/src/{f.domain_word()}/client.py", line {v.rng.randint(10, 400)}, in fetch')
    b.line("    resp.raise_for_status()")
    form = v.pick(["url_key", "locals", "auth", "ip"])
    if form == "url_key":
        b.line(f"requests.exceptions.HTTPError: 403 Client Error: Forbidden for url: https://{f.domain_name()}"
               "/v1/search?q=shoes&api_key=", v.any_secret(), "&user=", v.email())
    elif form == "locals":
        b.line("    api_key    = '", v.any_secret(), "'")
        b.line("    headers    = {'Authorization': 'Bearer ", v.bearer(), "'}")
    elif form == "auth":
        b.line(f"sqlalchemy.exc.OperationalError: (psycopg2.OperationalError) connection to server at \"{v.host()}\""
               " (", v.ip(), "), port 5432 failed: FATAL:  password authentication failed for user \"app\"")
    else:
        b.line("ConnectionError: HTTPSConnectionPool(host='", v.ip(), "', port=443): Max retries exceeded")


def chat_messages(v: Values, b: Builder) -> None:
    f = v.faker()
    pieces: list[Piece] = [f.sentence(nb_words=v.rng.randint(5, 10)), " "]
    for _ in range(v.rng.randint(1, 3)):
        put = v.any_pii() if v.rng.random() < 0.6 else v.any_secret(shaped=True)
        group = "ip" if put.kind.startswith("ip") else put.kind if put.kind in LEADS else "secret"
        pieces += [f"{v.pick(LEADS[group])} ", put, v.pick([", ", ". ", " and ", " — "])]
    pieces.append(f.sentence(nb_words=v.rng.randint(4, 9)))
    b.line(*pieces)


def pii_records(v: Values, b: Builder) -> None:
    locale = v.pick(LOCALES)
    f = v.fakers[locale]
    form = v.pick(["json", "csv", "sql", "fixture", "log"])
    email, phone = v.email(locale), v.phone(locale)
    third = v.pick_maker([v.card, v.national_id, v.iban, v.ip])()
    extra = FIELD[third.kind]
    if form == "json":
        b.line("{")
        b.line(f'  "id": {v.rng.randint(1, 99999)},')
        b.line(f'  "name": "{f.name()}",')
        b.line('  "email": "', email, '",')
        b.line('  "phone": "', phone, '",')
        b.line(f'  "{extra}": "', third, '"')
        b.line("}")
    elif form == "csv":
        b.line(f"id,name,email,phone,{extra}")
        b.line(f"{v.rng.randint(1, 9999)},{f.name()},", email, ",", phone, ",", third)
    elif form == "sql":
        b.line(f"INSERT INTO customers (name, email, phone, {extra}) VALUES ('{f.name()}', '", email, "', '",
               phone, "', '", third, "');")
    elif form == "fixture":
        b.line("def test_signup(client):")
        b.line('    resp = client.post("/signup", json={"email": "', email, '", "phone": "', phone, '",')
        b.line(f'                                         "{extra}": "', third, '"})')
    else:
        stamp = f.iso8601(end_datetime=CLOCK)
        b.line(f"{stamp} WARN signup rejected email=", email, " phone=\"", phone, f"\" {extra}=", third)


def access_logs(v: Values, b: Builder) -> None:
    f = v.faker()
    for _ in range(v.rng.randint(1, 3)):
        when = f.date_time(end_datetime=CLOCK).strftime('%d/%b/%Y:%H:%M:%S')
        b.line(v.ip(), f" - - [{when} +0000] \"GET /{f.uri_path()} HTTP/1.1\" "
               f"{v.pick(['200', '304', '404', '500'])} {v.rng.randint(100, 90000)} \"-\" \"{f.user_agent()}\"")


def git_and_mail(v: Values, b: Builder) -> None:
    f = v.faker()
    form = v.pick(["log", "mail", "ssh", "home"])
    if form == "log":
        b.line(f"commit {hashlib.sha1(v.rng.randbytes(8)).hexdigest()}")
        b.line(f"Author: {f.name()} <", v.email(), ">")
        b.line(f"Date:   {f.date_time(end_datetime=CLOCK).strftime('%a %b %d %H:%M:%S %Y')} +0200")
        b.line("")
        b.line(f"    {f.sentence(nb_words=6)}")
    elif form == "mail":
        b.line("From: ", v.email())
        b.line("To: ", v.email())
        b.line(f"Subject: {f.sentence(nb_words=5)}")
        b.line("Call me on ", v.phone(), " if the deploy fails again.")
    elif form == "ssh":
        b.line("$ ssh -i ~/.ssh/deploy ubuntu@", v.ip())
        b.line("Warning: Permanently added '", v.ip(), "' (ED25519) to the list of known hosts.")
    else:
        user = v.home_user()
        prefix = v.pick(["/home/", "/Users/", "C:\\Users\\"])
        sep = "\\" if prefix.startswith("C:") else "/"
        b.line(f"cd {prefix}", user, f"{sep}projects{sep}{f.domain_word()} && pytest -q")


CARRIERS: dict[str, Carrier] = {
    "curl bearer header": curl_bearer,
    "curl api-key header": curl_api_key_header,
    "curl basic auth": curl_basic,
    "code http client": code_http_client,
    "code sdk client": code_sdk_client,
    ".env file": dotenv,
    "connection url": connection_urls,
    "cli password flag": cli_password,
    "config file": config_files,
    "cloud connection string": cloud_connection_strings,
    "truffleHog rule": truffle_context,
    "private key": private_key_files,
    "tool output": tool_outputs,
    "stack trace": stack_traces,
    "chat message": chat_messages,
    "pii record": pii_records,
    "access log": access_logs,
    "git and mail": git_and_mail,
}


def source() -> str:
    """What the corpus is made from, with versions: printed by the benchmark."""
    return (
        f"Faker {version('Faker')} ({', '.join(LOCALES)}, en_CA), truffleHogRegexes {version('truffleHogRegexes')}"
        f" rules + {len(PROVIDER_FORMATS)} provider token formats via rstr {version('rstr')},"
        f" {len(CARRIERS)} carriers"
    )


def generate(seed: int = 0, documents: int = 1800) -> Corpus:
    """``documents`` documents, the carriers taken in turn; the same seed gives the same corpus."""
    rng = random.Random(seed)
    values = Values(rng)
    names = list(CARRIERS)
    docs = []
    for i in range(documents):
        name = names[i % len(names)]
        builder = Builder()
        CARRIERS[name](values, builder)
        docs.append(builder.document(name))
    return Corpus(seed, tuple(docs), source())


def sample_text(corpus: Corpus, size: int, rng: random.Random) -> str:
    """About ``size`` characters of the corpus' documents, for throughput runs."""
    out: list[str] = []
    n = 0
    while n < size:
        doc = corpus.documents[rng.randrange(len(corpus.documents))]
        out.append(doc.text)
        n += len(doc.text) + 1
    return "\n".join(out)

