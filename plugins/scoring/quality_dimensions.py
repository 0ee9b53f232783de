"""Built-in assessor: multi-dimensional quality of one interaction.

Dimensions (weights in ``assessment.dimension_weights.quality_dimensions``; by default
0.30 / 0.25 / 0.20 / 0.15 / 0.10):

- ``satisfaction``: explicit rating and thumbs, the implicit accept / modify / reject /
  abandon, and how fast the answer was accepted. Needs feedback.
- ``correctness``: compiles, test pass rate, runtime and type errors. Needs an outcome.
- ``code_quality``: measured on the Python code in the answer: does it parse (if not, 0),
  lint findings per line, and the highest cyclomatic complexity of its functions. Needs
  Python code in the answer. The lint rules are a small ``ast`` re-implementation of ruff
  rules (F401, F403, E711, E712, E722, E731, E741, B006) in one walk of the tree: running
  ruff itself costs 4-5 ms median, 7-8 ms p99 per call (a subprocess), over the 5 ms
  budget, so ruff is the optional ``ruff_lint`` assessor. Measured by
  ``bash ops/bench/assess --json``: 0.2 ms p99 for both built-ins on the worked example,
  3.2 ms p99 on a 318-line answer.
- ``relevance``: how much of what the request names (identifiers, backticked terms; else
  its content words) the answer takes up.
- ``efficiency``: time, tokens, tool calls and cost spent on the answer.

Satisfaction and correctness arrive late; the confidence (their weight share) rises as
they do. Every rule here is a pure function of the evidence, so re-scoring is exact.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from flywheel_loop.engine.assessment import Assessment, Assessor, Evidence
from flywheel_loop.schemas import FeedbackGiven, InteractionRecorded, OutcomeObserved

VERSION = "1.0.0"

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD = re.compile(r"[a-z][a-z0-9]{3,}")
# What _key_terms looks for, compiled once: it runs on every word of every request scored.
_BACKTICKED = re.compile(r"`([^`]+)`")
_CODE_WORD = re.compile(r"[\w./]+\(?")
_FILE_SUFFIX = re.compile(r"\.\w{1,4}$")
_CAMEL = re.compile(r"[a-z][A-Z]")
_STOPWORDS = frozenset(
    {
        "that",
        "this",
        "with",
        "from",
        "have",
        "must",
        "should",
        "would",
        "could",
        "into",
        "when",
        "then",
        "than",
        "them",
        "they",
        "their",
        "there",
        "what",
        "which",
        "where",
        "while",
        "your",
        "also",
        "only",
        "each",
        "every",
        "some",
        "such",
        "make",
        "does",
        "done",
        "will",
        "write",
        "function",
        "return",
        "returns",
        "using",
        "used",
        "like",
        "just",
        "more",
        "most",
        "other",
        "over",
        "same",
        "very",
    }
)

# ------------------------------------------------------------------ the code in the answer


def python_code(interaction: InteractionRecorded) -> list[str]:
    """The Python blocks of an answer: fenced blocks tagged Python (or untagged in a Python
    context), or the whole answer when it has no fence, the context is Python and it parses."""
    language = (interaction.context.language or "").lower()
    blocks = []
    for tag, body in _FENCE.findall(interaction.output):
        tag = tag.lower()
        if tag in _PYTHON_TAGS or (not tag and language in _PYTHON_TAGS):
            blocks.append(body)
    if not blocks and "```" not in interaction.output and language in _PYTHON_TAGS:
        try:
            ast.parse(interaction.output)
        except (SyntaxError, ValueError):
            return []
        blocks.append(interaction.output)
    return [b for b in blocks if b.strip()]


_BRANCHES = (
    ast.If, ast.For, ast.AsyncFor, ast.While, ast.IfExp, ast.ExceptHandler,
    ast.Assert, ast.match_case,
)  # fmt: skip
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_MUTABLE = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)


@dataclass
class CodeFacts:
    """What one walk over a module finds: lint findings (rule codes) and the McCabe
    complexity of each function (index 0: the module's own top-level code)."""

    findings: list[str] = field(default_factory=list)
    complexity: list[int] = field(default_factory=lambda: [1])


def analyse(tree: ast.Module) -> CodeFacts:
    """Lint findings (an ``ast`` subset of ruff's default rules, plus B006) and cyclomatic
    complexity, in a single walk: this runs inside the 5 ms budget, so it walks once.

    A function's complexity is 1 + its decision points (branches, loops, handlers, asserts,
    match cases, comprehension ``for``/``if`` clauses, extra ``and``/``or`` operands), not
    counting nested functions, which are measured on their own.
    """
    facts = CodeFacts()
    used: set[str] = set()
    exported: set[str] = set()
    imported: list[str] = []
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:
        node, owner = stack.pop()
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Store) and node.id in ("l", "O", "I"):
                facts.findings.append("E741")
            used.add(node.id)
            continue
        if isinstance(node, _FUNCTIONS):
            defaults = [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]
            facts.findings += ["B006" for d in defaults if isinstance(d, _MUTABLE)]
            facts.complexity.append(1)
            owner = len(facts.complexity) - 1
        elif isinstance(node, _BRANCHES):
            facts.complexity[owner] += 1
        elif isinstance(node, ast.comprehension):
            facts.complexity[owner] += 1 + len(node.ifs)
        elif isinstance(node, ast.BoolOp):
            facts.complexity[owner] += len(node.values) - 1
        elif isinstance(node, ast.Import):
            imported += [(a.asname or a.name).split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            if any(a.name == "*" for a in node.names):
                facts.findings.append("F403")
            imported += [a.asname or a.name for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Compare):
            for op, right in zip(node.ops, node.comparators, strict=True):
                if isinstance(op, (ast.Eq, ast.NotEq)) and isinstance(right, ast.Constant):
                    if right.value is None:
                        facts.findings.append("E711")
                    elif isinstance(right.value, bool):
                        facts.findings.append("E712")
        elif isinstance(node, ast.Assign):
            if isinstance(node.value, ast.Lambda):
                facts.findings.append("E731")
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                names = (c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant))
                exported |= {n for n in names if isinstance(n, str)}
        if isinstance(node, ast.ExceptHandler) and node.type is None:
            facts.findings.append("E722")
        stack.extend((child, owner) for child in ast.iter_child_nodes(node))
    facts.findings += ["F401" for name in imported if name not in used and name not in exported]
    return facts


