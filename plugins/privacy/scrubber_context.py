"""Secrets found by where they stand, whatever their shape.

A password in ``postgresql://app:<it>@db/orders``, the token after ``Authorization: Bearer``, the
word after ``mysql -p`` or ``--password=``, the value of ``DB_PASSWORD=`` in a ``.env`` file or
of ``AccountKey=`` in an Azure connection string: none has a format a token detector knows, so
they are recognised by their context. ``scrubber.py`` runs these rules with the others.

Every rule is a pattern with a ``value`` group; a finding is kept when the value is not a
reference (``$VAR``, ``${{ secrets.X }}``, ``os.environ[...]``, ``<password>``), not code
(``password=password``, ``token = self.token``) and not a placeholder (``***``, ``changeme``
is kept: it is a real, if weak, password).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from detect_secrets.filters.heuristic import is_sequential_string, is_templated_secret

__all__ = [
    "CONTEXT_RULES",
    "ContextRule",
    "KEY_NEEDLES",
    "is_placeholder",
    "is_variable",
    "key_kind",
    "looks_generated",
    "plausible_value",
]

_PASSWORD_WORDS = frozenset(
    {
        "password", "passwd", "pwd", "pass", "passphrase", "passwort", "contraseña", "contrasena",
        "motdepasse", "senha", "pw",
    }
)
_SECRET_WORDS = frozenset(
    {
        "secret", "token", "apikey", "credential", "credentials", "creds", "sig", "signature", "sas", "bearer", "oauth",
        "auth", "authorization",
    }
)
#: lower-case parts one of which every key ``key_kind`` accepts holds (each word above, "key", and the
#: run-together names): the needles of the rules that take their kind from the key, so the prefilter asks
#: them wherever such a key may be (a test checks every word of these lists with and without it)
KEY_NEEDLES = ("pass", "pw", "secret", "token", "key", "auth", "cred", "sig", "sas", "bearer", "contrase", "senha")
# "key" is a secret only with one of these before it: api_key, AccountKey, SECRET_KEY; a bare
# "key" names dictionary entries, sort orders and cache entries far more often.
_KEY_QUALIFIERS = frozenset(
    {
        "api", "access", "secret", "private", "priv", "auth", "encryption", "signing", "master", "app",
        "account", "shared", "storage", "subscription", "license", "client", "service", "session", "webhook",
        "hmac", "jwt", "crypt", "sas", "primary", "secondary", "admin", "db", "database", "consumer",
        "instrumentation", "ingest", "write", "read", "deploy", "sendgrid", "stripe", "openai", "anthropic",
        "mailgun", "aws", "azure", "gcp", "google",
    }
)
# A key holding one of these words names, points at or describes a secret; it holds none.
_METADATA_WORDS = frozenset(
    {
        "name", "names", "ref", "file", "path", "dir", "arn", "env", "id", "ids", "type", "len", "length",
        "ttl", "version", "manager", "store", "provider", "mount", "url", "uri", "endpoint", "expiry",
        "expires", "expiration", "expire", "header", "prefix", "field", "fields", "count", "limit", "size",
        "format", "kind", "mode", "lifetime", "timeout", "min", "max", "policy", "rotation", "param", "label",
        "description", "enabled", "required", "regex", "pattern", "validator", "strength", "reset", "hint",
        "variable", "var", "hash", "hashed", "salt", "algorithm", "alg", "location", "source", "class",
        "method", "scheme", "style", "placeholder", "prompt", "help", "question", "tokens", "secrets",
        "passwords", "keys", "usage", "error", "errors", "reason", "changed", "input", "widget", "form",
        "flag", "option", "options", "set", "get", "check", "verify", "is", "has", "use", "uses", "index",
        "pos", "position", "start", "end", "byte", "bytes", "bits", "char", "chars", "encoding", "encoder",
        "decoder", "parser", "cls", "fn", "func", "callback", "handler", "filter", "dict", "map", "list",
        "str", "bool", "int", "example", "sample", "dummy", "mock", "fake", "sep", "separator", "delimiter",
        "quote", "generator", "gen", "factory", "cache", "regexp", "status", "state", "level", "score",
        "backend", "backends", "module", "plugin", "settings", "config", "configuration", "params", "idx",
        "fingerprint", "digest", "checksum", "public", "pub",
    }
)


def _words(key: str) -> list[str]:
    """``AWS_SECRET_ACCESS_KEY`` -> aws, secret, access, key; ``apiKey`` -> api, key."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [w for w in re.split(r"[\W_]+", spaced.lower()) if w]


