"""The anonymizer: planted-corpus targets, typed placeholders, findings, keyed hashes, and the
proof through a real NATS server that no planted raw value reaches any event on the log."""

from __future__ import annotations

import ast
import asyncio
import base64
import logging
import random
import string
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings, load_settings
from flywheel_loop.engine.processor import Processor
from flywheel_loop.plugins import privacy as anonymizer_plugin
from flywheel_loop.plugins.privacy.anonymizer import Anonymizer, keyed_hash
from flywheel_loop.plugins.privacy.scrubber import PII_KINDS, SECRET_KINDS, Scrubber, scrub
from flywheel_loop.plugins.privacy.settings import DEFAULT_ANONYMIZER_KEY, AnonymizerConfig
from flywheel_loop.schemas import (
    Context,
    FeedbackGiven,
    GitContext,
    InteractionRecorded,
    OutcomeObserved,
    ToolCall,
    new_event,
)
from tests import clean_text
from tests import independent_corpus as ic
from tests import planted_corpus as pc
from tests.conftest import wait_for

EVENT_ID = "01JWV2NPEMR9GHS6JPVT4C4M0E"


@pytest.fixture(scope="module")
def corpus() -> pc.Corpus:
    return pc.generate(seed=0)


def small_corpus(seed: int) -> pc.Corpus:
    """Two items of every kind and a few mixed chat messages: enough to fill one of each event."""
    return pc.generate(seed=seed, per_kind=2, mixed=4, clean=0)


# --------------------------------------------------------------------------- the corpus


def test_planted_corpus_meets_the_recall_and_false_change_targets(corpus: pc.Corpus) -> None:
    result = pc.evaluate(corpus, scrub)
    assert result.items() >= 500
    assert result.items(pc.SECRET) >= 300 and result.items(pc.PII) >= 200
    assert result.recall(pc.SECRET) >= 0.99, {k: (result.found[k], n) for k, n in result.total.items()}
    assert result.recall(pc.PII) >= 0.95, {k: (result.found[k], n) for k, n in result.total.items()}
    assert len(corpus.clean_lines) >= 500
    assert result.clean_changed_share < 0.01, result.clean_changed[:10]


def test_every_labelled_kind_is_planted_in_several_settings(corpus: pc.Corpus) -> None:
    settings_by_kind: dict[str, set[str]] = {}
    for sample in corpus.samples:
        for item in sample.items:
            settings_by_kind.setdefault(item.kind, set()).add(sample.setting)
            assert sample.text[item.start : item.end] == item.value
    assert set(settings_by_kind) == set(pc.KINDS)
    assert all(len(s) >= 2 for s in settings_by_kind.values()), settings_by_kind


def test_the_corpus_is_the_same_for_a_seed_and_differs_across_seeds() -> None:
    a, b, c = small_corpus(3), small_corpus(3), small_corpus(4)
    assert [s.text for s in a.samples] == [s.text for s in b.samples]
    assert [s.text for s in a.samples] != [s.text for s in c.samples]


def test_a_partly_replaced_value_counts_as_leaked() -> None:
    value = "x" * 5 + "".join(random.Random(1).choice("abcdef0123") for _ in range(30))
    assert pc.leaked(value, f"token={value[:12]}[SECRET]")
    assert not pc.leaked(value, "token=[SECRET]")


# --------------------------------------------------------------------------- the scrubber


def test_values_become_typed_placeholders() -> None:
    rng = random.Random(7)
    key, block_parts = pc.private_key_block(rng)
    planted = {
        "AWS_ACCESS_KEY": pc.aws_access_key(rng),
        "GITHUB_TOKEN": pc.github_token(rng),
        "JWT": pc.jwt(rng),
        "EMAIL": pc.email(rng),
        "CREDIT_CARD": pc.card_number(rng),
        "SSN": pc.ssn(rng),
        "IBAN": pc.iban(rng),
    }
    text = "\n".join(
        [
            f"aws_access_key_id = {planted['AWS_ACCESS_KEY']}",
            f'gh = Github("{planted["GITHUB_TOKEN"]}")',
            f"Authorization: Bearer {planted['JWT']}",
            f"please cc {planted['EMAIL']} and call +44 20 7946 0958",
            f"card={planted['CREDIT_CARD']} ssn={planted['SSN']} iban={planted['IBAN']}",
            'File "/home/mgarcia/api/app.py", line 4',
            key,
        ]
    )
    out, counts = scrub(text)
    for kind, value in planted.items():
        assert f"[{kind}]" in out and not pc.leaked(value, out), kind
    assert "[PHONE]" in out and "[USERNAME]" in out and "[PRIVATE_KEY]" in out
    assert not any(pc.leaked(part, out) for part in block_parts)
    assert counts["PRIVATE_KEY"] == 1 and counts["PHONE"] == 1 and counts["USERNAME"] == 1
    assert set(counts) <= SECRET_KINDS | PII_KINDS


