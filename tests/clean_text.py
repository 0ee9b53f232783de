"""Clean text a coding agent sees, to count what a scrubber changes that it should not.

Like ``tests/independent_corpus.py`` this module imports nothing of the scrubber. Its lines:

- **site-packages**: lines of the installed packages' own source files (the environment this
  runs in), picked by a seeded draw over the sorted file list, and lines of their ``RECORD``
  files (paths with urlsafe-base64 SHA-256 digests);
- **tool output** in the shapes pip, git, pytest, docker and kubectl print, filled with the
  installed distributions' real names and versions, real module paths and fresh hashes;
- **identifiers**: Hugging Face model ids, package names, git hashes, UUIDs, ULIDs, digests,
  file paths and other Faker values that name things rather than people.

Lines that do hold personal data are left out, because replacing them is right: an e-mail
address, or an IPv4/IPv6 literal that names a host (not loopback, unspecified, link-local or
reserved); and the packages whose subject is personal data or secrets (Faker, phonenumbers,
python-stdnum, detect-secrets, truffleHogRegexes) are not drawn, their source being made of
sample numbers and keys. Everything else is clean: any change is a false positive.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import random
import re
import sysconfig
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import distributions
from pathlib import Path
from typing import Any

from faker import Faker

__all__ = ["CleanCorpus", "CleanEvaluation", "evaluate", "generate"]

# Packages whose source is sample personal data and secrets, by design.
EXCLUDED_PACKAGES = frozenset({"faker", "phonenumbers", "stdnum", "detect_secrets", "truffleHogRegexes"})
MAX_LINE = 400  # longer lines are data tables and minified code, not what an agent reads

MODEL_IDS = (
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "Qwen/Qwen2.5-Coder-7B-Instruct",
    "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
    "Qwen/Qwen3-8B",
    "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/Meta-Llama-3-70B-Instruct",
    "mistralai/Mistral-7B-Instruct-v0.3",
    "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "microsoft/Phi-3-mini-4k-instruct",
    "microsoft/codebert-base",
    "google/gemma-2-9b-it",
    "google/flan-t5-base",
    "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct",
    "deepseek-ai/deepseek-coder-6.7b-instruct",
    "bigcode/starcoder2-15b",
    "bigcode/the-stack-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
    "sentence-transformers/all-mpnet-base-v2",
    "BAAI/bge-small-en-v1.5",
    "intfloat/multilingual-e5-large",
    "openai/whisper-large-v3",
    "openai-community/gpt2",
    "stabilityai/stable-diffusion-xl-base-1.0",
    "TheBloke/CodeLlama-13B-Instruct-GGUF",
    "bartowski/Qwen2.5-Coder-32B-Instruct-GGUF",
    "unsloth/Llama-3.2-3B-Instruct-bnb-4bit",
    "nomic-ai/nomic-embed-text-v1.5",
    "allenai/OLMo-2-1124-7B",
    "tiiuae/falcon-7b-instruct",
    "EleutherAI/pythia-160m-deduped",
    "Salesforce/codet5p-220m",
    "codellama/CodeLlama-7b-Python-hf",
    "ibm-granite/granite-3.1-8b-instruct",
    "nvidia/Llama-3.1-Nemotron-70B-Instruct-HF",
    "HuggingFaceH4/zephyr-7b-beta",
    "WizardLMTeam/WizardCoder-15B-V1.0",
    "cross-encoder/ms-marco-MiniLM-L-6-v2",
    "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
    "FacebookAI/roberta-large-mnli",
)
OLLAMA_TAGS = ("qwen2.5-coder:7b", "llama3.1:8b-instruct-q4_K_M", "deepseek-coder-v2:16b", "codellama:13b-python",
               "nomic-embed-text:latest", "smollm2:135m", "mistral:7b-instruct-v0.3-q5_K_M")


@dataclass(frozen=True)
class CleanCorpus:
    seed: int
    lines: tuple[tuple[str, str], ...]  # (source, line)
    source: str


@dataclass
class CleanEvaluation:
    total: Counter[str] = field(default_factory=Counter)
    changed: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)  # what replaced the text: "[KIND]" tokens
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (source, before, after)

    @property
    def share(self) -> float:
        return sum(self.changed.values()) / max(1, sum(self.total.values()))


def evaluate(corpus: CleanCorpus, scrub: Callable[[str], tuple[str, Any]]) -> CleanEvaluation:
    result = CleanEvaluation()
    for source, line in corpus.lines:
        result.total[source] += 1
        out, _ = scrub(line)
        if out != line:
            result.changed[source] += 1
            result.classes.update(set(re.findall(r"\[[A-Z0-9_]+\]", out)) - set(re.findall(r"\[[A-Z0-9_]+\]", line)))
            result.examples.append((source, line, out))
    return result


# --------------------------------------------------------------------------- what is not clean

_EMAIL = re.compile(r"[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)*\.[A-Za-z]{2,}")
_IP_CANDIDATE = re.compile(r"[0-9A-Fa-f:.]{7,45}")


def holds_personal_data(line: str) -> bool:
    """An e-mail address or a literal address of a host: replacing those is right."""
    if _EMAIL.search(line):
        return True
    for m in _IP_CANDIDATE.finditer(line):
        try:
            ip = ipaddress.ip_address(m.group(0).strip(".:"))
        except ValueError:
            continue
        if not (ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_reserved or ip.is_multicast):
            return True
    return False


# --------------------------------------------------------------------------- site-packages


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _source_files(root: Path) -> tuple[list[Path], list[Path]]:
    """Every .py file and every RECORD file under ``root``, sorted, excluded packages left out."""
    py: list[Path] = []
    records: list[Path] = []
    for top in sorted(os.listdir(root)):
        if top.split("-")[0] in EXCLUDED_PACKAGES or top.startswith("__editable__"):
            continue
        path = root / top
        if top.endswith(".dist-info"):
            if (path / "RECORD").exists():
                records.append(path / "RECORD")
            continue
        if path.is_file() and top.endswith(".py"):
            py.append(path)
        elif path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                py += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return py, records


# Where context rules fire: the lines of real code most at risk of a false change.
_KEYWORD_LINE = re.compile(r"(?i)pass|pwd|secret|token|api.?key|auth|credential|bearer|private.?key")


def _lines_from(
    rng: random.Random, files: list[Path], want: int, per_file: int, keyword_lines: list[str] | None = None
) -> list[str]:
    """``want`` lines drawn ``per_file`` at a time; each drawn file also gives up to two lines
    holding a secret keyword to ``keyword_lines``."""
    out: list[str] = []
    for path in rng.sample(files, min(len(files), want // per_file + 1)):
        try:
            lines = [x.rstrip() for x in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        except OSError:
            continue
        lines = [x for x in lines if x.strip() and len(x) <= MAX_LINE and not holds_personal_data(x)]
        out += rng.sample(lines, min(per_file, len(lines)))
        if keyword_lines is not None:
            risky = [x for x in lines if _KEYWORD_LINE.search(x)]
            keyword_lines += rng.sample(risky, min(2, len(risky)))
    return out[:want]


# --------------------------------------------------------------------------- tool output


class _Shapes:
    """The lines tools print, filled with real names from this environment."""

    def __init__(self, rng: random.Random, modules: list[str]) -> None:
        self.rng = rng
        self.faker = Faker("en_US")
        self.faker.seed_instance(rng.randrange(2**32))
        dists = sorted({(d.metadata["Name"], d.version) for d in distributions() if d.metadata["Name"]})
        self.dists = [(n, v) for n, v in dists if n.lower().replace("-", "_") not in {"flywheel"}]
        self.modules = modules

    def pick(self, seq: list[str] | tuple[str, ...]) -> str:
        return seq[self.rng.randrange(len(seq))]

    def dist(self) -> tuple[str, str]:
        return self.dists[self.rng.randrange(len(self.dists))]

    def hex(self, n: int) -> str:
        return self.rng.randbytes((n + 1) // 2).hex()[:n]

    def module_path(self) -> str:
        return self.pick(self.modules)

    def func(self) -> str:
        return self.pick(["load", "parse", "test_roundtrip", "test_empty_input", "test_unicode", "fetch",
                          "test_retry_after_timeout", "build", "test_default_config", "collate"])

    def pip(self) -> str:
        (n, v), (m, w) = self.dist(), self.dist()
        size = f"{self.rng.uniform(0.01, 900):.1f} {self.pick(['kB', 'MB'])}"
        tag = self.pick(["py3-none-any", "cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64",
                         "cp311-cp311-musllinux_1_2_x86_64", "cp311-abi3-manylinux_2_28_x86_64"])
        wheel = f"{n.replace('-', '_')}-{v}-{tag}.whl"
        return self.pick([
            f"Collecting {n}=={v}",
            f"Collecting {n}>={v} (from {m}=={w})",
            f"  Downloading {wheel} ({size})",
            f"  Using cached {wheel} ({size})",
            f"Requirement already satisfied: {n}>={v} in ./.venv/lib/python3.11/site-packages (from {m}) ({v})",
            f"Successfully installed {n}-{v} {m}-{w}",
            f"  Created wheel for {n}: filename={wheel} size={self.rng.randint(1000, 10**7)} "
            f"sha256={self.hex(64)}",
            f"  Stored in directory: /root/.cache/pip/wheels/{self.hex(2)}/{self.hex(2)}/{self.hex(60)}",
            f"{n}=={v} \\",
            f"    --hash=sha256:{self.hex(64)}",
            f"  Downloading https://files.pythonhosted.org/packages/{self.hex(2)}/{self.hex(2)}/{self.hex(60)}/{wheel}",
            f"     ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ {size}/{size} "
            f"{self.rng.randint(1, 90)}.{self.rng.randint(0, 9)} MB/s eta 0:00:00",
            f"ERROR: pip's dependency resolver does not currently take into account all the packages that are "
            f"installed. {n} {v} requires {m}<{w}, which is not installed.",
            f"Installing collected packages: {n}, {m}",
            f"{n:<30} {v}",
        ])

    def git(self) -> str:
        short, full = self.hex(7), self.hex(40)
        path = self.module_path()
        words = self.faker.sentence(nb_words=self.rng.randint(3, 7)).rstrip(".")
        return self.pick([
            f"commit {full}",
            f"Merge: {short} {self.hex(7)}",
            f"diff --git a/{path} b/{path}",
            f"index {short}..{self.hex(7)} 100644",
            f"--- a/{path}",
            f"+++ b/{path}",
            f"@@ -{self.rng.randint(1, 900)},{self.rng.randint(1, 30)} +{self.rng.randint(1, 900)},"
            f"{self.rng.randint(1, 30)} @@ def {self.func()}(self):",
            f"   {short}..{self.hex(7)}  main -> main",
            f" + {short}...{self.hex(7)} feat/{self.faker.word()} -> feat/{self.faker.word()} (forced update)",
            f"[main {short}] {words}",
            f"HEAD is now at {short} {words}",
            f"* {short} (HEAD -> main, origin/main) {words}",
            f"{short} {words}",
            f"{full}\trefs/heads/{self.faker.word()}",
            f"remote: Resolving deltas: 100% ({self.rng.randint(1, 90)}/{self.rng.randint(90, 200)}), done.",
            f" {self.rng.randint(1, 20)} files changed, {self.rng.randint(1, 400)} insertions(+), "
            f"{self.rng.randint(1, 200)} deletions(-)",
            f"Switched to a new branch 'fix/{self.faker.word()}-{self.faker.word()}'",
            f" create mode 100644 {path}",
            f"Your branch is ahead of 'origin/main' by {self.rng.randint(1, 9)} commits.",
            f"Cloning into '{self.faker.word()}'...",
            f"To github.com:{self.faker.word()}/{self.faker.word()}.git",
            f"{self.hex(40)} {self.hex(40)} refs/remotes/origin/HEAD",
            f"Fast-forward\n {path} | {self.rng.randint(1, 80)} ++++----",
        ])

    def pytest(self) -> str:
        path = "tests/test_" + self.module_path().rsplit("/", 1)[-1]
        n, f = self.rng.randint(1, 900), self.rng.randint(0, 9)
        return self.pick([
            f"{path}::{self.func()} PASSED{' ' * self.rng.randint(1, 30)}[{self.rng.randint(0, 100):>3}%]",
            f"{path}::{self.func()}[{self.pick(['0', 'utf-8', 'None-True', 'int64-cpu', 'json'])}] FAILED",
            f"FAILED {path}::{self.func()} - AssertionError: assert {n} == {n + 1}",
            f"========== {n} passed, {f} failed, {self.rng.randint(0, 20)} skipped in {self.rng.uniform(0.1, 600):.2f}s"
            " ==========",
            f"platform linux -- Python 3.11.{self.rng.randint(2, 12)}, pytest-9.2.0, pluggy-1.6.0",
            f"rootdir: /workspace/{self.faker.word()}",
            "plugins: asyncio-1.5.0, timeout-2.4.0, hypothesis-6.135.0",
            f"collected {n} items",
            f"{path} ..F.s..{'.' * self.rng.randint(0, 40)}",
            f"E       assert {{'id': {n}, 'ok': True}} == {{'id': {n}, 'ok': False}}",
            f"E       KeyError: '{self.faker.word()}'",
            f"{path}:{self.rng.randint(1, 900)}: in {self.func()}",
            f"    def {self.func()}(tmp_path, monkeypatch):",
            f"  {self.module_path()}:{self.rng.randint(1, 900)}: DeprecationWarning: {self.faker.sentence()}",
            "-- Docs: https://docs.pytest.org/en/stable/how-to/capture-warnings.html",
            f"Hypothesis: seed={self.rng.randint(0, 2**64)}",
            f"Falsifying example: test_roundtrip(data=b'\\x{self.hex(2)}\\x{self.hex(2)}', n={n})",
        ])

    def models(self) -> str:
        model, tag = self.pick(MODEL_IDS), self.pick(OLLAMA_TAGS)
        file = model.split("/")[-1].lower().replace("-gguf", "")
        return self.pick([
            f'model = AutoModelForCausalLM.from_pretrained("{model}", torch_dtype=torch.bfloat16)',
            f'tokenizer = AutoTokenizer.from_pretrained("{model}")',
            f"huggingface-cli download {model} --local-dir models/{file}",
            f"  model: {model}",
            f'MODEL_ID = "{model}"',
            f"https://huggingface.co/{model}/resolve/main/config.json",
            f"Loading checkpoint shards: 100%|██████████| {self.rng.randint(1, 8)}/{self.rng.randint(1, 8)} "
            f"[00:0{self.rng.randint(1, 9)}<00:00,  1.2it/s]",
            f"ollama pull {tag}",
            f"llama-server -m models/{file}-q4_k_m.gguf --port 8080 -c 4096",
            f'{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}]}}',
            f"SentenceTransformer('{model}')",
            f"{model}: {self.rng.uniform(20, 90):.1f} on HumanEval",
            f"vllm serve {model} --max-model-len 8192",
            f"pipeline('text-generation', model='{model}', device_map='auto')",
        ])

    def identifiers(self) -> str:
        u = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        n, v = self.dist()
        ulid = "01" + "".join(self.pick("0123456789ABCDEFGHJKMNPQRSTVWXYZ") for _ in range(24))
        return self.pick([
            f'request_id = "{u}"',
            f"event_id={ulid} type=interaction.recorded",
            f"trace_id={self.hex(32)} span_id={self.hex(16)}",
            f"image: ghcr.io/{self.faker.word()}/{self.faker.word()}@sha256:{self.hex(64)}",
            f"docker pull python:3.11-slim@sha256:{self.hex(64)}",
            f"{self.hex(64)}  {n}-{v}.tar.gz",
            f"{self.hex(32)}  {self.faker.file_name()}",
            f"pod/{self.faker.word()}-api-{self.hex(10)}-{self.hex(5)}   1/1     Running   0   "
            f"{self.rng.randint(1, 90)}m",
            f"arn:aws:s3:::{self.faker.word()}-{self.faker.word()}-{self.rng.randint(100, 999)}/exports/{u}.parquet",
            f"import {self.pick(self.modules).split('/')[0]}",
            f'    "{n}": "^{v}",',
            f"{n}=={v}",
            f"{self.faker.file_path(depth=self.rng.randint(1, 5))}",
            f"/opt/venv/lib/python3.11/site-packages/{self.module_path()}",
            f"Content-Type: {self.faker.mime_type()}",
            f"User-Agent: {self.faker.user_agent()}",
            f"X-Request-ID: {u}",
            f'ETag: W/"{self.hex(40)}"',
            f"  {self.faker.word()}_id: {u}",
            f"cache key: {n}-{self.hex(16)}-{v}",
            f"job {u} finished in {self.rng.uniform(0.1, 99):.2f}s",
            f"checkpoint-{self.rng.randint(100, 90000)}/adapter_model.safetensors",
            f"dataset sha256:{self.hex(64)} rows={self.rng.randint(100, 10**6)}",
            f"Session {self.hex(32)} expired",
        ])


def generate(seed: int = 0, site_lines: int = 6000, shaped_lines: int = 4000) -> CleanCorpus:
    """``site_lines`` lines from site-packages and ``shaped_lines`` tool-output and id lines."""
    rng = random.Random(seed)
    root = _site_packages()
    py, records = _source_files(root)
    modules = [str(p.relative_to(root)) for p in py]
    risky: list[str] = []
    lines = [("site-packages source", x) for x in _lines_from(rng, py, site_lines * 9 // 10, 6, risky)]
    lines += [("site-packages keyword lines", x) for x in risky]
    lines += [("site-packages RECORD", x) for x in _lines_from(rng, records, site_lines // 10, per_file=4)]
    shapes = _Shapes(rng, modules)
    makers: list[tuple[str, Callable[[], str]]] = [
        ("pip output", shapes.pip),
        ("git output", shapes.git),
        ("pytest output", shapes.pytest),
        ("model ids", shapes.models),
        ("identifiers", shapes.identifiers),
    ]
    for i in range(shaped_lines):
        name, make = makers[i % len(makers)]
        for line in make().split("\n"):
            if not holds_personal_data(line):
                lines.append((name, line))
    digest = hashlib.sha256("\n".join(modules).encode()).hexdigest()[:12]
    src = (
        f"{root} ({len(py)} source files, {len(records)} RECORD files, list sha256 {digest}), "
        f"pip/git/pytest/model-id/identifier shapes with {len(shapes.dists)} installed distributions"
    )
    return CleanCorpus(seed, tuple(lines), src)