_PASSWORD_PART = re.compile(r"passw|pwd|passphrase|contrase|senha|motdepasse")
# Run-together names: authtoken, clientsecret, secretkey (not secretsmanager, tokenizer).
_SECRET_PART = re.compile(r"^(?:secret(?!s).*|.*(?:secret|token|apikey|credentials?|authorization))$")


_FILE_NAME = re.compile(
    r"\.(?:py|pyi|js|mjs|ts|tsx|go|rb|rs|java|kt|c|h|cc|cpp|cs|php|sh|json|ya?ml|toml|ini|cfg|txt|md)$"
)


@lru_cache(maxsize=8192)
def key_kind(key: str) -> str | None:
    """PASSWORD or SECRET when ``key`` names a secret it holds, else None."""
    words = _words(key)
    if not words or any(w in _METADATA_WORDS for w in words) or _FILE_NAME.search(key):
        return None  # "secretName", "token_url", "requests/auth.py:861"
    joined = "".join(words)
    # "pass" and "pw" only end a password's name (ADMIN_PASS, db_pw): pass_fds, PassThrough
    if words[-1] in _PASSWORD_WORDS or _PASSWORD_PART.search(joined):
        return "PASSWORD"
    if any(w in _SECRET_WORDS or _SECRET_PART.match(w) for w in words):
        return "SECRET"
    for before, word in zip(words, words[1:], strict=False):
        if word in ("key", "keys") and before in _KEY_QUALIFIERS:
            return "SECRET"
    if words[-1] in ("apikey", "accesskey", "secretkey", "privatekey", "authkey", "masterkey", "accountkey"):
        return "SECRET"
    return None


_REFERENCE = re.compile(
    r"^(?:\$\{[^}]*\}$|\$\(.*\)$|%\(|%s$|\{\{|\{%|<[^>]*>$|\*+$|x{3,}$|X{3,}$|\.{3}|…|ENC\[|vault:|arn:|ref\+"
    r"|secret:|op://|(?:os|process|ENV|env|settings|config|cfg|conf|self|this|ctx|args|opts|options|params)\b[.\[(])"
    r"|\{[A-Za-z_][\w.\[\]'\"]*\}"  # f"_{Var._id}", "{password}": a template fills it in
)
_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def is_variable(value: str) -> bool:
    """``$DB_PASS`` names a variable; ``$aAGwaX5l5q`` is a password that starts with a dollar."""
    m = _VARIABLE.fullmatch(value)
    return m is not None and not looks_generated(m.group(1))