def test_scrubbing_is_idempotent(corpus: pc.Corpus) -> None:
    for sample in corpus.samples[::5]:
        once, _ = scrub(sample.text)
        twice, counts = scrub(once)
        assert twice == once and not counts, once


def test_clean_code_and_service_addresses_are_left_alone() -> None:
    text = "\n".join(
        [
            "    password = os.environ['DB_PASSWORD']",
            "def check_password(password: str, hashed: bytes) -> bool:",
            "git clone git@github.com:pallets/flask.git",
            "Listening on http://127.0.0.1:8000 and http://[::1]:8000",
            "commit 9fceb02d0ae598e95dc970b74767f19372d61af8",
            "    return x[::2] + x[1::2]",
            'File "/home/runner/work/app/app.py", line 3',
        ]
    )
    assert scrub(text) == (text, Counter())


# --------------------------------------------------------------------------- out of sample


@pytest.fixture(scope="module")
def independent() -> ic.Corpus:
    """20 documents of each carrier: some 360 secrets and 200 personal-data items."""
    return ic.generate(seed=0, documents=20 * len(ic.CARRIERS))


def test_the_out_of_sample_corpora_import_nothing_of_the_scrubber() -> None:
    for module in (ic, clean_text):
        tree = ast.parse(Path(str(module.__file__)).read_text())
        imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        }
        assert not {m for m in imported if m.startswith(("plugins", "engine", "tests"))}, (module, imported)


def test_the_independent_corpus_is_the_same_for_a_seed_and_differs_across_seeds() -> None:
    a, b, c = (ic.generate(seed=s, documents=40) for s in (5, 5, 6))
    assert [d.text for d in a.documents] == [d.text for d in b.documents]
    assert [d.text for d in a.documents] != [d.text for d in c.documents]
    for doc in a.documents:
        for item in doc.items:
            assert doc.text[item.start : item.end] == item.value


def test_independent_corpus_meets_the_recall_targets_per_carrier_and_kind(independent: ic.Corpus) -> None:
    result = ic.evaluate(independent, scrub)
    assert result.items(ic.SECRET) >= 300 and result.items(ic.PII) >= 150
    assert result.recall(ic.SECRET) >= 0.99, result.missed
    assert result.recall(ic.PII) >= 0.97, result.missed
    secret_carriers = [k for k in result.carrier_total if k.startswith(ic.SECRET + ":")]
    # Every carrier, among them the classes that leaked: bearer/basic auth headers, URLs with
    # credentials, CLI password flags, .env/YAML/TOML keys, cloud connection strings.
    assert len(secret_carriers) == len(ic.CARRIERS) - 3  # the PII-only ones: records, access logs, git/mail
    for key in secret_carriers:
        missed = [m for m in result.missed if key.endswith(m[1])]
        assert result.carrier_found[key] / result.carrier_total[key] >= 0.99, missed
    for kind, total in result.total.items():
        if result.category[kind] == ic.PII:
            assert result.found[kind] / total >= 0.97, [m for m in result.missed if m[0] == kind]


def test_clean_agent_text_is_left_alone() -> None:
    corpus = clean_text.generate(seed=0, site_lines=1500, shaped_lines=1000)
    result = clean_text.evaluate(corpus, scrub)
    assert sum(result.total.values()) >= 2400
    assert {"site-packages source", "pip output", "git output", "pytest output", "model ids"} <= set(result.total)
    assert result.share <= 0.001, result.examples


