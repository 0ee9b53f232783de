"""A seeded generator of realistic text with planted secrets and personal data, labelled.

Nothing secret-shaped is written in this file: every key, token, number and address is
assembled at run time from random parts (and key headers from words), so secret scanners
have nothing to flag in the repository while the anonymizer gets realistic material.

``generate(seed)`` returns a ``Corpus``: ``samples`` (snippets of code, config, logs and chat,
each with the planted items and their spans) and ``clean_lines`` (ordinary code, config and
log lines with nothing to find, to measure how much clean text the scrubber changes).
``leaked(value, text)`` is the recall test: an item counts as found only when no piece of
its value of ten characters (or the whole value, if shorter) is left in the output.
"""

from __future__ import annotations

import base64
import json
import random
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import phonenumbers
from phonenumbers import PhoneNumberFormat, PhoneNumberType
from stdnum import iban as std_iban
from stdnum import luhn, verhoeff
from stdnum.ca import sin as ca_sin
from stdnum.es import dni as es_dni
from stdnum.us import ssn as us_ssn

from flywheel_loop.plugins.privacy.scrubber import DEFAULT_PHONE_REGIONS

SECRET, PII = "secret", "pii"
LEAK_WINDOW = 10

__all__ = ["PII", "SECRET", "Corpus", "Evaluation", "Planted", "Sample", "evaluate", "generate", "leaked"]


@dataclass(frozen=True)
class Planted:
    """One planted item: its label, the raw value and where it is in its sample."""

    kind: str
    category: str
    value: str
    start: int
    end: int
    placeholder: str
    parts: tuple[str, ...] = ()

    def must_vanish(self) -> tuple[str, ...]:
        """What must be gone from the output (a private key: each line of its body)."""
        return self.parts or (self.value,)


@dataclass(frozen=True)
class Sample:
    text: str
    setting: str
    items: tuple[Planted, ...]


@dataclass(frozen=True)
class Corpus:
    seed: int
    samples: tuple[Sample, ...]
    clean_lines: tuple[str, ...]

    @property
    def items(self) -> list[Planted]:
        return [i for s in self.samples for i in s.items]


@dataclass
class Evaluation:
    """What a scrubber did to a corpus: items found per kind, clean lines it changed."""

    found: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    named: int = 0  # found items whose placeholder names the labelled kind
    category: dict[str, str] = field(default_factory=dict)
    clean_changed: list[str] = field(default_factory=list)
    clean_total: int = 0

    def recall(self, category: str) -> float:
        kinds = [k for k, c in self.category.items() if c == category]
        return sum(self.found[k] for k in kinds) / max(1, sum(self.total[k] for k in kinds))

    def items(self, category: str | None = None) -> int:
        return sum(n for k, n in self.total.items() if category in (None, self.category[k]))

    @property
    def clean_changed_share(self) -> float:
        return len(self.clean_changed) / max(1, self.clean_total)


def evaluate(corpus: Corpus, scrub: Callable[[str], tuple[str, Counter[str]]]) -> Evaluation:
    """Scrub every sample and clean line; an item is found when none of it is left."""
    result = Evaluation(clean_total=len(corpus.clean_lines))
    for sample in corpus.samples:
        out, counts = scrub(sample.text)
        for item in sample.items:
            result.total[item.kind] += 1
            result.category[item.kind] = item.category
            if not any(leaked(part, out) for part in item.must_vanish()):
                result.found[item.kind] += 1
                result.named += counts[item.placeholder] > 0
    for line in corpus.clean_lines:
        out, _ = scrub(line)
        if out != line:
            result.clean_changed.append(out)
    return result


def leaked(value: str, text: str, window: int = LEAK_WINDOW) -> bool:
    """Whether any ``window``-long piece of ``value`` (or all of a shorter one) is in ``text``."""
    w = min(len(value), window)
    return any(value[i : i + w] in text for i in range(len(value) - w + 1))


# --------------------------------------------------------------------------- word lists


def _words(text: str) -> list[str]:
    return text.split()


FIRST = _words(
    "maria wei priya john fatima olga kenji amara lucas sofia ahmed emma noah chloe liam aisha "
    "diego yuki lars anna mohammed hannah ravi grace ivan zara mateo elif sven nia"
)
LAST = _words(
    "garcia zhang patel smith alsayed ivanova tanaka okafor silva rossi hassan johnson williams "
    "dubois murphy khan hernandez sato nielsen kowalska ali schmidt kumar lee petrov ahmed "
    "lopez yilmaz berg thompson"
)
WORDS = _words(
    "orders invoice user session cart payment report metrics cache queue worker config profile "
    "upload export search index billing account webhook schedule inventory ticket comment "
    "message build"
)
VERBS = _words(
    "load parse fetch build render validate sync update create delete retry flush compute "
    "resolve format merge"
)
PACKAGES = _words(
    "requests numpy pandas fastapi pydantic sqlalchemy pytest django flask httpx celery redis "
    "boto3 rich typer torch"
)
NPM = _words("react express lodash axios typescript vite eslint jest zod next prettier webpack")
DOMAIN_WORDS = _words(
    "northwind acme globex initech umbrella stark wayne hooli vandelay wonka tyrell soylent cyberdyne oscorp"
)
TLDS = _words("com io dev org co.uk de fr in com.br net ai")


def _pick(rng: random.Random, seq: list[str]) -> str:
    return seq[rng.randrange(len(seq))]