_CODE = re.compile(
    r"^(?:[A-Za-z_][A-Za-z_0-9]*(?:\.[A-Za-z_][A-Za-z_0-9]*)*(?:\(\)?|\[)?|None|null|nil|true|false|True|False|"
    r"undefined|NULL|required|optional|string|str|bytes|int|boolean|number|any)[;,)]*$"
)
# One word, or lower-case words joined: prose and names, not passwords ("BlE6QdWzqJRnSu" is
# long enough to count).
# Expressions, not literals: get_password(), self.token, Optional[str], (start, end), a::b, a->b
_CALL_OR_ATTRIBUTE = re.compile(
    r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*[ \t]*[(\[](?:[A-Za-z_\"'\d)\]*\s\-]|$)"
    r"|^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+[;,)]*$|^[(\[{][A-Za-z_][\w.]*$|^[(\[{].*[)\]}][;,]?$|::|->"
)


def looks_generated(value: str) -> bool:
    """A name-shaped value that is not a name: its letters and digits change class as often as
    a random string's do (``beYmsVDjZaWQ``, ``b94c3cb6ee02``), not once a word (``getPassword``)."""
    chars = [c for c in value if c.isalnum()]
    if len(chars) < 8:
        return False
    if re.fullmatch(r"[0-9a-fA-F]{16,}", value) and sum(c.isdigit() for c in chars) >= 4:
        return any(c.isalpha() for c in chars)  # hex: its digit and letter runs are long
    kinds = ["d" if c.isdigit() else "u" if c.isupper() else "l" for c in chars]
    changes = sum(a != b for a, b in zip(kinds, kinds[1:], strict=False))
    return changes * 3 >= len(chars)

_PLAIN_WORDS = re.compile(r"^[A-Za-z]{1,15}$|^[a-z]+(?:[ _\-][a-z]+)+$")
_NUMBERISH = re.compile(r"^\d{1,7}$|^\d+(?:\.\d+)?(?:[a-z]{1,2}|%)?$|^0x[0-9a-fA-F]+$|^#[0-9a-fA-F]{3,8}$")
_PATH = re.compile(r"^(?:~|\.{1,2}|[A-Za-z]:)?(?:[/\\][A-Za-z0-9_.\-]+){2,}[/\\]?$")
_PLACEHOLDERS = frozenset(
    {
        "password", "passwd", "secret", "token", "changeit", "redacted", "hidden", "none", "your_password",
        "yourpassword", "your-password", "your_token", "your_api_key", "mypassword", "my_password", "example",
        "placeholder", "dummy", "masked", "removed", "empty", "notset", "not-set", "unset", "default",
        "string", "value", "foo", "bar", "foobar", "test", "testing", "xxxxxx", "password123",
        "pass", "pw", "pwd", "passw0rd", "user", "username",
    }
)


def is_placeholder(value: str) -> bool:
    """``password``, ``your_token``, ``***``: what documentation writes where a secret goes."""
    lowered = value.lower()
    return lowered in _PLACEHOLDERS or lowered.strip("_-*<>") in _PLACEHOLDERS or set(lowered) <= {"*", "x", "."}


def plausible_value(value: str, quoted: bool, key: str = "", code: bool = False, whole_line: bool = False) -> bool:
    """Whether ``value`` can be the secret itself rather than a reference, code or a placeholder.

    ``code``: the value may be an expression (an assignment in a program), so an unquoted name
    is a variable unless it mixes cases and digits the way generated secrets do.
    ``whole_line``: the value runs to the end of its line, where an expression ends with a
    bracket or a name (``foo(bar)``, ``foo(``), a password maybe not (``WZwy04(cGkwQ7Dsx2%ls*K``).
    """
    if len(value) < 6 or len(value) > 1024 or "->" in value:
        return False
    if _REFERENCE.search(value) or is_variable(value) or is_templated_secret(value) or "://" in value:
        return False
    if re.search(r"\[[A-Z0-9_]+(?:\]|$)", value):
        return False  # a placeholder of an earlier scrub: scrubbing is idempotent
    if is_placeholder(value) or value.lower() == key.lower():
        return False
    if _NUMBERISH.match(value) or _PLAIN_WORDS.match(value) or (_PATH.match(value) and not looks_generated(value)):
        return False
    if code and not quoted:
        if _CALL_OR_ATTRIBUTE.search(value) and not (whole_line and value[-1] not in ")]([{,;:" and "(" in value):
            return False  # token = self.token, password = get_password(), sig = signature(f)
        if _CODE.match(value) and not looks_generated(value):
            return False  # password=password, secret: str, token = None
    if not any(c.isalnum() for c in value) or is_sequential_string(value):
        return False
    # A name such as DB_PASSWORD or X-API-Key is a key, not a value.
    return not (re.fullmatch(r"[A-Za-z][\w.\-]*", value) and key_kind(value) is not None)


@dataclass(frozen=True)
class ContextRule:
    """A pattern whose ``value`` group is a secret when the rule's checks pass.

    ``kind`` names the finding; None takes it from the ``key`` group (``key_kind``), and a key
    that names no secret drops the finding.
    """

    name: str
    pattern: re.Pattern[str]
    kind: str | None = "PASSWORD"
    needles: tuple[str, ...] = ()  # lower-case words one of which every match holds
    code: bool = False  # values may be expressions (see plausible_value)
    generated: bool = False  # only values that look generated (looks_generated), not names
    whole_line: bool = False  # the value group runs to the end of the line
    starts_at_needle: bool = False  # every match starts where one of the needles does

    def __post_init__(self) -> None:
        # Python's re scans a case-insensitive alternation of words slowly; where a match starts
        # at a needle, the needles are found in the lower-cased text and the rule tried there.
        anchor = "|".join(re.escape(n) for n in self.needles) if self.starts_at_needle else None
        object.__setattr__(self, "_anchor", re.compile(anchor) if anchor else None)
        object.__setattr__(self, "_keyed", "key" in self.pattern.groupindex)
        object.__setattr__(self, "_separated", "sep" in self.pattern.groupindex)

    def _matches(self, text: str, lo: int, hi: int, lowered: str | None) -> Iterator[re.Match[str]]:
        anchor: re.Pattern[str] | None = getattr(self, "_anchor", None)
        if anchor is None or lowered is None:
            yield from self.pattern.finditer(text, lo, hi)
            return
        taken = lo
        for a in anchor.finditer(lowered, lo, hi):
            if a.start() >= taken and (m := self.pattern.match(text, a.start(), hi)):
                taken = max(m.end(), a.start() + 1)
                yield m

    def findings(
        self, text: str, lo: int, hi: int, lowered: str | None = None
    ) -> Iterator[tuple[int, int, str]]:
        """(start, end, kind) of each secret in ``text[lo:hi]``; ``lowered``: the text lower-cased
        with its length kept (ASCII case folding), for rules that start at a needle."""
        keyed: bool = getattr(self, "_keyed", False)
        separated: bool = getattr(self, "_separated", False)
        for m in self._matches(text, lo, hi, lowered):
            key = (m.group("key") or "") if keyed else ""
            kind = self.kind or key_kind(key)
            if kind is None:
                continue
            start, end = m.span("value")
            value = m.group("value")
            quoted = value[:1] in "\"'`" and value[-1:] == value[:1] and len(value) >= 2
            if quoted:
                start, end, value = start + 1, end - 1, value[1:-1]
            elif start > 0 and text[start - 1] in "\"'`":
                quoted = True
            code = self.code
            if code and separated and m.group("sep") in ("=", ": ") and value[-1:] != ",":
                code = False  # KEY=value (.env, shell, properties), key: value (YAML): a name is a value
            opening = text[m.start("key") - 1 : m.start("key")] if key else ""
            if code and opening in ("'", '"') and text[m.end("key") : m.end("key") + 1] != opening and (
                text[end : end + 1] == opening
            ):
                quoted = True  # "X-API-Key: value": key and value inside one string literal
            if self.generated and not looks_generated(value):
                continue
            if plausible_value(value, quoted, key, code, self.whole_line):
                yield start, end, kind


_VALUE = r"""(?P<value>"[^"\n]{1,512}"|'[^'\n]{1,512}'|`[^`\n]{1,512}`|[^\s"'`;,)}\]<>|&]{1,512})"""
_CLI_VALUE = r"""(?P<value>'[^'\n]{1,256}'|"[^"\n]{1,256}"|[^\s'"|;&)\-][^\s'"|;&)]{0,255})"""

CONTEXT_RULES: tuple[ContextRule, ...] = (
    # Authorization: Bearer <token> / Basic <base64> / token <t>, in headers, code and curl.
    ContextRule(
        "authorization header",
        re.compile(
            r"(?i)\b(?:proxy-)?authorization\b[\"'\]]*[ \t]*[:=,][ \t]*(?:[frb]?[\"'`])?[ \t]*"
            r"(?:bearer|token|basic|digest|bot|sso-key|ssws|apikey|api-key|key|jwt|gitlab-token)[ \t]+"
            r"(?P<value>[A-Za-z0-9._~+/\-]{8,}=*)"
        ),
        "BEARER_TOKEN",
        ("authorization",),
    ),
    ContextRule(
        "bearer token",
        re.compile(r"\b[Bb]earer[ \t]+(?P<value>(?=[A-Za-z0-9._~+/\-]*[0-9])[A-Za-z0-9._~+/\-]{16,}=*)"),
        "BEARER_TOKEN",
        ("bearer",),
    ),
    ContextRule(
        "basic auth header",
        re.compile(r"\bBasic[ \t]+(?P<value>[A-Za-z0-9+/]{12,}={0,2})(?![\w+/=])"),
        "BASIC_AUTH",
        ("basic",),
    ),
    # scheme://user:password@host, any scheme (percent-encoded passwords included).
    ContextRule(
        "url user-info",
        re.compile(
            r"(?i)\b[a-z][a-z0-9+.\-]{1,30}://[^\s:/?#@'\"<>\[\]]{0,128}:"
            r"(?P<value>[^\s/@'\"<>]{1,256})@(?=[\w\[.\-])"
        ),
        "PASSWORD",
        ("://",),
    ),
    # curl -u user:password, --user, --proxy-user (not docker's -u 1000:1000).
    ContextRule(
        "user:password flag",
        re.compile(r"(?<![\w-])(?:-u|--user|--proxy-user)[ \t=]+[\"']?[^\s:'\"]{0,128}:"
            r"(?P<value>'[^'\n]{1,256}'|\"[^\"\n]{1,256}\"|[^\s'\"]{1,256})"
        ),
        "PASSWORD",
        ("-u", "--user", "--proxy-user"),
    ),
    # --password X, --password=X, -pass X, --db-password 'X'.
    ContextRule(
        "password flag",
        re.compile(r"(?i)(?<![\w-])--?(?:[\w-]*-)?(?:password|passwd|pass|pwd)(?:=|[ \t]+)" + _CLI_VALUE),
        "PASSWORD",
        ("-pass", "-pwd", "password", "passwd"),
    ),
    # mysql -pSECRET / -p'SECRET' (attached: a space after -p makes mysql prompt).
    ContextRule(
        "mysql -p",
        re.compile(
            r"\b(?:mysql|mysqldump|mysqladmin|mysqlimport|mysqlsh|mariadb|mariadb-dump|mysqlcheck)\b[^\n|;&]*?"
            r"\s-p(?P<value>'[^'\n]{1,256}'|\"[^\"\n]{1,256}\"|[^\s'\"\-][^\s'\"|;&]{0,255})"
        ),
        "PASSWORD",
        ("mysql", "mariadb"),
    ),
    # -p X where the tool reads a password there: sshpass, docker/podman/helm login.
    ContextRule(
        "login -p",
        re.compile(
            r"\b(?:sshpass|(?:docker|podman|buildah|skopeo|nerdctl|oras|crane)[ \t]+login"
            r"|helm[ \t]+registry[ \t]+login)\b"
            r"[^\n|;&]*?[ \t]-p[ \t]+" + _CLI_VALUE
        ),
        "PASSWORD",
        ("sshpass", "login"),
    ),
    # echo 'SECRET' | docker login --password-stdin
    ContextRule(
        "echo | --password-stdin",
        re.compile(r"\becho[ \t]+(?:-n[ \t]+)?" + _CLI_VALUE + r"[ \t]*\|[^\n|]*--password-stdin"),
        "PASSWORD",
        ("password-stdin",),
    ),
    # truffleHog's Heroku rule: a UUID after the word heroku is an API key.
    ContextRule(
        "heroku api key",
        re.compile(
            r"(?i)heroku[^\n]{0,40}?[ \t:=\"']"
            r"(?P<value>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?![\w-])"
        ),
        "SECRET",
        ("heroku",),
    ),
    # A variable named after a provider holding a random-looking string: github = "...",
    # TWITTER_OAUTH="..." (truffleHog's keyword rules); looks_generated tells it from a name.
    ContextRule(
        "provider-named value",
        re.compile(
            r"(?i)\b(?:github|gitlab|twitter|facebook|fb|heroku|slack|stripe|twilio|mailgun|sendgrid|openai|anthropic"
            r"|huggingface|hf|aws|azure|gcp|google|digitalocean|datadog|sentry|npm|pypi|docker|dockerhub)[\w.\-]{0,40}"
            r"[\"'\]]*[ \t]*(?::=|=>|=|:)[ \t]*(?P<value>[\"'][A-Za-z0-9_\-+/=.]{20,200}[\"'])"
        ),
        "SECRET",
        ("github", "gitlab", "twitter", "facebook", "fb", "heroku", "slack", "stripe", "twilio", "mailgun",
         "sendgrid", "openai", "anthropic", "huggingface", "hf", "aws", "azure", "gcp", "google", "digitalocean",
         "datadog", "sentry", "npm", "pypi", "docker"),
        generated=True,
        starts_at_needle=True,
    ),
    ContextRule(
        "redis-cli -a",
        re.compile(r"\bredis-cli\b[^\n|;&]*?[ \t](?:-a|--pass)[ \t]+" + _CLI_VALUE),
        "PASSWORD",
        ("redis-cli",),
    ),
    # OpenSSL's -passin/-passout pass:SECRET.
    ContextRule(
        "openssl pass:",
        re.compile(r"(?<![\w-])-(?:passin|passout|pass|password|k)[ \t]+pass:(?P<value>[^\s'\"]{1,256})"),
        "PASSWORD",
        ("pass:",),
    ),
    ContextRule(
        "htpasswd -b",
        # the password is the last word of an htpasswd -b command line
        re.compile(r"\bhtpasswd[ \t]+(?=[^\n]*(?<!\S)-\w*b)[^\n]*?[ \t]" + _CLI_VALUE + r"[ \t]*$", re.MULTILINE),
        "PASSWORD",
        ("htpasswd",),
    ),
    # ~/.pgpass: host:port:database:user:password.
    ContextRule(
        "pgpass line",
        re.compile(r"^[\w.\-*\[\]]+:(?:\d{1,5}|\*):[^:\s]+:[^:\s]+:(?P<value>[^\s:]{1,256})$", re.MULTILINE),
        "PASSWORD",
    ),
    # KEY=value, key: value, "key": "value", key = 'value', Key=value; (connection strings).
    ContextRule(
        "secret-named key",
        re.compile(
            r"(?<![\w.])(?P<key>[A-Za-z_][\w.\-]{0,80}+)[\"'\]]*[ \t]*(?::=|=>|=|:)[ \t]*(?:!!str[ \t]+)?"
            r"(?=" + _VALUE + ")"
        ),
        None,
        KEY_NEEDLES,
        code=True,
    ),
    # A whole line KEY=value (.env, shell, INI, properties) or key: value (YAML): the value runs
    # to the end of the line (or a comment), so it may hold & , ; that end values elsewhere.
    ContextRule(
        "secret-named key line",
        re.compile(
            r"^[ \t]*(?:export[ \t]+|-[ \t]+)?(?P<key>[A-Za-z_][\w.\-]{0,80})(?P<sep>[ \t]*(?:=|:[ \t])[ \t]*)"
            r"(?P<value>(?<==)[^\s'\"]\S*|(?<!=)[^\s'\"#]\S*)[ \t]*(?:[ \t]#[^\n]*)?$",
            re.MULTILINE,
        ),
        None,
        KEY_NEEDLES,
        code=True,
        whole_line=True,
    ),
    # Key=value; pairs of a connection string (ADO.NET, Azure, ODBC): the value runs to the ";".
    ContextRule(
        "connection string",
        re.compile(
            r"(?i)(?:^|(?<=[;\"']))(?P<key>password|pwd|accountkey|sharedaccesskey|sharedsecret|clientsecret"
            r"|client secret|apikey|accesskey|secretkey|token)=(?P<value>[^;\n\"']{1,512})(?=;|\"|'|$)",
            re.MULTILINE,
        ),
        None,
        ("password", "pwd", "accountkey", "sharedaccesskey", "sharedsecret", "clientsecret", "client secret", "apikey",
         "accesskey", "secretkey", "token"),
        starts_at_needle=True,
    ),
    # "KEY=value" inside a JSON string: docker inspect's Env, a Kubernetes env list.
    ContextRule(
        "quoted KEY=value",
        re.compile(r"\"(?P<key>[A-Za-z_][\w.\-]{0,80})=(?P<value>[^\"\n]{1,512})\""),
        None,
        KEY_NEEDLES,
    ),
    # <password>value</password>, and .NET's <add key="ApiKey" value="..."/>.
    ContextRule(
        "xml element",
        re.compile(r"<(?P<key>[\w:.\-]{1,80})>(?P<value>[^<\n]{1,512})</"),
        None,
        KEY_NEEDLES,
    ),
    ContextRule(
        "xml key/value",
        re.compile(
            r"\bkey[ \t]*=[ \t]*\"(?P<key>[^\"\n]{1,80})\"[ \t]+value[ \t]*=[ \t]*(?P<value>\"[^\"\n]{1,512}\")"
        ),
        None,
        ("key",),
        starts_at_needle=True,
    ),
)