def test_model_ids_hashes_and_ids_are_not_secrets() -> None:
    rng = random.Random(2)
    sha = "".join(rng.choice("0123456789abcdef") for _ in range(40))
    lines = [
        'model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")',
        "huggingface-cli download Qwen/Qwen2.5-Coder-7B-Instruct-GGUF --local-dir models/qwen",
        "https://huggingface.co/TheBloke/CodeLlama-13B-Instruct-GGUF/resolve/main/config.json",
        f"commit {sha}",
        f"   {sha[:7]}..{sha[7:14]}  main -> main",
        f'git_version = "{sha}"',
        "event_id=01JWV2NPEMR9GHS6JPVT4C4M0E type=interaction.recorded",
        "request_id = 3f2b9c1e-8d4a-4c2b-9f1e-7a6b5c4d3e2f",
        "Hypothesis: seed=4332225577362252891",
        "            token=token,",
        '    "page_token": obj.get("page_token"),',
        "    [7.39020262, 8.54004355]])",
    ]
    for line in lines:
        assert scrub(line) == (line, Counter()), line


def _random(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_the_classes_that_leaked_are_replaced() -> None:
    rng = random.Random(9)
    alnum = string.ascii_letters + string.digits
    token = _random(rng, alnum, 32)
    password = _random(rng, alnum, 6) + "!" + _random(rng, alnum, 6) + "#" + _random(rng, string.digits, 2)
    basic = base64.b64encode(f"deploy:{password}".encode()).decode()
    account_key = base64.b64encode(rng.randbytes(64)).decode()
    cases = {
        f"curl -sS -H 'Authorization: Bearer {token}' https://api.example.org/v1/me": token,
        f'resp = requests.get(url, headers={{"Authorization": "Bearer {token}"}})': token,
        f"curl -H 'Authorization: Basic {basic}' https://api.example.org/v1/me": basic,
        f"curl -u deploy:'{password}' https://api.example.org/v1/me": password,
        f"DATABASE_URL=postgresql://app:{password}@db.internal:5432/orders": password,
        f"redis://default:{password}@cache.internal:6379/0": password,
        f"mongodb+srv://svc:{password}@cluster0.abcde.mongodb.net/app?retryWrites=true": password,
        f"amqp://worker:{password}@rabbitmq:5672/": password,
        f"mysql -h db -u root -p'{password}' shop < dump.sql": password,
        f"PGPASSWORD='{password}' psql -h db -U app -c 'select 1'": password,
        f"docker login -u ci -p '{password}' registry.gitlab.com": password,
        f"mysqldump --user=app --password='{password}' shop": password,
        f"DB_PASSWORD={password}": password,
        f"database:\n  password: {password}\n": password,
        f'[database]\npassword = "{password}"\n': password,
        f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={account_key};EndpointSuffix=core.windows.net": (
            account_key
        ),
        f"Server=tcp:db.database.windows.net,1433;User ID=app;Password={password};Encrypt=True;": password,
    }
    for text, secret in cases.items():
        out, counts = scrub(text)
        assert not pc.leaked(secret, out), (text, out)
        assert set(counts) <= SECRET_KINDS | PII_KINDS, counts


def test_the_prefilter_changes_no_finding(independent: ic.Corpus, corpus: pc.Corpus) -> None:
    fast, slow = Scrubber(), Scrubber(prefilter=False)
    assert fast.prefilter is not None and fast.prefilter.active  # hyperscan is a declared dependency
    texts = [d.text for d in independent.documents] + [s.text for s in corpus.samples[::2]]
    texts += [line for _, line in clean_text.generate(seed=1, site_lines=300, shaped_lines=200).lines]
    texts += ["\n".join(texts[i : i + 25]) for i in range(0, len(texts), 25)]  # many lines at once
    # Text that is not ASCII goes through the prefilter's ASCII view.
    texts += [
        "contraseña = 'Xk9#mPq2!vL7'\nmot de passe: «Zr8$tWq1» — Ünïcödé ━━━ 🔑 sk_test_" + "a1B2" * 7,
        "Téléphone : +33 6 12 34 56 78 · E-mail: jürgen.müller@example-firma.de",
    ]
    for text in texts:
        assert fast.find(text) == slow.find(text), text[:200]


def test_every_word_that_names_a_secret_is_found_the_same_with_and_without_the_prefilter() -> None:
    from flywheel_loop.plugins.privacy.scrubber_context import _PASSWORD_WORDS, _SECRET_WORDS

    fast, slow = Scrubber(), Scrubber(prefilter=False)
    value = "Zr8tQ9vX2mK7pL4nW6"
    for word in sorted(_PASSWORD_WORDS | _SECRET_WORDS | {"client_key", "AccountKey"}):
        for text in (f'{word} = "{value}"', f"{word.upper()}={value}", f'"{word}={value}"',
                     f"<{word}>{value}</{word}>", f"  {word}: {value}"):
            found = slow.find(text)
            assert fast.find(text) == found, text
            assert found, text  # each form is found at all