def _chars(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(alphabet[rng.randrange(len(alphabet))] for _ in range(n))


ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits
LOWER_DIGITS = string.ascii_lowercase + string.digits
HEX = "0123456789abcdef"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 8 8"><circle r="4"/></svg>'


def _version(rng: random.Random) -> str:
    return f"{rng.randint(0, 9)}.{rng.randint(0, 40)}.{rng.randint(0, 20)}"


def _domain(rng: random.Random) -> str:
    suffix = _pick(rng, ["labs", "corp", "systems", "cloud", "hq"])
    return f"{_pick(rng, DOMAIN_WORDS)}-{suffix}.{_pick(rng, TLDS)}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --------------------------------------------------------------------------- secret values


def aws_access_key(rng: random.Random) -> str:
    return "AK" + "IA" + _chars(rng, string.ascii_uppercase + "234567", 16)


def aws_secret_key(rng: random.Random) -> str:
    return _chars(rng, ALNUM + "/+", 40)


def github_token(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return "github" + "_pat_" + _chars(rng, ALNUM, 22) + "_" + _chars(rng, ALNUM, 59)
    return _pick(rng, ["ghp", "gho", "ghs", "ghu"]) + "_" + _chars(rng, ALNUM, 36)


def slack_webhook(rng: random.Random) -> str:
    return (
        "https://hooks."
        + "slack.com/services/T"
        + _chars(rng, UPPER_DIGITS, 8)
        + "/B"
        + _chars(rng, UPPER_DIGITS, 10)
        + "/"
        + _chars(rng, ALNUM, 24)
    )


def slack_token(rng: random.Random) -> str:
    return (
        "xox"
        + _pick(rng, ["b", "p"])
        + "-"
        + _chars(rng, string.digits, 12)
        + "-"
        + _chars(rng, string.digits, 13)
        + "-"
        + _chars(rng, ALNUM, 24)
    )


def stripe_key(rng: random.Random) -> str:
    return _pick(rng, ["sk", "rk"]) + "_live" + "_" + _chars(rng, ALNUM, rng.choice([24, 34, 99]))


def openai_key(rng: random.Random) -> str:
    if rng.random() < 0.4:
        marker = base64.b64encode(b"OpenAI").decode()[:8]  # the legacy keys' fixed middle part
        return "sk-" + _chars(rng, ALNUM, 20) + marker + _chars(rng, ALNUM, 20)
    return "sk-" + "proj-" + _chars(rng, ALNUM + "_-", rng.choice([48, 100, 156]))


def google_api_key(rng: random.Random) -> str:
    return "AI" + "za" + _chars(rng, ALNUM + "_-", 35)


def jwt(rng: random.Random) -> str:
    header = {"alg": rng.choice(["HS256", "RS256", "ES256"]), "typ": "JWT"}
    now = rng.randint(1_600_000_000, 1_800_000_000)
    claims = {
        "sub": _chars(rng, LOWER_DIGITS, 12),
        "name": _pick(rng, FIRST).title(),
        "iat": now,
        "exp": now + 3600,
        "scope": _pick(rng, ["read", "write", "admin"]),
    }
    parts = [
        json.dumps(header, separators=(",", ":")).encode(),
        json.dumps(claims, separators=(",", ":")).encode(),
    ]
    return ".".join(_b64url(p) for p in parts) + "." + _b64url(rng.randbytes(32))


def url_password(rng: random.Random) -> str:
    middle = _chars(rng, ALNUM + "._~-", rng.randint(9, 19))
    if rng.random() < 0.3:  # reserved characters arrive percent-encoded
        middle += rng.choice(["%40", "%21", "%23", "%2F"]) + _chars(rng, ALNUM, 3)
    return _chars(rng, ALNUM, 1) + middle + _chars(rng, string.digits, 1)


def config_password(rng: random.Random) -> str:
    body = _chars(rng, ALNUM + "!@%^&*-_+.~", rng.randint(10, 20))
    return _chars(rng, ALNUM, 1) + body + _chars(rng, string.digits, 1)


def hex_secret(rng: random.Random) -> str:
    return _chars(rng, HEX, rng.choice([32, 40, 64]))


def base64_secret(rng: random.Random) -> str:
    raw = rng.randbytes(rng.choice([30, 33, 45]))
    return (base64.urlsafe_b64encode if rng.random() < 0.3 else base64.b64encode)(raw).decode()


def private_key_block(rng: random.Random, escaped: bool = False) -> tuple[str, tuple[str, ...]]:
    algo = rng.choice(["RSA ", "EC ", "OPENSSH ", ""])
    label = f"{algo}PRIVATE" + " KEY"
    raw = rng.randbytes(48 * rng.randint(4, 9) + rng.randint(1, 40))
    body = base64.b64encode(raw).decode()
    lines = tuple(body[i : i + 64] for i in range(0, len(body), 64))
    sep = "\\n" if escaped else "\n"
    block = sep.join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"])
    return block, lines


# --------------------------------------------------------------------------- PII values


def person(rng: random.Random) -> tuple[str, str]:
    return _pick(rng, FIRST), _pick(rng, LAST)


def email(rng: random.Random) -> str:
    first, last = person(rng)
    local = rng.choice(
        [
            f"{first}.{last}",
            f"{first[0]}{last}",
            f"{first}_{last}",
            f"{first}+ci",
            f"{first}.{last}{rng.randint(1, 99)}",
            f"{last}.{first}",
            f"{first.title()}.{last.title()}",
        ]
    )
    domain = _domain(rng)
    if rng.random() < 0.2:
        domain = rng.choice(["mail.", "eu.", "corp."]) + domain
    return f"{local}@{domain}"


INTERNATIONAL_ONLY = ("JP", "IT", "NL", "MX", "SE", "PL", "ZA", "SG", "KR", "NG", "CH", "AR")


def phone(rng: random.Random) -> str:
    """A valid number, in one of the ways people write it."""
    national = rng.random() < 0.6
    region = _pick(
        rng, list(DEFAULT_PHONE_REGIONS if national else DEFAULT_PHONE_REGIONS + INTERNATIONAL_ONLY)
    )
    number = _valid_number(rng, region)
    if region == "US" and rng.random() < 0.5:
        d = phonenumbers.national_significant_number(number)
        return rng.choice(
            [
                f"{d[:3]}.{d[3:6]}.{d[6:]}",
                f"{d[:3]}-{d[3:6]}-{d[6:]}",
                f"1-{d[:3]}-{d[3:6]}-{d[6:]}",
                f"+1 ({d[:3]}) {d[3:6]}-{d[6:]}",
                f"({d[:3]}) {d[3:6]}-{d[6:]}",
            ]
        )
    if national and region in ("GB", "DE") and rng.random() < 0.3:
        # How Europeans write for abroad: "+44 (0)20 7946 0958", "0044 20 7946 0958".
        intl = phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)
        cc, rest = intl.split(" ", 1)
        return rng.choice([f"{cc} (0){rest}", f"00{cc[1:]} {rest}"])
    formats = [PhoneNumberFormat.E164, PhoneNumberFormat.INTERNATIONAL, PhoneNumberFormat.RFC3966]
    if national:
        formats += [PhoneNumberFormat.NATIONAL] * 3
    return phonenumbers.format_number(number, rng.choice(formats))


def _valid_number(rng: random.Random, region: str) -> phonenumbers.PhoneNumber:
    kind = rng.choice([PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE])
    example = phonenumbers.example_number_for_type(region, kind) or phonenumbers.example_number(region)
    assert example is not None, region
    nsn = phonenumbers.national_significant_number(example)
    for _ in range(500):
        keep = rng.randint(1, max(1, len(nsn) // 3))
        candidate = nsn[:keep] + _chars(rng, string.digits, len(nsn) - keep)
        number = phonenumbers.parse(f"+{example.country_code}{candidate}")
        if phonenumbers.is_valid_number(number) and phonenumbers.region_code_for_number(number) == region:
            return number
    return example


def ip_address(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.3:
        groups = [rng.randint(0x2001, 0x2C0F)] + [rng.randint(0, 0xFFFF) for _ in range(7)]
        if rng.random() < 0.5:
            groups[3:6] = [0, 0, 0]  # compressible, as addresses usually are
        import ipaddress

        addr = ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups))
        return addr.compressed if rng.random() < 0.8 else addr.exploded
    if roll < 0.5:
        return rng.choice(
            [
                f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
            ]
        )
    first = rng.choice([a for a in range(1, 224) if a not in (10, 127, 169, 172, 192)])
    return f"{first}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


def card_number(rng: random.Random) -> str:
    prefix, length = rng.choice(
        [
            ("4", 16),
            ("4", 16),
            ("51", 16),
            ("55", 16),
            ("2221", 16),
            ("34", 15),
            ("37", 15),
            ("6011", 16),
            ("65", 16),
            ("3530", 16),
            ("4", 19),
        ]
    )
    body = prefix + _chars(rng, string.digits, length - len(prefix) - 1)
    digits = body + luhn.calc_check_digit(body)
    if length == 15:
        groups = [digits[:4], digits[4:10], digits[10:]]
    else:
        groups = [digits[i : i + 4] for i in range(0, len(digits), 4)]
    return rng.choice([" ", "-", ""]).join(groups)


def ssn(rng: random.Random) -> str:
    while True:
        area = rng.choice([a for a in range(1, 900) if a != 666])
        value = f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
        if us_ssn.is_valid(value):
            return value if rng.random() < 0.8 else value.replace("-", " ")


def national_id(rng: random.Random) -> str:
    kind = rng.choice(["sin", "aadhaar", "dni"])
    if kind == "sin":
        while True:
            body = str(rng.randint(1, 7)) + _chars(rng, string.digits, 7)
            value = body + luhn.calc_check_digit(body)
            if ca_sin.is_valid(value):
                sep = rng.choice(["-", " "])
                return sep.join([value[:3], value[3:6], value[6:]])
    if kind == "aadhaar":
        body = str(rng.randint(2, 9)) + _chars(rng, string.digits, 10)
        value = body + verhoeff.calc_check_digit(body)
        return " ".join([value[:4], value[4:8], value[8:]])
    number = _chars(rng, string.digits, 8)
    return number + es_dni.calc_check_digit(number)


def iban(rng: random.Random) -> str:
    while True:
        makers: list[tuple[str, Callable[[], str]]] = [
            ("DE", lambda: _chars(rng, string.digits, 18)),
            ("GB", lambda: _chars(rng, string.ascii_uppercase, 4) + _chars(rng, string.digits, 14)),
            ("NL", lambda: _chars(rng, string.ascii_uppercase, 4) + _chars(rng, string.digits, 10)),
            ("FR", lambda: _chars(rng, string.digits, 23)),
        ]
        country, bban = rng.choice(makers)
        body = bban()
        number = country + std_iban.calc_check_digits(country + "00" + body) + body
        if std_iban.is_valid(number):
            return (
                number
                if rng.random() < 0.4
                else " ".join(number[i : i + 4] for i in range(0, len(number), 4))
            )


def username(rng: random.Random, spaces: bool = False) -> str:
    first, last = person(rng)
    if spaces:
        return f"{first.title()} {last.title()}"
    return rng.choice(
        [
            f"{first[0]}{last}",
            f"{first}.{last}",
            first + last,
            f"{first}{rng.randint(1, 99)}",
            f"{first}_{last}",
            f"{first}{last[0]}",
        ]
    )


# --------------------------------------------------------------------------- carriers

# kind -> (category, placeholder, value factory, [(setting, template with {v})])
Carrier = tuple[str, str]


@dataclass
class KindSpec:
    category: str
    placeholder: str
    value: Callable[[random.Random], str]
    carriers: list[Carrier] = field(default_factory=list)


KINDS: dict[str, KindSpec] = {
    "AWS_ACCESS_KEY": KindSpec(
        SECRET,
        "AWS_ACCESS_KEY",
        aws_access_key,
        [
            ("config", "aws_access_key_id = {v}"),
            ("config", "AWS_ACCESS_KEY_ID={v}"),
            ("code", 's3 = boto3.client("s3", aws_access_key_id="{v}", region_name="eu-west-1")'),
            (
                "log",
                "botocore.exceptions.ClientError: InvalidAccessKeyId: The AWS Access Key Id {v} does not"
                " exist",
            ),
            ("chat", "I exported {v} as the key id but the upload still fails, any idea?"),
            ("config", "  access_key: {v}"),
        ],
    ),
    "AWS_SECRET_KEY": KindSpec(
        SECRET,
        "AWS_SECRET_KEY",
        aws_secret_key,
        [
            ("config", "aws_secret_access_key = {v}"),
            ("config", "AWS_SECRET_ACCESS_KEY={v}"),
            ("code", 'session = boto3.Session(aws_secret_access_key="{v}")'),
            ("config", '  aws_secret_key: "{v}"'),
            ("code", '    "aws_secret_access_key": "{v}",'),
        ],
    ),
    "GITHUB_TOKEN": KindSpec(
        SECRET,
        "GITHUB_TOKEN",
        github_token,
        [
            ("config", "GITHUB_TOKEN={v}"),
            ("code", 'gh = Github("{v}")'),
            ("log", "remote: Invalid username or token {v} for https://github.com/org/repo.git"),
            ("chat", "here is my token {v} — why does the push get a 403?"),
            ("code", "git remote set-url origin https://x-access-token:{v}@github.com/org/service.git"),
            ("config", '  token: "{v}"'),
        ],
    ),
    "SLACK_TOKEN": KindSpec(
        SECRET,
        "SLACK_TOKEN",
        slack_token,
        [
            ("config", "SLACK_BOT_TOKEN={v}"),
            ("code", 'client = WebClient(token="{v}")'),
            ("log", "slack notify failed for {v}: channel_not_found"),
            ("chat", "the bot uses {v} and cannot post to #alerts"),
        ],
    ),
    "SLACK_WEBHOOK": KindSpec(
        SECRET,
        "SLACK_WEBHOOK",
        slack_webhook,
        [
            ("code", "requests.post('{v}', json={{'text': 'deploy finished'}})"),
            ("config", "SLACK_WEBHOOK_URL={v}"),
            ("chat", "alerts go to {v} but nothing shows up in the channel"),
        ],
    ),
    "STRIPE_KEY": KindSpec(
        SECRET,
        "STRIPE_KEY",
        stripe_key,
        [
            ("code", 'stripe.api_key = "{v}"'),
            ("config", "STRIPE_SECRET_KEY={v}"),
            ("log", "stripe.error.AuthenticationError: Invalid API Key provided: {v}"),
            ("chat", "charges fail with key {v} in production"),
        ],
    ),
    "OPENAI_KEY": KindSpec(
        SECRET,
        "OPENAI_KEY",
        openai_key,
        [
            ("config", "OPENAI_API_KEY={v}"),
            ("code", 'client = OpenAI(api_key="{v}")'),
            ("chat", "I set {v} but get error 401 from the completions endpoint"),
            ("log", "openai.AuthenticationError: Incorrect API key provided: {v}."),
        ],
    ),
    "GOOGLE_API_KEY": KindSpec(
        SECRET,
        "GOOGLE_API_KEY",
        google_api_key,
        [
            ("code", "const mapsUrl = `https://maps.googleapis.com/maps/api/js?key={v}&libraries=places`;"),
            ("config", "GOOGLE_API_KEY={v}"),
            ("code", '  apiKey: "{v}",'),
            ("log", "GET /geocode/json?address=Berlin&key={v} 403 Forbidden"),
            ("chat", "firebase init worked with {v} but auth does not"),
        ],
    ),
    "JWT": KindSpec(
        SECRET,
        "JWT",
        jwt,
        [
            ("log", "Authorization: Bearer {v}"),
            ("code", 'headers = {{"Authorization": "Bearer {v}"}}'),
            ("chat", "decoding {v} gives an expired signature error"),
            ("log", '127.0.0.1 - - "GET /api/me?access_token={v} HTTP/1.1" 401 23'),
            ("code", "curl -H 'Authorization: Bearer {v}' https://api.internal/v1/me"),
        ],
    ),
    "PASSWORD_IN_URL": KindSpec(
        SECRET,
        "PASSWORD",
        url_password,
        [
            ("config", "DATABASE_URL=postgres://app:{v}@db.internal:5432/orders"),
            ("code", 'engine = create_engine("mysql+pymysql://admin:{v}@mysql.prod:3306/shop")'),
            ("config", "  broker_url: amqp://worker:{v}@rabbitmq:5672/"),
            ("log", "connecting to mongodb://svc_reader:{v}@mongo-0.mongo:27017/analytics?authSource=admin"),
            ("chat", "clone with https://deploy:{v}@git.corp.example/team/infra.git fails"),
            ("code", 'REDIS_URL = "redis://default:{v}@cache.internal:6379/0"'),
        ],
    ),
    "PASSWORD_IN_CONFIG": KindSpec(
        SECRET,
        "PASSWORD",
        config_password,
        [
            ("config", "DB_PASSWORD={v}"),
            ("config", "  password: {v}"),
            ("config", "password = {v}"),
            ("config", 'password = "{v}"'),
            ("config", "spring.datasource.password={v}"),
            ("config", "      - MYSQL_ROOT_PASSWORD={v}"),
            ("code", '    "password": "{v}",'),
            ("code", 'conn = psycopg2.connect(host="db", user="app", password="{v}")'),
            ("code", "const dbPassword = '{v}';"),
            ("config", "POSTGRES_PASSWORD: {v}"),
            ("config", "machine api.heroku.com login deploy password {v}"),
            ("code", "echo done && docker login ghcr.io --username ci --password {v}"),
            ("log", "+ mysql --host=db --user=root --password={v} -e 'SHOW DATABASES'"),
            ("config", "  db_pass: '{v}'"),
        ],
    ),
    "PRIVATE_KEY": KindSpec(
        SECRET,
        "PRIVATE_KEY",
        lambda rng: "",
        [
            ("config", "{v}"),
            ("code", '  "private_key": "{e}",'),
            ("chat", "This key stopped working after the rotation:\n{v}\nwhat am I doing wrong?"),
        ],
    ),
    "HIGH_ENTROPY_HEX": KindSpec(
        SECRET,
        "HIGH_ENTROPY_SECRET",
        hex_secret,
        [
            ("code", 'WEBHOOK_SIGNING_KEY = "{v}"'),
            ("code", "const apiToken = '{v}';"),
            ("code", 'headers = {{"X-Api-Token": "{v}"}}'),
            ("config", '  client_token: "{v}"'),
            ("code", 'app.config["ENCRYPTION_KEY"] = "{v}"'),
            ("code", 'signer = Signer("{v}")'),
        ],
    ),
    "HIGH_ENTROPY_BASE64": KindSpec(
        SECRET,
        "HIGH_ENTROPY_SECRET",
        base64_secret,
        [
            ("code", 'FERNET_KEY = "{v}"'),
            ("log", "Authorization: Bearer {v}"),
            ("chat", "the service token is {v} and it expires tomorrow"),
            ("config", '  encryption_key: "{v}"'),
            ("code", 'cipher = AESGCM(base64.b64decode("{v}"))'),
            ("log", "auth failed for credential={v} (expired)"),
        ],
    ),
    "EMAIL": KindSpec(
        PII,
        "EMAIL",
        email,
        [
            ("log", "Author: Pat Doe <{v}>"),
            ("code", 'send_mail(subject="Report", to=["{v}"])'),
            ("chat", "please cc {v} on the fix"),
            ("log", "2024-05-14 10:02:11 INFO user {v} logged in from web"),
            ("code", '  "author": "{v}",'),
            ("code", "# maintainer: {v}"),
            ("config", "git config user.email {v}"),
        ],
    ),
    "PHONE": KindSpec(
        PII,
        "PHONE",
        phone,
        [
            ("chat", "call me on {v} if the deploy breaks"),
            ("code", 'customer = Customer(name="Jo", phone="{v}")'),
            ("log", "sms gateway: delivered OTP to {v} in 1.2s"),
            ("config", "  support_phone: {v}"),
            ("code", "    # on-call: {v}"),
            ("chat", "the customer's number is {v}; their profile page crashes"),
        ],
    ),
    "IP_ADDRESS": KindSpec(
        PII,
        "IP_ADDRESS",
        ip_address,
        [
            ("log", '{v} - - [14/May/2024:10:02:11 +0000] "GET /api/orders HTTP/1.1" 200 512'),
            ("log", "sshd[2231]: Accepted publickey for deploy from {v} port 52311 ssh2"),
            ("config", "  host: {v}"),
            ("code", 'ALLOWED_HOSTS = ["{v}", "localhost"]'),
            ("chat", "the VPN gives me {v} and I cannot reach the staging db"),
            ("log", "X-Forwarded-For: {v}"),
            ("log", "upstream timed out while connecting to upstream, client: {v}, server: api"),
            ("code", "    sock.connect(('{v}', 5432))"),
        ],
    ),
    "CREDIT_CARD": KindSpec(
        PII,
        "CREDIT_CARD",
        card_number,
        [
            ("log", "payment declined card={v} reason=insufficient_funds"),
            ("code", '    "card_number": "{v}",'),
            ("chat", "my card {v} was charged twice"),
            ("code", 'charge(card="{v}", amount=1999, currency="eur")'),
            ("log", "stripe webhook: payment_method.card={v} exp=12/27"),
        ],
    ),
    "SSN": KindSpec(
        PII,
        "SSN",
        ssn,
        [
            ("code", '    "ssn": "{v}",'),
            ("log", "validation failed for applicant ssn={v}: duplicate"),
            ("chat", "the form rejects SSN {v} although it is valid"),
            ("code", 'employee = Employee(name="Sam", tax_id="{v}")'),
        ],
    ),
    "NATIONAL_ID": KindSpec(
        PII,
        "NATIONAL_ID",
        national_id,
        [
            ("code", '    "national_id": "{v}",'),
            ("log", "kyc: document number {v} does not match the selfie"),
            ("chat", "the id {v} is rejected by the checksum check"),
        ],
    ),
    "IBAN": KindSpec(
        PII,
        "IBAN",
        iban,
        [
            ("code", '    "iban": "{v}",'),
            ("log", "sepa transfer to {v} queued (amount=120.00 EUR)"),
            ("chat", "refund to {v} please, the last one bounced"),
        ],
    ),
    "USERNAME": KindSpec(
        PII,
        "USERNAME",
        username,
        [
            ("log", '  File "/home/{v}/projects/api/app/main.py", line 42, in create_order'),
            ("log", "WARNING: The script flask is installed in '/home/{v}/.local/bin' which is not on PATH."),
            ("code", "cd /Users/{v}/code/webapp && npm test"),
            ("log", "error: could not open /Users/{v}/Library/Caches/pip/http/a/b/c: permission denied"),
            ("log", r"C:\Users\{w}\AppData\Local\Programs\Python\Python311\python.exe -m pytest"),
            ("code", r'  "cwd": "C:\\Users\\{w}\\source\\repos\\Billing",'),
            ("config", "export PATH=/home/{v}/.cargo/bin:$PATH"),
        ],
    ),
}


# --------------------------------------------------------------------------- clean text


def _uuid(rng: random.Random) -> str:
    h = _chars(rng, HEX, 32)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"


def clean_line(rng: random.Random, family: str) -> str:
    """One line of ordinary code, config or log text with nothing in it to hide."""
    w, w2, v, p = _pick(rng, WORDS), _pick(rng, WORDS), _pick(rng, VERBS), _pick(rng, PACKAGES)
    n, port, ver = rng.randint(0, 5000), rng.choice([80, 443, 5432, 6379, 8000, 8080, 9090]), _version(rng)
    sha = _chars(rng, HEX, 40)
    npm = _pick(rng, NPM)
    day = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    clock = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
    templates: dict[str, list[str]] = {
        "python": [
            f"def {v}_{w}(self, {w2}_id: int, *, limit: int = {n}) -> list[{w2.title()}]:",
            f"    return [x for x in self.{w}s if x.{w2}_id == {w2}_id][:limit]",
            f"from {p}.{w} import {w2.title()}{v.title()}er",
            f"import {p}",
            f'    logger.info("{v} %d {w}s in %.2fs", len({w}s), elapsed)',
            f'@pytest.mark.parametrize("size, expected", [({n}, {n * 2}), (0, 0)])',
            f"MAX_{w.upper()}_RETRIES = {rng.randint(1, 9)}",
            f"    timeout: float = {rng.randint(1, 60)}.0",
            f'resp = httpx.get(f"https://api.{_pick(rng, DOMAIN_WORDS)}.com/v1/{w}s/{{{w}_id}}", timeout=10)',
            '    password = os.environ["DB_PASSWORD"]',
            "    if not password:",
            "def check_password(password: str, hashed: bytes) -> bool:",
            '    token = request.headers.get("Authorization", "").removeprefix("Bearer ")',
            "    secret = settings.SECRET_KEY",
            f"    assert {v}_{w}({n}) == {n + 1}",
            f"class {w.title()}{v.title()}Error(RuntimeError):",
            f'    """Raised when the {w} cannot be {v}ed."""',
            f"        for i, {w} in enumerate({w2}s, start=1):",
            f'    df = pd.read_csv("data/{w}s.csv", parse_dates=["created_at"])',
            f'    {w} = {w2}.get("{w}") or {{}}',
            'with open(path, encoding="utf-8") as fh:',
            f"    return hashlib.sha256(data).hexdigest()[:{rng.choice([8, 12, 16])}]",
            f"    created = datetime({rng.randint(2019, 2025)}, {rng.randint(1, 12)}, {rng.randint(1, 28)},"
            " tzinfo=UTC)",
            "    return x[::2] + x[1::2]",
            f'    request_id = "{_uuid(rng)}"',
            f'    assert digest == "{_chars(rng, HEX, 64)}"',
            "    password_reset_expiry = timedelta(hours=24)",
            "    api_key = None",
            'API_KEY_HEADER = "X-API-Key"',  # pragma: allowlist secret (a header name)
            "    phone_number = models.CharField(max_length=20, blank=True)",
            f"MAX_{w.upper()} = {rng.choice([2147483647, 4294967295, 9007199254740991, 65535])}",
            f'    isbn = "978-{rng.randint(0, 9)}-{rng.randint(10, 99)}-{rng.randint(100000, 999999)}-'
            f'{rng.randint(0, 9)}"',
            f"    eps = {rng.choice(['1e-9', '3.14159265358979', '2.718281828459045', '0.000123'])}",
            "    mask = 0xFFFFFFFF & (value >> 8)",
            f'    role_arn = "arn:aws:iam::{_chars(rng, string.digits, 12)}:role/{w}-deploy"',
            f"    cutoff = now - timedelta(days={rng.randint(1, 90)}, seconds={rng.randint(0, 86399)})",
            f'    if user.email.endswith("@{_pick(rng, DOMAIN_WORDS)}.com"):',
            f'    data_uri = "data:image/svg+xml;base64,{base64.b64encode(SVG).decode()}"',
            f"serialVersionUID = {rng.randint(10**17, 10**18)}",
            f'    sock.bind(("0.0.0.0", {port}))',
            f'    print(f"{{elapsed:.3f}}s for {n} {w}s ({{rate:,.0f}}/s)")',
        ],
        "js": [
            f"const {w} = await fetch(`/api/{w}s/${{id}}`).then((r) => r.json());",
            f'import {{ {w.title()}{v.title()} }} from "./{w}/{v}";',
            f"export function {v}{w.title()}({w2}) {{",
            f"  if (!{w}.length) return null;",
            f'    "{_pick(rng, NPM)}": "^{ver}",',
            f"  }}, {rng.randint(100, 5000)});",
            f"const PORT = process.env.PORT ?? {port};",
            f'      "integrity": "sha512-{base64.b64encode(rng.randbytes(64)).decode()}",',
            f'      "resolved": "https://registry.npmjs.org/{npm}/-/{npm}-{ver}.tgz",',
            '  const password = form.get("password");',
            f"  return items.filter((i) => i.{w2}Id === {w2}Id).map((i) => i.total);",
            f'describe("{v} {w}", () => {{',
            f"const handle{w.title()}{v.title()}RequestWithRetry = async (attempt = 0) => {{",
            f"  const url = `https://www.google.com/search?q=${{encodeURIComponent(query)}}&hl=en&num={n}`;",
            "  const apiKey = process.env.MAPS_API_KEY;",
            f'  expect(screen.getByText("Order #{rng.randint(10000, 99999)} shipped")).toBeVisible();',
            f"  ctx, cancel := context.WithTimeout(ctx, {rng.randint(1, 30)}*time.Second)",
            "fn main() -> Result<(), Box<dyn std::error::Error>> {",
            f"  let {w}: std::collections::HashMap<String, u64> = HashMap::with_capacity({n});",
            f"SELECT id, email, created_at FROM users WHERE created_at > NOW() - INTERVAL '{n % 30} days';",
        ],
        "shell": [
            f"pip install {p}=={ver}",
            f"git checkout -b feat/{w}-{v}",
            f"git log --oneline -n {rng.randint(3, 20)}",
            f"docker run --rm -p {port}:{port} ghcr.io/{_pick(rng, DOMAIN_WORDS)}/{w}:{ver}",
            f"kubectl -n {w} rollout status deploy/{w2}-api --timeout={rng.randint(30, 300)}s",
            f"curl -sf https://{w}.{_pick(rng, DOMAIN_WORDS)}.com/healthz | jq .status",
            'export PATH="$HOME/.local/bin:$PATH"',
            f"npm install --save-dev {_pick(rng, NPM)}@{ver}",
            f"docker pull python@sha256:{_chars(rng, HEX, 64)}",
            f"git cherry-pick {sha}",
            f"psql -h localhost -p 5432 -U app -d {w}",
            f'echo "{_chars(rng, HEX, 64)}  {w}-{ver}.tar.gz" | sha256sum -c -',
            f"ssh -i ~/.ssh/id_ed25519 deploy@{w}-{rng.randint(1, 9)}.internal",
            "git clone git@github.com:pallets/flask.git",
            f"FROM python:3.{rng.randint(9, 12)}-slim@sha256:{_chars(rng, HEX, 64)}",
            f"ping -c {rng.randint(1, 5)} 127.0.0.1 && curl http://[::1]:{port}/",
            f"for i in $(seq 1 {rng.randint(2, 50)}); do make test || break; done",
        ],
        "config": [
            f"replicas: {rng.randint(1, 12)}",
            f"  image: ghcr.io/{_pick(rng, DOMAIN_WORDS)}/{w}:{ver}",
            f"  port: {port}",
            f'version = "{ver}"',
            f"[tool.{p}]",
            "host = localhost",
            f"timeout = {rng.randint(1, 120)}",
            "LOG_LEVEL=debug",
            f"DATABASE_URL=postgres://localhost:5432/{w}",
            f'  - "{port}:{port}"',
            f'requires-python = ">=3.{rng.randint(8, 12)}"',
            f"{w}_ttl_seconds: {rng.randint(60, 86400)}",
            "password_min_length: 12",
            f"  secretName: {w}-tls",
            "  password_file: /run/secrets/db_password",
            "      valueFrom: {secretKeyRef: {name: db, key: password}}",
            f"SECRET_ARN=arn:aws:secretsmanager:eu-west-1:{_chars(rng, string.digits, 12)}:secret:{w}",
            "  netmask: 255.255.255.0",
            f'  cron: "{rng.randint(0, 59)} {rng.randint(0, 23)} * * 1-5"',
            f"max_upload_bytes = {rng.randint(10**6, 10**10)}",
        ],
        "log": [
            f"{day}T{clock}.{rng.randint(0, 999):03d}Z INFO [{w}] request_id={_uuid(rng)} status=200 "
            f"duration_ms={n}",
            f"[{clock}] GET /api/{w}s/{n} 200 {rng.randint(1, 900)}ms",
            f"commit {sha}",
            f"{sha[:7]} {v} {w} handling in {w2} service",
            f"Successfully installed {p}-{ver} {_pick(rng, PACKAGES)}-{_version(rng)}",
            f"{rng.randint(1, 400)} passed, {rng.randint(0, 5)} failed, {rng.randint(0, 9)} skipped in "
            f"{rng.randint(1, 90)}.{rng.randint(10, 99)}s",
            f'  File "/app/{w}/{v}.py", line {rng.randint(1, 900)}, in {v}_{w}',
            f'  File "/usr/lib/python3.11/site-packages/{p}/{w}.py", line {rng.randint(1, 900)}, in {v}',
            f"ERROR: Could not find a version that satisfies the requirement {p}=={ver}",
            f"worker pid={rng.randint(100, 65000)} rss={rng.randint(10_000_000, 4_000_000_000)} bytes "
            f"uptime={rng.randint(1, 10**6)}s",
            f"event_time_ms={rng.randint(1_600_000_000_000, 1_800_000_000_000)} lag_ms={n}",
            f"Listening on http://0.0.0.0:{port} (press CTRL+C to quit)",
            f'  "sha": "{sha}",',
            f'ETag: "{_chars(rng, HEX, 32)}"',
            f"{w}.{v}: processed {rng.randint(1000, 10**7):,} rows in {rng.randint(1, 600)}s",
            f"Merge pull request #{rng.randint(100, 9999)} from {_pick(rng, DOMAIN_WORDS)}/{w}-{v}",
            f"{day} {clock},{rng.randint(100, 999)} WARNING retry {rng.randint(1, 5)}/5 after "
            f"{rng.randint(100, 4000)} ms",
            f"Downloading {p}-{ver}-cp311-cp311-manylinux_2_17_x86_64.whl ({n / 100:.1f} MB)",
            f"trace_id={_chars(rng, HEX, 32)} span_id={_chars(rng, HEX, 16)}",
            f"GC: collected {rng.randint(1000, 999999)} objects, heap {rng.randint(100, 9999)} MB -> "
            f"{rng.randint(100, 9999)} MB",
        ],
        "chat": [
            f"Can you make the {w} {v}er handle an empty {w2} list?",
            f"The test for {v}_{w} fails since I bumped {p} to {ver}.",
            f"Here is the traceback from the {w} worker:",
            f"I think the {w2} cache is stale after the migration.",
            "Please keep the public API unchanged and add a test.",
            f"It works locally but CI times out after {rng.randint(5, 60)} minutes.",
        ],
    }
    return _pick(rng, templates[family])


_FAMILIES_FOR = {"code": ["python", "js", "shell"], "config": ["config"], "log": ["log"], "chat": ["chat"]}


def _filler(rng: random.Random, setting: str, k: int) -> list[str]:
    return [clean_line(rng, _pick(rng, _FAMILIES_FOR[setting])) for _ in range(k)]


# --------------------------------------------------------------------------- assembly


def _render(rng: random.Random, kind: str, spec: KindSpec, carrier: Carrier) -> tuple[str, list[Planted]]:
    """One item line (or block) with its planted item, spans relative to the line."""
    _, template = carrier
    parts: tuple[str, ...] = ()
    if kind == "PRIVATE_KEY":
        escaped = "{e}" in template
        value, parts = private_key_block(rng, escaped=escaped)
        template = template.replace("{e}", "{v}")
    elif kind == "USERNAME" and "{w}" in template:
        value = username(rng, spaces=rng.random() < 0.4)
        template = template.replace("{w}", "{v}")
    else:
        value = spec.value(rng)
    # Braces in templates are doubled for format(); only {v} is a slot.
    before, after = template.replace("{{", "{").replace("}}", "}").split("{v}", 1)
    line = before + value + after
    item = Planted(kind, spec.category, value, len(before), len(before) + len(value), spec.placeholder, parts)
    return line, [item]


def _sample(rng: random.Random, setting: str, rendered: list[tuple[str, list[Planted]]]) -> Sample:
    lines = _filler(rng, setting, rng.randint(1, 3))
    items: list[Planted] = []
    for line, planted in rendered:
        offset = sum(len(x) + 1 for x in lines)
        items += [
            Planted(p.kind, p.category, p.value, p.start + offset, p.end + offset, p.placeholder, p.parts)
            for p in planted
        ]
        lines.append(line)
        lines += _filler(rng, setting, rng.randint(0, 2))
    text = "\n".join(lines)
    for p in items:
        assert text[p.start : p.end] == p.value, (p.kind, p.value)
    return Sample(text, setting, tuple(items))


def generate(seed: int = 0, per_kind: int = 28, mixed: int = 40, clean: int = 600) -> Corpus:
    """Build the labelled corpus; the same seed gives the same corpus."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    for kind, spec in KINDS.items():
        for i in range(per_kind):
            carrier = spec.carriers[i % len(spec.carriers)]
            samples.append(_sample(rng, carrier[0], [_render(rng, kind, spec, carrier)]))
    # Chat messages that paste several things at once.
    chat_kinds = [(k, s, c) for k, s in KINDS.items() for c in s.carriers if c[0] == "chat"]
    for _ in range(mixed):
        picks = rng.sample(chat_kinds, rng.randint(2, 3))
        samples.append(_sample(rng, "chat", [_render(rng, k, s, c) for k, s, c in picks]))
    families = ["python", "js", "shell", "config", "log"]
    clean_lines = tuple(clean_line(rng, families[i % len(families)]) for i in range(clean))
    return Corpus(seed, tuple(samples), clean_lines)