def lint_score(findings: int, source: str) -> float:
    """1 / (1 + 5 x findings per line of code): one finding in 20 lines gives 0.8."""
    lines = sum(1 for line in source.splitlines() if line.strip() and not line.strip().startswith("#"))
    return 1.0 / (1.0 + 5.0 * findings / max(lines, 1))


def code_quality(source: str) -> float:
    """0 if it does not parse; else the mean of the lint score and a complexity score (1 up
    to 5, falling linearly to 0 at 20, where a function is hard to test)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return 0.0
    facts = analyse(tree)
    lint = lint_score(len(facts.findings), source)
    complexity = min(1.0, max(0.0, 1.0 - (max(facts.complexity) - 5) / 15))
    return (lint + complexity) / 2


# ------------------------------------------------------------------ the other dimensions


def satisfaction(feedback: FeedbackGiven) -> float | None:
    """Weighted mean of what the human said (weight 2 each), did (1.5) and how fast (0.5)."""
    signals: list[tuple[float, float]] = []
    if feedback.rating is not None:
        signals.append(((feedback.rating - 1) / 4, 2.0))
    if feedback.thumbs is not None:
        signals.append((1.0 if feedback.thumbs == "up" else 0.0, 2.0))
    implicit = feedback.implicit
    if implicit is None and feedback.correction:
        implicit = "modified"  # a correction is a modification, whether or not it was said
    if implicit is not None:
        signals.append(({"accepted": 1.0, "modified": 0.6}.get(implicit, 0.0), 1.5))
        if implicit in ("accepted", "modified") and feedback.time_to_accept_s is not None:
            signals.append((1.0 / (1.0 + feedback.time_to_accept_s / 120.0), 0.5))  # 2 min: 0.5
    if not signals:
        return None
    return sum(s * w for s, w in signals) / sum(w for _, w in signals)


def correctness(outcome: OutcomeObserved) -> float | None:
    """Weighted mean of the test pass rate (2), compiling (1), runtime errors (1) and type
    errors (0.5); an error count n scores 1 / (1 + n)."""
    signals: list[tuple[float, float]] = []
    ran = (outcome.tests_passed or 0) + (outcome.tests_failed or 0)
    if ran > 0:
        signals.append(((outcome.tests_passed or 0) / ran, 2.0))
    if outcome.compiles is not None:
        signals.append((1.0 if outcome.compiles else 0.0, 1.0))
    if outcome.runtime_errors is not None:
        signals.append((1.0 / (1 + outcome.runtime_errors), 1.0))
    if outcome.type_errors is not None:
        signals.append((1.0 / (1 + outcome.type_errors), 0.5))
    if not signals:
        return None
    return sum(s * w for s, w in signals) / sum(w for _, w in signals)


def _key_terms(text: str) -> set[str]:
    """What a request names: the identifiers in backticked terms, and code-shaped words
    (snake_case, CamelCase, calls). File paths are left out: they say where the answer
    goes, not what it must use."""
    terms: set[str] = set()
    for span in _BACKTICKED.findall(text):
        terms |= {t.lower() for t in _IDENTIFIER.findall(span) if len(t) > 2 and t.lower() not in _STOPWORDS}
    for word in _CODE_WORD.findall(text):
        if "/" in word or _FILE_SUFFIX.search(word):
            continue
        if "_" in word.strip("_") or _CAMEL.search(word) or word.endswith("("):
            terms |= {t.lower() for t in _IDENTIFIER.findall(word) if len(t) > 2}
    return terms


def relevance(interaction: InteractionRecorded) -> float:
    """Share of the request's key terms the answer uses (or of its content words, up to 10,
    when it names none); an empty answer scores 0."""
    if not interaction.output.strip():
        return 0.0
    answer = interaction.output.lower()
    answer_words = {w.lower() for w in _IDENTIFIER.findall(interaction.output)}
    terms = _key_terms(interaction.input)
    if terms:
        return sum(1 for t in terms if t in answer_words or t in answer) / len(terms)
    words = set(_WORD.findall(interaction.input.lower())) - _STOPWORDS
    if not words:
        return 1.0  # nothing to be relevant to
    return min(1.0, len(words & answer_words) / min(10, len(words)))


def efficiency(interaction: InteractionRecorded) -> float:
    """Mean of decaying scores: 30 s, 2,000 completion tokens, 10 tool calls or 1 cent each
    halve their part."""
    parts = [1.0 / (1.0 + len(interaction.tool_calls) / 10.0)]
    if interaction.duration_ms is not None:
        parts.append(1.0 / (1.0 + interaction.duration_ms / 30_000.0))
    if interaction.tokens.completion:
        parts.append(1.0 / (1.0 + interaction.tokens.completion / 2_000.0))
    if interaction.cost_usd is not None:
        parts.append(1.0 / (1.0 + interaction.cost_usd / 0.01))
    return sum(parts) / len(parts)


def assess(evidence: Evidence) -> Assessment | None:
    interaction = evidence.interaction
    recorded = interaction.interaction
    scores: dict[str, float] = {"relevance": relevance(recorded), "efficiency": efficiency(recorded)}
    blocks = python_code(recorded)
    if blocks:
        scores["code_quality"] = sum(code_quality(b) for b in blocks) / len(blocks)
    feedback = evidence.latest_feedback()
    if feedback is not None and (value := satisfaction(feedback)) is not None:
        scores["satisfaction"] = value
    outcome = evidence.latest_outcome()
    if outcome is not None and (value := correctness(outcome)) is not None:
        scores["correctness"] = value
    return Assessment(scores=scores, version=VERSION)


ASSESSOR = Assessor("quality_dimensions", assess, VERSION)