# --------------------------------------------------------------------------- the anonymizer


def anonymizer(key: str = "k1") -> Anonymizer:
    return Anonymizer(AnonymizerConfig(hash_key=SecretStr(key)))


def test_keyed_hashes_are_stable_for_a_key_and_differ_across_keys() -> None:
    a = keyed_hash("sess-42", b"k1")
    assert a == keyed_hash("sess-42", b"k1")
    assert a != keyed_hash("sess-42", b"k2")
    assert a != keyed_hash("sess-43", b"k1")
    assert a.startswith("anon-") and len(a) == len("anon-") + 16
    assert "sess-42" not in a
    rec = InteractionRecorded(
        session_id="sess-42", user_id="dev-7", role="coder", model_id="m", input="x", output="y"
    )
    one, again, other = (
        anonymizer("k1").interaction(EVENT_ID, rec),
        anonymizer("k1").interaction(EVENT_ID, rec),
        anonymizer("k2").interaction(EVENT_ID, rec),
    )
    assert one.interaction.session_id == again.interaction.session_id != other.interaction.session_id
    assert one.interaction.user_id == keyed_hash("dev-7", b"k1")


def test_findings_carry_kinds_counts_and_versions_never_values() -> None:
    small = small_corpus(11)
    texts = [s.text for s in small.samples]
    rec = InteractionRecorded(
        session_id="s",
        user_id="u",
        role="coder",
        model_id="m",
        input="\n".join(texts[: len(texts) // 2]),
        output="\n".join(texts[len(texts) // 2 :]),
    )
    result = anonymizer().interaction(EVENT_ID, rec)
    expected = scrub(rec.input)[1] + scrub(rec.output)[1] + Counter({"SESSION_ID": 1, "USER_ID": 1})
    assert result.findings.counts == dict(expected)
    assert {"anonymizer", "scrubber", "detect-secrets", "phonenumbers", "python-stdnum"} <= set(
        result.findings.anonymizers
    )
    findings = result.findings.model_dump_json()
    for item in small.items:
        assert not any(pc.leaked(part, findings) for part in item.must_vanish()), item.kind
        assert not any(pc.leaked(part, result.model_dump_json()) for part in item.must_vanish()), item.kind


def test_every_free_text_field_is_scrubbed() -> None:
    rng = random.Random(5)
    email, token = pc.email(rng), pc.github_token(rng)
    dirty = f"mail {email} token {token}"
    rec = InteractionRecorded(
        session_id="s",
        role="coder",
        model_id="m",
        input=dirty,
        output=dirty,
        context=Context(
            project=dirty,
            build=dirty,
            tests=dirty,
            extra=dirty,
            files=[f"/home/mgarcia/{dirty}"],
            git=GitContext(repo=f"https://ci:{token}@github.com/org/repo.git", branch=dirty, commit=dirty),
        ),
        tool_calls=[ToolCall(name="shell", arguments=dirty, output=dirty)],
    )
    fb = FeedbackGiven(
        interaction_id=EVENT_ID, comment=dirty, correction=dirty, final_version=dirty, rating=2
    )
    out = OutcomeObserved(interaction_id=EVENT_ID, errors=[dirty, "plain error"], compiles=False)
    a = anonymizer()
    dumps = [
        a.interaction(EVENT_ID, rec).model_dump_json(),
        a.feedback(EVENT_ID, fb).model_dump_json(),
        a.outcome(EVENT_ID, out).model_dump_json(),
    ]
    for dump in dumps:
        assert email not in dump and token not in dump and "mgarcia" not in dump
    assert a.feedback(EVENT_ID, fb).feedback.rating == 2
    assert a.outcome(EVENT_ID, out).outcome.errors[1] == "plain error"


def test_a_field_at_its_bound_stays_within_it_after_scrubbing() -> None:
    project = ("a@b.io " * 300)[:2000]  # every address grows by one character as [EMAIL]
    rec = InteractionRecorded(
        session_id="s", role="coder", model_id="m", input="", output="", context=Context(project=project)
    )
    result = anonymizer().interaction(EVENT_ID, rec)
    assert result.interaction.context.project is not None
    assert (
        len(result.interaction.context.project) == 2000 and "a@b.io" not in result.interaction.context.project
    )


def test_the_default_key_is_warned_about_and_a_configured_one_is_used(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    registered: list[Processor] = []
    with caplog.at_level(logging.WARNING, logger="flywheel_loop.plugins.privacy.anonymizer"):
        anonymizer_plugin.configure(load_settings())
    assert "hash_key" in caplog.text
    anonymizer_plugin.register_processors(registered.append, load_settings())
    assert [p.name for p in registered] == ["anonymizer"]
    caplog.clear()
    monkeypatch.setenv("FLYWHEEL_ANONYMIZER__HASH_KEY", "a-real-key")
    settings = load_settings()
    assert not AnonymizerConfig.of(settings).uses_default_key
    assert AnonymizerConfig.of(settings).hash_key.get_secret_value() == "a-real-key"
    assert "a-real-key" not in repr(settings)
    with caplog.at_level(logging.WARNING, logger="flywheel_loop.plugins.privacy.anonymizer"):
        anonymizer_plugin.configure(settings)
    assert "hash_key" not in caplog.text


# --------------------------------------------------------------------------- through NATS


async def log_subject_counts(bus: Bus) -> dict[str, int]:
    info = await bus.js.stream_info(bus.streams.for_stream("log"), subjects_filter="fw.log.>")
    return dict(info.state.subjects or {})


async def all_log_messages(bus: Bus) -> list[tuple[bytes, dict[str, str]]]:
    """Every message on the log stream, every subject, with its headers."""
    stream = bus.streams.for_stream("log")
    last = await bus.last_sequence("log")
    out = []
    for seq in range(1, last + 1):
        msg = await bus.js.get_msg(stream, seq)
        out.append((msg.data or b"", dict(msg.headers or {})))
    return out


def strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*strings_in(k), *strings_in(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []


async def test_no_planted_raw_value_reaches_any_event_on_the_log(
    bus: Bus, settings: Settings, engine_with: Any
) -> None:
    small = small_corpus(21)
    by_setting: dict[str, list[str]] = {}
    for sample in small.samples:
        by_setting.setdefault(sample.setting, []).append(sample.text)
    code, logs, chat, config = (by_setting[k] for k in ("code", "log", "chat", "config"))
    raw_ids = ["laptop-of-maria.garcia", "maria.garcia@northwind-labs.io"]
    interaction = InteractionRecorded(
        session_id=raw_ids[0],
        user_id=raw_ids[1],
        role="coder",
        model_id="m",
        input="\n\n".join(chat),
        output="\n\n".join(code[: len(code) // 2]),
        context=Context(extra="\n".join(config), tests="\n".join(code[len(code) // 2 :])),
        tool_calls=[ToolCall(name="run", arguments="pytest -q", output="\n".join(logs))],
    )
    recorded = new_event(interaction, source="test")
    feedback = new_event(
        FeedbackGiven(interaction_id=recorded.id, comment=chat[0], correction=code[0], final_version=code[1]),
        source="test",
    )
    outcome = new_event(
        OutcomeObserved(interaction_id=recorded.id, errors=logs[:5], compiles=False), source="test"
    )

    # A malformed message first (a rating of 9, a planted secret in its comment): it must
    # become an event.rejected that carries no raw text, and the worker must go on.
    bad = orjson.loads(
        new_event(FeedbackGiven(interaction_id=recorded.id, comment=config[0]), source="test").to_bytes()
    )
    bad["data"]["rating"] = 9
    await bus.publish_raw("fw.raw.feedback.given", orjson.dumps(bad), {"Nats-Msg-Id": bad["id"]})
    for event in (recorded, feedback, outcome):
        await bus.publish(event)

    async with engine_with():

        async def anonymized() -> bool:
            counts = await log_subject_counts(bus)
            return all(
                counts.get(f"fw.log.{t}", 0) >= 1
                for t in (
                    "interaction.anonymized",
                    "feedback.anonymized",
                    "outcome.anonymized",
                    "event.rejected",
                )
            )

        await wait_for(anonymized)
        # Let the other built-in processors react to the anonymized events too, then read it all.
        previous = -1
        while (last := await bus.last_sequence("log")) != previous:
            previous = last
            await asyncio.sleep(1.0)

    messages = await all_log_messages(bus)
    events = [orjson.loads(data) for data, _ in messages]
    types = Counter(e["type"] for e in events)
    assert types["interaction.anonymized"] == types["feedback.anonymized"] == types["outcome.anonymized"] == 1
    rejected = [e["data"] for e in events if e["type"] == "event.rejected"]
    assert [r["processor"] for r in rejected] == ["anonymizer"] and "rating" in rejected[0]["reason"]

    secrets = [part for item in small.items for part in item.must_vanish()] + raw_ids
    assert len(small.items) >= 40
    # what is stored, and what the engine reads once the sealed text is opened: neither holds a value
    opened = [e.model_dump(mode="json") for e in await bus.open_many([data for data, _ in messages])]
    for (data, headers), event, plain in zip(messages, events, opened, strict=True):
        text = "\n".join(strings_in(event) + strings_in(plain) + [data.decode("utf-8", "replace")]
                         + strings_in(headers))
        leaks = [s for s in secrets if pc.leaked(s, text)]
        assert not leaks, (event["type"], leaks[:3])

    anonymized = next(e["data"] for e in opened if e["type"] == "interaction.anonymized")
    assert anonymized["interaction_id"] == recorded.id
    assert anonymized["interaction"]["session_id"] == keyed_hash(raw_ids[0], DEFAULT_ANONYMIZER_KEY.encode())
    counts = anonymized["findings"]["counts"]
    assert counts["SESSION_ID"] == counts["USER_ID"] == 1
    assert {"EMAIL", "PHONE", "PASSWORD", "PRIVATE_KEY", "USERNAME", "JWT"} <= set(counts)
    assert "[EMAIL]" in orjson.dumps(anonymized).decode()


# --------------------------------------------------------------------------- the scrubber's shortcuts

# Windows around phone numbers, dates and times the way agent text has them (logs, pings, page
# ranges, numbers with letters around them, one number after another).
_PHONE_WINDOWS = (
    "2024-05-01 11:08:19,424 WARN call +44 20 7946 0958 now",
    "2024-05-01 11 +1 415 555 2671",
    "20240501 11:08 (415) 555-2671 x12",
    "ping -c 4 127.0.0.1 && curl http://x",
    "tel: 030 901820 / 030 901821",
    "pages 211-227 (2003) then 0151 234 5678",
    "abc8005001234 or 8005001234def or 800 500 1234",
    "3/10/2011 +33 6 12 34 56 78; 31/10/96",
    "12345 - 332-445-1234 is my number",
    "2024-04-22T14:06:54.4 +49 1512 3456789",
    "%4155552671 $4155552671 415.555.2671%",
)


def test_the_stopping_matcher_finds_what_phonenumbers_finds_before_the_stop() -> None:
    """_WindowMatcher stops at the first of the matcher's candidates starting at the stop, _ParseProbe says
    whether any is parsed before it; both must agree with phonenumbers' own matcher at every stop."""
    import phonenumbers

    from flywheel_loop.plugins.privacy.scrubber import _ParseProbe, _WindowMatcher

    found = 0
    for window in _PHONE_WINDOWS:
        for region in ("US", "GB", "DE", "FR", "IN", "AU", "BR", "ES"):
            whole = [
                (h.start, h.end)
                for h in phonenumbers.PhoneNumberMatcher(window, region, leniency=phonenumbers.Leniency.VALID)
            ]
            found += len(whole)
            for stop in range(len(window) + 1):
                stopped = [(h.start, h.end) for h in _WindowMatcher(window, region, stop)]
                # the whole matcher's matches in order, up to (at least) every one starting before the stop
                assert stopped == whole[: len(stopped)], (window, stop, region)
                assert [h for h in whole if h[0] < stop] == [h for h in stopped if h[0] < stop], (window, stop)
                if not _ParseProbe.parses(window, stop):  # no parse: nothing found in any region
                    assert not [h for h in whole if h[0] < stop], (window, stop, region)
    assert found >= 20  # the windows hold numbers the matcher finds


def test_phone_numbers_next_to_time_stamps_are_found() -> None:
    """The time stamps the parse probe skips sit next to numbers that must still be found."""
    cases = {
        "2024-05-01 11:08:19,424 WARN call +44 20 7946 0958 now": "+44 20 7946 0958",
        "2024-05-01 11:08:19 call (415) 555-2671": "(415) 555-2671",
        "2024-04-22T14:06:54.4 +49 1512 3456789": "+49 1512 3456789",
        "[2024-05-01 11:08] phone: 020 7946 0958": "020 7946 0958",
        # the seconds join the candidate ("19 (415) 555-2671", valid nowhere); the number after them is found
        "2024-05-01 11:08:19 (415) 555-2671": "(415) 555-2671",
    }
    for text, number in cases.items():
        out, counts = scrub(text)
        assert number not in out and counts["PHONE"] == 1, (text, out)
        assert "2024-0" in out, out  # the time stamp stays


def test_a_national_number_is_found_in_whichever_configured_region_reads_it() -> None:
    """The regions are parsed one at a time, the matcher run in each valid one until it finds the number:
    numbers valid in several regions whose matcher finds them only in a later one are found too."""
    import phonenumbers

    from flywheel_loop.plugins.privacy.scrubber import DEFAULT_PHONE_REGIONS

    later = 0
    for region in DEFAULT_PHONE_REGIONS:
        for kind in (phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE):
            example = phonenumbers.example_number_for_type(region, kind)
            assert example is not None
            number = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL)
            text = f"call me on {number} today"
            out, counts = scrub(text)
            assert out == "call me on [PHONE] today" and counts == Counter({"PHONE": 1}), (region, text, out)
            valid = [r for r in DEFAULT_PHONE_REGIONS if phonenumbers.is_valid_number(phonenumbers.parse(number, r))]
            first = [r for r in valid if list(phonenumbers.PhoneNumberMatcher(text, r))]
            later += first[0] != valid[0]
    assert later >= 1  # some are found only past the first region they parse in


def test_the_detectors_asked_are_those_the_prefilter_reports(corpus: pc.Corpus) -> None:
    """Candidates.among: each family's detectors that may match, by index, the first and last included."""
    scrubber = Scrubber()
    families = (scrubber._token_keys, scrubber._private_key_keys, scrubber._context_keys, scrubber._keyword_keys)
    seen: set[tuple[int, int]] = set()
    ends = [  # the first and last detector of each family
        "artifactory: AKCp8abcdef1234567890XyZ",
        "HF_TOKEN=hf_" + "aB3dE5gH7jK9mN1pQ3sT5vX7zA9cE1gI3k",
        "-----BEGIN DSA PRIVATE KEY-----\nMIIBuwIBAAKBgQ\n-----END DSA PRIVATE KEY-----",
        '<add key="ApiKey" value="Zr8tWq1Xk9mPq2vL7"/>',
        'dbPassword := "Zr8tWq1Xk9mPq2vL7"',  # Go
    ]
    for text in [sample.text for sample in corpus.samples] + ends:
        at = scrubber._candidates(text)
        assert at.may is not None
        for f, keys in enumerate(families):
            expected = [i for i, key in enumerate(keys) if scrubber._id[key] in at.may]
            assert at.among(keys) == expected, text[:200]
            seen |= {(f, i) for i in expected if i in (0, len(keys) - 1)}
    assert {(f, i) for f, keys in enumerate(families) for i in (0, len(keys) - 1)} <= seen  # the ends
    unfiltered = Scrubber(prefilter=False)._candidates("no prefilter: every detector runs")
    assert unfiltered.among(families[0]) == list(range(len(families[0])))


def test_unquoted_random_strings_are_found_by_their_classes_and_entropy() -> None:
    """An unquoted run needs digits, upper and lower case and a key's entropy; the classes are checked first,
    so a run lacking one is dropped whatever its entropy."""
    from flywheel_loop.plugins.privacy.scrubber import _shannon_entropy

    scrubber = Scrubber()
    rng = random.Random(7)
    value = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(160))
    out, counts = scrubber.scrub(f"the key I pasted: {value[:48]} (do not share)")
    assert value[:48] not in out and counts["HIGH_ENTROPY_SECRET"] == 1, out
    for same_class in (value.lower(), value.upper(), "".join(c for c in value if not c.isdigit())):
        assert _shannon_entropy(scrubber.base64, same_class) > scrubber.base64.entropy_limit
        out, counts = scrubber.scrub(f"the key I pasted: {same_class} (do not share)")
        assert out.endswith(f"{same_class} (do not share)") and not counts, (same_class, out)
