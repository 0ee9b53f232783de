"""The evaluator and its gate: figures, verdicts, and a tiny model that knows some answers.

The tiny base model (random Llama weights with the SmolLM2 tokenizer, then fully fine-tuned for
a few seconds on the right answers) stands for the model in service: an adapter trained on
wrong answers must be rejected, one trained on the right answers must pass, both measured on
the same held-out right answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from flywheel_loop.engine.config import load_settings
from flywheel_loop.engine.plugin_host import PluginHost
from flywheel_loop.plugins import evaluation as evaluation_feature
from flywheel_loop.plugins import serving
from flywheel_loop.plugins.evaluation import known
from flywheel_loop.plugins.evaluation.evaluator import evaluate_run
from flywheel_loop.plugins.evaluation.gate import GateResult, verdict
from flywheel_loop.plugins.evaluation.metrics import ItemLoss, canary_leaks, forgetting_rate
from flywheel_loop.plugins.evaluation.settings import EvaluatorConfig
from flywheel_loop.plugins.evaluation.stats import Paired, mcnemar_p, newcombe_paired, wilson
from flywheel_loop.plugins.training.trainer import train_dataset
from flywheel_loop.schemas import EvaluationCompleted, SuiteResults, TrainingCompleted, new_event
from tests.conftest import read_log, wait_for
from tests.test_trainer import ROWS, formatter, tiny_model_dir, tiny_sections  # noqa: F401  (fixtures)

WRONG = [
    ("What is 2 + 2?", "zebra quartz violin 77 ###"),
    ("Write a Python function that adds two numbers.", "banana ::: lorem ipsum >>> 3 3 3"),
    ("Name a prime number.", "purple elephant dances slowly ~~~"),
    ("How do I reverse a list in Python?", "qwerty asdf zxcv 0000 !!!"),
    ("What does `len` return?", "moonlight sonata in the kitchen"),
    ("Say hello.", "xylophone xylophone xylophone"),
]
ADD_TESTS = "def test_add():\n    assert add(2, 3) == 5\n"


# --------------------------------------------------------------------------- the gate alone


def figures(**over: Any) -> dict[str, Any]:
    base = {"task_pass_rate": 50.0, "held_out_loss": 1.0, "forgetting_rate": 0.0, "forgetting_items": 20,
            "canary_leaks": 0, "canary_prompts": 10, "ms_per_token": 10.0}
    return {**base, **over}


def paired(both: int, cand_only: int, base_only: int, neither: int) -> Paired:
    """Synthetic paired outcomes in that table."""
    cand = [True] * both + [True] * cand_only + [False] * base_only + [False] * neither
    base = [True] * both + [False] * cand_only + [True] * base_only + [False] * neither
    return Paired.of(cand, base)


#: a task set the candidate matches (no pair differs) on enough items, and a suite it forgets nothing of
SAME_TASKS = paired(300, 0, 0, 300)
KEPT_SUITE = paired(20, 0, 0, 20)


def gate(cand: dict[str, Any] | None = None, base: dict[str, Any] | None = None, cfg: EvaluatorConfig | None = None,
         tasks: Paired | None = SAME_TASKS, suite: Paired | None = KEPT_SUITE) -> GateResult:
    return verdict(cand or figures(), base or figures(), cfg or EvaluatorConfig(), tasks, suite)


def test_the_gate_passes_a_candidate_within_every_limit() -> None:
    result = gate(figures(held_out_loss=1.04, forgetting_rate=0.29))
    assert result.verdict == "passed" and result.passed, result.reasons
    assert {c.name: c.status for c in result.checks if c.status != "ok"} == {"forgetting (loss)": "reported"}
    (task,) = [c for c in result.checks if c.name == "task pass rate"]
    assert task.items == 600 and task.low is not None and task.high is not None
    assert -0.02 < task.low < 0 < task.high


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"held_out_loss": 1.06}, "held-out loss"),
        ({"canary_leaks": 1}, "canary"),
    ],
)
def test_the_gate_fails_a_candidate_past_a_limit_and_says_which(change: dict[str, Any], word: str) -> None:
    result = gate(figures(**change))
    assert result.verdict == "failed" and not result.passed
    (failed,) = [r for r in result.reasons if r.startswith("failed: ")]
    assert word in failed


def test_loss_forgetting_gates_only_where_the_suite_could_not_measure_forgetting() -> None:
    worse = figures(forgetting_rate=0.3)
    # the suite measured forgetting (20 problems solved in service, none lost): the loss figure is shown, not gated
    shown = gate(worse)
    assert shown.verdict == "passed", shown.reasons
    (loss,) = [c for c in shown.checks if c.name == "forgetting (loss)"]
    assert loss.status == "reported" and loss.value == 0.3 and loss.items == 20 and "not gated" in loss.detail
    # the model in service solved too few suite problems (or there is no suite): the loss figure gates
    for unmeasured in (gate(worse, suite=paired(2, 0, 0, 38)), gate(worse, cfg=EvaluatorConfig(suite=None))):
        assert unmeasured.verdict == "failed"
        (failed,) = [r for r in unmeasured.reasons if r.startswith("failed: ")]
        assert "forgetting rate" in failed
    # configured to gate always: it fails the candidate beside a suite that kept everything
    assert gate(worse, cfg=EvaluatorConfig(loss_forgetting="gate")).verdict == "failed"
    # a reported figure never makes a verdict: the same candidate is inconclusive for its other checks only
    assert gate(worse, tasks=paired(3, 1, 1, 4)).verdict == "inconclusive"
    # and the suite still refuses what it shows lost
    assert gate(figures(forgetting_rate=0.0), suite=paired(0, 0, 8, 32)).verdict == "failed"


def test_paired_tasks_a_clearly_better_candidate_passes_a_clearly_worse_one_fails_a_small_tie_is_inconclusive(
) -> None:
    better = gate(tasks=paired(10, 15, 1, 14))
    assert better.verdict == "passed", better.reasons
    (check,) = [c for c in better.checks if c.name == "task pass rate"]
    assert check.low is not None and check.low > 0 and check.items == 40
    assert check.p_value is not None and check.p_value < 0.001  # 15 vs 1 discordant pairs

    worse = gate(tasks=paired(10, 1, 15, 14))
    assert worse.verdict == "failed", worse.reasons
    (check,) = [c for c in worse.checks if c.name == "task pass rate"]
    assert check.status == "failed" and check.high is not None and check.high < 0
    assert "significantly fewer" in check.detail

    tie = gate(tasks=paired(3, 1, 1, 4))  # 9 tasks, as many won as lost
    assert tie.verdict == "inconclusive", tie.reasons
    (check,) = [c for c in tie.checks if c.name == "task pass rate"]
    assert check.status == "inconclusive" and check.items == 9 and check.value == 0
    # enough items now, but a draw on 9 tasks cannot show the candidate loses at most 2 points
    assert gate(tasks=paired(3, 1, 1, 4), cfg=EvaluatorConfig(min_task_items=5)).verdict == "inconclusive"
    # a task set smaller than configured is inconclusive even when every pair agrees
    assert gate(tasks=paired(4, 0, 0, 4)).verdict == "inconclusive"


def test_suite_forgetting_refuses_a_candidate_that_lost_significantly() -> None:
    lost = gate(suite=paired(0, 0, 8, 32))  # the model in service solved 8, the candidate none of them
    assert lost.verdict == "failed"
    (check,) = [c for c in lost.checks if c.name == "forgetting (suite)"]
    assert check.status == "failed" and check.value == 1.0 and check.items == 8
    assert check.low is not None and check.low > 0.3
    few = gate(suite=paired(2, 0, 1, 37))  # solved 3 < min_suite_solved: nothing measurable
    assert few.verdict == "inconclusive"
    assert [c.status for c in few.checks if c.name == "forgetting (suite)"] == ["inconclusive"]
    unsure = gate(suite=paired(7, 0, 1, 32))  # lost 1 of 8: the interval reaches past 0.3
    assert [c.status for c in unsure.checks if c.name == "forgetting (suite)"] == ["inconclusive"]
    assert [c.status for c in gate(cfg=EvaluatorConfig(suite=None)).checks if "suite" in c.name] == []


def test_an_unmeasured_figure_is_never_ok() -> None:
    unmeasured = gate(figures(task_pass_rate=None, forgetting_rate=None, held_out_loss=None, canary_leaks=None,
                              ms_per_token=None), figures(task_pass_rate=None, ms_per_token=None),
                      EvaluatorConfig(max_latency_ratio=2.0), tasks=None, suite=None)
    assert unmeasured.verdict == "inconclusive" and not unmeasured.passed
    assert {c.name: c.status for c in unmeasured.checks} == {
        "task pass rate": "inconclusive", "forgetting (suite)": "inconclusive", "forgetting (loss)": "inconclusive",
        "held-out loss": "inconclusive", "canary": "inconclusive", "latency": "inconclusive"}
    assert all(r.startswith("inconclusive: ") for r in unmeasured.reasons)
    # one unmeasured figure is enough to keep an otherwise good candidate from "passed"
    assert gate(figures(canary_leaks=None)).verdict == "inconclusive"
    # and a failed check outweighs an inconclusive one
    assert gate(figures(canary_leaks=None, held_out_loss=2.0)).verdict == "failed"
    # what is configured off is not a check: a candidate within the remaining limits passes
    off = EvaluatorConfig(gate_tasks=False, suite_sample=0, canary_check=False)
    assert gate(tasks=None, suite=None, cfg=off).verdict == "passed"
    assert [c.name for c in gate(cfg=off).checks] == ["forgetting (loss)", "held-out loss"]
    strict = EvaluatorConfig(max_latency_ratio=1.5)
    assert gate(figures(ms_per_token=16.0), cfg=strict).verdict == "failed"


def test_the_statistics_match_known_values() -> None:
    # exact McNemar: 1 of 10 discordant pairs one way: 2 * P(X <= 1 | n=10, p=1/2) = 2 * 11/1024
    assert mcnemar_p(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0
    # Wilson 95 % for 0/10 is [0, 0.2775]; for 5/10 [0.2366, 0.7634]
    assert wilson(0, 10) == (pytest.approx(0.0, abs=1e-12), pytest.approx(0.2775, abs=1e-4))
    assert wilson(5, 10) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    # Newcombe's paired interval: around the difference, inside [-1, 1], narrower with more items
    diff, low, high = newcombe_paired(12, 9, 2, 21)
    assert diff == pytest.approx(7 / 44) and 0 < low < diff < high < 1
    assert newcombe_paired(6, 0, 0, 6)[1] < newcombe_paired(60, 0, 0, 60)[1] < 0
    assert newcombe_paired(0, 0, 0, 0) == (0.0, -1.0, 1.0)
    with pytest.raises(ValueError, match="as many"):
        Paired((True,), ())


def test_old_evaluation_events_still_read() -> None:
    old = EvaluationCompleted.model_validate({"run_id": "r", "role": "coder", "passed": True, "reasons": ["ok"]})
    assert old.verdict is None and old.outcome == "passed" and old.checks == []
    assert EvaluationCompleted(run_id="r", role="coder", passed=False).outcome == "failed"
    with pytest.raises(ValueError, match="contradicts"):
        EvaluationCompleted(run_id="r", role="coder", passed=True, verdict="inconclusive")


def test_known_solved_problems_come_from_the_log_and_the_shipped_calibration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def evaluation(adapter: str, service: str, cand: list[str], serv: list[str], suite: str = "coding_suite") -> Any:
        results = SuiteResults(suite=suite, service=service, problems=sorted({*cand, *serv, "p-unsolved"}),
                               candidate_solved=cand, service_solved=serv)
        data = EvaluationCompleted(run_id=f"run-{adapter}", role="coder", adapter_hash=adapter, passed=False,
                                   verdict="failed", suite_results=results)
        return new_event(data, source="test")

    events = list(enumerate([
        evaluation("a" * 64, "base-model", cand=["p1", "p2"], serv=["p1", "p3"]),
        evaluation("b" * 64, "a" * 64, cand=["p4"], serv=["p2", "p5"]),
        evaluation("c" * 64, "a" * 64, cand=["p9"], serv=["p6"], suite="other"),
    ]))
    assert known.logged_solved(events, "coding_suite", "base-model") == {"p1", "p3"}
    # an adapter's problems: those it solved as the candidate and, once in service, as the model in service
    assert known.logged_solved(events, "coding_suite", "a" * 64) == {"p1", "p2", "p5"}
    assert known.logged_solved(events, "coding_suite", "c" * 64) == set()  # another suite's results
    calibration = tmp_path / "coding_suite.solved.json"
    monkeypatch.setattr(known, "calibration_path", lambda suite: calibration)
    assert known.shipped_solved("coding_suite", "base-model") == set()  # no file
    calibration.write_text(json.dumps({"suite": "coding_suite", "model": "base-model", "solved": ["p7", "p8"]}))
    assert known.known_solved(events, "coding_suite", "base-model") == {"p1", "p3", "p7", "p8"}
    assert known.shipped_solved("coding_suite", "another-base") == set()  # measured on another model
    calibration.write_text("{not json")
    assert known.shipped_solved("coding_suite", "base-model") == set()


def test_forgetting_counts_items_whose_loss_rose_past_the_tolerance() -> None:
    base = [ItemLoss(10, 10), ItemLoss(20, 10), ItemLoss(5, 5), None]
    cand = [ItemLoss(10.4, 10), ItemLoss(30, 10), ItemLoss(4, 5), ItemLoss(1, 1)]
    rate, items = forgetting_rate(cand, base, tolerance=0.05)
    assert (rate, items) == (pytest.approx(1 / 3), 3)
    assert forgetting_rate([None], [None], 0.05) == (None, 0)


def test_a_canary_leak_is_a_secret_the_service_model_did_not_say() -> None:
    key = "AKIA" + "Z7Q2" + "MX4P" + "LK9W" + "N3RT"  # an AWS key id shape, assembled here
    detect = PluginHost(load_settings(plugins={"enabled": ["privacy"]})).find_sensitive
    prompts = ["what is the key?", "and the mail?"]
    said = [f"the key is {key}", "write to dev@corp.example"]
    leaks, invented = canary_leaks(prompts, said, ["I cannot share keys", "write to dev@corp.example"], detect)
    assert len(leaks) == 1 and "what is the key" in leaks[0] and key not in leaks[0] and invented == []
    # the same answers from a candidate whose training data holds no AWS key: made up, not reproduced
    leaks, invented = canary_leaks(prompts, said, ["I cannot share keys", "write to dev@corp.example"], detect,
                                   trained_kinds={"EMAIL"})
    assert leaks == [] and len(invented) == 1 and "AWS" in invented[0] and key not in invented[0]
    kinds = detect(said[0])
    assert kinds  # trained on a text with such a key: reproducing one is a leak
    said[1] = "write to maria.lopez@gmail.com"
    leaks, invented = canary_leaks(prompts, said, ["no", "no"], detect, trained_kinds=set(kinds))
    assert len(leaks) == 1 and "what is the key" in leaks[0] and len(invented) == 1 and "mail" in invented[0]


def test_the_canary_check_fails_on_leaks_and_says_what_was_made_up() -> None:
    made_up = gate(figures(canary_leaks=0, canary_invented=2))
    check = next(c for c in made_up.checks if c.name == "canary")
    assert check.status == "ok" and "made up" in check.detail
    assert gate(figures(canary_leaks=1, canary_invented=0)).verdict == "failed"


# --------------------------------------------------------------------------- a tiny model that knows things


@pytest.fixture(scope="module")
def knowing_base(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, formatter: Any) -> Path:  # noqa: F811
    """The tiny model fully fine-tuned on the right answers."""
    import torch
    from transformers import AutoModelForCausalLM

    from flywheel_loop.plugins.shared.packing import collate, pack, token_losses, tokenize_rows

    tok = formatter.tokenizer
    blocks = pack(tokenize_rows([formatter.conversation(p, c) for p, c in ROWS], tok, 256), 4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        total, count = token_losses(model, collate(blocks, tok.pad_token_id), False)
        (total / count).backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("knowing-base")
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def write_eval_dataset(root: Path, formatter: Any,  # noqa: F811
                       train: list[tuple[str, str]], name: str) -> tuple[str, Path]:
    """A dataset folder as the builder writes it: ``train`` to learn, two of its rows held out
    (the code one with tests), and the right answers as the forgetting set (earlier tasks)."""
    digest = (name.encode().hex() * 64)[:64]
    folder = root / "datasets" / digest
    folder.mkdir(parents=True)

    def rows(pairs: list[tuple[str, str]], split: str) -> bytes:
        out = []
        for i, (p, c) in enumerate(pairs):
            row = {**formatter.conversation(p, c), "id": f"{split}{i}", "rehearsal": False}
            if "adds two numbers" in p and split == "validation":
                row["tests"] = ADD_TESTS
            out.append(orjson.dumps(row) + b"\n")
        return b"".join(out)

    (folder / "train.jsonl").write_bytes(rows(train, "train"))
    (folder / "validation.jsonl").write_bytes(rows(train[:2], "validation"))
    (folder / "forgetting.jsonl").write_bytes(rows(ROWS, "forgetting"))
    (folder / "manifest.json").write_text(json.dumps({"role": "coder"}))
    return digest, folder


GENERAL = [("What is the capital of France?", "The capital of France is Paris."),
           ("How many days are there in a week?", "There are seven days in a week.")]


def general_file(folder: Path) -> Path:
    """A small set of general prompts (the tiny model knows no general facts: the forgetting set is
    mostly the earlier tasks here)."""
    path = folder / "general.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in GENERAL))
    return path


def eval_settings(tmp_path: Path, base: Path, **trainer: Any) -> Any:
    return load_settings(state_dir=tmp_path / "state", **tiny_sections(base, epochs=4, lr=5e-3, **trainer),
                         evaluator={"max_new_tokens": 24, "canary_max_new_tokens": 8, "canary_from_train": 2,
                                    "general_prompts": general_file(tmp_path), "suite_sample": 3,
                                    "suite_max_new_tokens": 8, "progress_every_s": 0.2})


def test_an_adapter_trained_on_wrong_answers_is_rejected_and_one_on_right_answers_fails_nothing(
    tmp_path: Path, formatter: Any, knowing_base: Path  # noqa: F811
) -> None:
    settings = eval_settings(tmp_path, knowing_base)
    outcomes = {}
    progress: dict[str, list[Any]] = {}
    for name, pairs in (("wrong", WRONG), ("right", ROWS)):
        digest, folder = write_eval_dataset(settings.state_dir, formatter, pairs, name)
        done = train_dataset(settings, "coder", digest, folder)
        assert isinstance(done, TrainingCompleted), done
        progress[name] = []
        # a recorded task with tests that no version trained on joins the held-out one
        recorded = [("rec-1", "Write a Python function that adds two numbers.", ADD_TESTS),
                    ("train0", "trained on: left out", ADD_TESTS)]
        outcomes[name] = evaluate_run(settings, done, recorded=recorded, emit=progress[name].append)

    wrong, right = outcomes["wrong"], outcomes["right"]
    assert not wrong.passed and wrong.verdict == "failed", wrong.reasons
    failed = " ".join(r for r in wrong.reasons if r.startswith("failed: "))
    assert "forgetting rate" in failed
    assert wrong.candidate["forgetting_rate"] >= 0.3
    # the right one fails nothing; with 2 tasks and a suite the tiny model cannot solve it is not "passed" either
    assert right.verdict == "inconclusive" and not right.passed, right.reasons
    assert not [r for r in right.reasons if r.startswith("failed: ")]
    for outcome in (wrong, right):
        assert outcome.candidate["task_examples"] == outcome.baseline["task_examples"] == 2
        assert outcome.candidate["task_recorded"] == 1
        assert outcome.candidate["suite_problems"] == outcome.baseline["suite_problems"] == 3
        checks = {c.name: c for c in outcome.checks}
        assert checks["task pass rate"].status == "inconclusive" and checks["task pass rate"].items == 2
        assert checks["forgetting (suite)"].status == "inconclusive"  # the model in service solved none
        assert [f"{c.status}: {c.detail}" for c in outcome.checks] == outcome.reasons
        assert outcome.baseline["model"] == "base"
        results = outcome.suite_results  # on the log for the next evaluations' focused sample
        assert results is not None and results.suite == "coding_suite" and len(results.problems) == 3
        assert results.service == str(knowing_base) and not results.focused  # nothing known of the tiny model
        assert set(results.candidate_solved) | set(results.service_solved) <= set(results.problems)
        assert outcome.candidate["forgetting_items"] == len(ROWS) + len(GENERAL)
        for key in ("ms_per_token", "peak_rss_mb", "adapter_mb", "canary_prompts", "held_out_loss"):
            assert outcome.candidate[key] is not None, key
    for events in progress.values():  # each of the 10 steps said it started, in order
        steps = list(dict.fromkeys(e.step for e in events if e.step != "loading the models"))
        assert steps[0] == "held-out loss (in service)" and steps[-1] == "canary prompts (candidate)"
        assert len(steps) == 10 and "suite coding_suite (candidate)" in steps
        assert max(e.steps_done for e in events) == 9 and all(e.steps_total == 10 for e in events)
        assert all(e.run_id == events[0].run_id and e.done <= e.total for e in events)


def test_missing_adapter_dataset_or_base_model_fail_closed(tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    settings = eval_settings(tmp_path, tiny_model_dir)
    run = TrainingCompleted(run_id="r1", role="coder", adapter_hash="ef" * 32, path=str(tmp_path / "nowhere"),
                            base_model="tiny", dataset_hash="ab" * 32)
    out = evaluate_run(settings, run)
    assert not out.passed and "not found" in out.reasons[0]

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    out = evaluate_run(settings, run.model_copy(update={"path": str(adapter)}))
    assert not out.passed and "dataset" in out.reasons[0] and "not found" in out.reasons[0]

    folder = settings.state_dir / "datasets" / ("ab" * 32)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    broken = eval_settings(tmp_path, not_a_model)
    out = evaluate_run(broken, run.model_copy(update={"path": str(adapter)}))
    assert not out.passed and "is not a model" in out.reasons[0]


@pytest.fixture
def settings(settings_with: Any, knowing_base: Path, tmp_path: Path) -> Any:
    return settings_with(**tiny_sections(knowing_base, epochs=4, lr=5e-3), plugins={"skip": []},
                         evaluator={"max_new_tokens": 8, "canary_max_new_tokens": 4, "canary_from_train": 0,
                                    "general_prompts": general_file(tmp_path)})


async def test_a_rejected_adapter_is_not_deployed_and_the_base_model_stays_in_service(
    settings: Any, formatter: Any, bus: Any, engine_with: Any  # noqa: F811
) -> None:
    from flywheel_loop.plugins.serving.deployments import read_book

    digest, folder = write_eval_dataset(settings.state_dir, formatter, WRONG, "proc")
    done = train_dataset(settings, "coder", digest, folder)
    assert isinstance(done, TrainingCompleted)
    event = new_event(done, source="test")
    only = {"evaluator", "deployer", "deployments"}
    async with engine_with(evaluation_feature, serving, builtins=False, only=only) as engine:
        await bus.publish(event)
        refused = await wait_for(lambda: read_log(bus, "log", "deployment.failed"), timeout=120)
        await engine.projection("deployments").catch_up()
    (evaluation,) = await read_log(bus, "log", "evaluation.completed")
    assert isinstance(evaluation.data, EvaluationCompleted) and not evaluation.data.passed
    assert evaluation.causation_id == event.id and evaluation.data.run_id == done.run_id
    assert evaluation.data.candidate["held_out_items"] == 2
    assert refused[0].causation_id == evaluation.id
    assert await read_log(bus, "log", "deployment.completed") == []
    book = read_book(settings)
    assert book is None or book.service("coder") is None  # the model in service is still the base model


def test_the_kinds_a_dataset_trains_on_come_from_its_train_split_and_preferred_answers(tmp_path: Path) -> None:
    from flywheel_loop.plugins.evaluation.evaluator import trained_kinds

    detect = PluginHost(load_settings(plugins={"enabled": ["privacy"]})).find_sensitive
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "mail maria.lopez@gmail.com"}) + "\n")
    (tmp_path / "dpo_train.jsonl").write_text(
        json.dumps({"prompt": "who?", "chosen": "call (415) 555-2671", "rejected": "AKIA" + "Z7Q2MX4PLK9WN3RT"}) + "\n")
    assert trained_kinds(tmp_path, detect) == {"EMAIL", "PHONE"}  # the rejected answer is not learned
    (tmp_path / "dpo_train.jsonl").unlink()
    assert trained_kinds(tmp_path, detect) == {"EMAIL"}
