"""The web dashboard in a real browser: a realistic log on a real NATS, folded by the ``dashboard``
projection in a running engine, served by uvicorn, opened in headless Chromium (selenium with the
Debian ``chromium`` and ``chromium-driver``). Every page is screenshotted and the screenshots are
checked: plots have pixels in their traces' colours (and an empty plot has none), tables have the
rows the log implies, and a new event appears on an open page without a reload."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import sqlite3
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.plugins.insight.dashboard.queries import DashboardData, projection_file
from flywheel_loop.plugins.insight.dashboard.server import DashboardServer, start_dashboard
from flywheel_loop.schemas import (
    ArmSelected,
    BalanceRow,
    DatasetBuilt,
    DatasetSkipped,
    DeploymentCompleted,
    DeploymentFailed,
    DeploymentRolledBack,
    DriftDetected,
    EvaluationCompleted,
    EventRejected,
    GateCheck,
    InteractionAnonymized,
    InteractionRecorded,
    QualityAssessed,
    TrainingCompleted,
    TrainingFailed,
    TrainingProgressed,
    TrainingStarted,
    new_event,
    new_id,
)
from tests.conftest import RunningEngine, read_log, wait_for

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests need selenium (pip install -e .[dev])")
Image = pytest.importorskip("PIL.Image", reason="the screenshot checks need pillow (pip install -e .[dev])")
np = pytest.importorskip("numpy")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM.exists() or shutil.which("chromium")) or not (CHROMEDRIVER.exists() or shutil.which("chromedriver")),
    reason="headless Chromium tests need the Debian packages chromium and chromium-driver",
)

#: the dashboard's trace colours (engine/dashboard/static/dashboard.js PALETTE and KIND_COLOURS)
BLUE, ORANGE, GREEN, RED = (0x25, 0x63, 0xEB), (0xF9, 0x73, 0x16), (0x16, 0xA3, 0x4A), (0xDC, 0x26, 0x26)
HASHES = ["a1" * 32, "b2" * 32, "c3" * 32, "d4" * 32]
NOW = datetime.now(UTC).replace(microsecond=0)


# --------------------------------------------------------------------------- a realistic log


def at(payload: Any, minutes_ago: float) -> Any:
    """The event of ``payload`` as if it happened ``minutes_ago``."""
    return new_event(payload, source="test").model_copy(update={"time": NOW - timedelta(minutes=minutes_ago)})


def realistic_log() -> list[Any]:
    """Six hours of two roles: interactions with rewards (the new model better), bandit choices,
    two datasets, three runs (one failed), two evaluations, a deployment, drift and a rollback,
    a failed deployment, and two rejections."""
    events: list[Any] = []
    for i in range(48):
        role = "coder" if i % 3 else "tester"
        model = "smollm2-base" if i < 24 else "smollm2-coder-v1"
        variant = ("terse", "stepwise")[i % 2]
        minutes = 360 - i * 7.5
        recorded = InteractionRecorded(session_id=f"s{i % 5}", role=role, model_id=model, prompt_variant=variant,
                                       input=f"task {i}", output=f"answer {i}")
        iid = new_id()
        events.append(at(InteractionAnonymized(interaction_id=iid, interaction=recorded), minutes))
        reward = round(min(1.0, 0.35 + 0.01 * i + (0.15 if model.endswith("v1") else 0.0) + 0.1 * (i % 2)), 3)
        events.append(at(QualityAssessed(interaction_id=iid, role=role, model_id=model, prompt_variant=variant,
                                         scores={"outcome": reward}, reward=reward, confidence=0.8), minutes - 1))
        events.append(at(ArmSelected(role=role, decision="prompt_variant", arm=variant, policy="thompson",
                                     candidates=["terse", "stepwise"]), minutes + 0.5))
    balance = [BalanceRow(role="coder", domain=d, complexity=c, available=a, kept=k)
               for d, c, a, k in (("python", "simple", 40, 30), ("python", "complex", 22, 22), ("sql", "simple", 9, 9))]
    events += [
        at(DatasetBuilt(role="coder", dataset_hash=HASHES[0], sizes={"train": 54, "validation": 7},
                        balance=balance, rehearsal_share=0.15, lineage=[new_id()], lineage_total=61,
                        path="datasets/a1", log_position=120), 200),
        at(DatasetBuilt(role="tester", dataset_hash=HASHES[1], sizes={"train": 20, "validation": 3},
                        balance=balance[:1], rehearsal_share=0.1, lineage_total=23,
                        path="datasets/b2", log_position=130), 190),
        at(DatasetSkipped(role="fixer", reason="too_few_examples", detail="3 examples, 20 needed", log_position=131),
           185),
        at(TrainingStarted(run_id="run-coder-1", role="coder", dataset_hash=HASHES[0], base_model="smollm2"), 180),
    ]
    for step, loss in enumerate((2.4, 1.9, 1.55, 1.3, 1.18, 1.1), 1):
        events.append(at(TrainingProgressed(run_id="run-coder-1", step=step * 10, total_steps=60, loss=loss,
                                            val_loss=loss + 0.2 if step % 2 == 0 else None), 180 - step * 3))
    events += [
        at(TrainingCompleted(run_id="run-coder-1", role="coder", adapter_hash=HASHES[2], path="adapters/c3",
                             base_model="smollm2", train_loss=1.1, val_loss=1.3, steps=60, duration_s=840.0), 160),
        at(TrainingStarted(run_id="run-tester-1", role="tester", dataset_hash=HASHES[1], base_model="smollm2"), 150),
        at(TrainingProgressed(run_id="run-tester-1", step=5, total_steps=30, loss=2.1), 148),
        at(TrainingFailed(run_id="run-tester-1", role="tester", reason="wall-clock cap of 600 s reached"), 140),
        at(EvaluationCompleted(run_id="run-coder-1", role="coder", adapter_hash=HASHES[2],
                               candidate={"task_pass_rate": 62.0, "forgetting_rate": 0.1},
                               baseline={"task_pass_rate": 55.0, "forgetting_rate": 0.0}, passed=True), 130),
        at(EvaluationCompleted(run_id="run-coder-0", role="coder", adapter_hash=HASHES[3],
                               candidate={"task_pass_rate": 40.0}, baseline={"task_pass_rate": 55.0}, passed=False,
                               reasons=["task pass rate 40.0 is 15.0 points below the service's 55.0"]), 125),
        at(EvaluationCompleted(
            run_id="run-coder-2", role="coder", adapter_hash=HASHES[1], passed=False, verdict="inconclusive",
            candidate={"held_out_loss": 1.1, "ms_per_token": 40.0, "task_pass_rate": 50.0},
            baseline={"held_out_loss": 1.3, "ms_per_token": 45.0, "task_pass_rate": 55.0},
            checks=[GateCheck(name="task pass rate", status="inconclusive", detail="9 tasks: cannot tell",
                              value=-0.05, low=-0.31, high=0.21, items=9, p_value=1.0),
                    GateCheck(name="held-out loss", status="ok", detail="1.1 vs 1.3", value=1.1, items=12)],
            reasons=["inconclusive: 9 tasks: cannot tell", "ok: 1.1 vs 1.3"]), 122),
        at(DeploymentCompleted(role="coder", runtime="transformers", model_name="coder-c3c3c3",
                               adapter_hash=HASHES[2]), 120),
        at(DriftDetected(role="coder", metric="reward", window=20, baseline_value=0.71, current_value=0.55,
                         drop=0.22, p_value=0.01), 60),
        at(DeploymentRolledBack(role="coder", runtime="transformers", from_adapter=HASHES[2], to_adapter=None,
                                reason="drift: reward fell 22 %"), 58),
        at(DeploymentFailed(role="tester", runtime="ollama", reason="ollama is not answering on 127.0.0.1:11434"),
           30),
        at(EventRejected(subject="fw.raw.interaction.recorded", stream_name="FLYWHEEL_RAW", sequence=17,
                         processor="anonymizer", reason="input: String should have at most 200000 characters"), 20),
        at(EventRejected(subject="fw.log.quality.assessed", stream_name="FLYWHEEL_LOG", sequence=88,
                         processor="training_trigger", reason="RuntimeError: disk full", attempts=5), 10),
    ]
    return events


# --------------------------------------------------------------------------- browser and screenshots


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module's tests (each opens its own pages)."""
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium"))
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100", "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(arg)
    service = Service(executable_path=str(CHROMEDRIVER if CHROMEDRIVER.exists() else shutil.which("chromedriver")),
                      log_output=str(tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """One dashboard page in the browser; every call runs in a thread so the server keeps serving."""

    def __init__(self, driver: Any, base: str, shots: Path) -> None:
        self.driver, self.base, self.shots = driver, base, shots

    async def open(self, path: str, position: int) -> None:
        await asyncio.to_thread(self._open, path, position)

    def _open(self, path: str, position: int) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver.get(self.base + path)
        WebDriverWait(self.driver, 20).until(
            lambda d: int(d.execute_script("return Number(document.body.dataset.position || -1)")) >= position)

    async def js(self, script: str) -> Any:
        return await asyncio.to_thread(self.driver.execute_script, script)

    async def rows(self, table_id: str) -> list[list[str]]:
        """The text of each cell of each body row of a table (nested tables not counted)."""
        return list(await self.js(
            f"return [...document.querySelectorAll('table#{table_id} > tbody > tr')]"
            ".map(tr => [...tr.children].map(td => td.innerText.trim()))"))

    async def shot(self, element_id: str, name: str) -> Any:
        """An element's screenshot, saved under the test's folder, as an RGB array."""
        def take() -> bytes:
            from selenium.webdriver.common.by import By

            element = self.driver.find_element(By.ID, element_id)
            self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
            return bytes(element.screenshot_as_png)

        png = await asyncio.to_thread(take)
        (self.shots / f"{name}.png").write_bytes(png)
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)

    async def full_shot(self, name: str) -> None:
        await asyncio.to_thread(self.driver.save_screenshot, str(self.shots / f"{name}.png"))


def coloured(pixels: Any, colour: tuple[int, int, int], tolerance: int = 40) -> int:
    """How many pixels are within ``tolerance`` (per channel) of ``colour``."""
    return int((np.abs(pixels - np.array(colour)).max(axis=2) <= tolerance).sum())


def columns_with(pixels: Any, colour: tuple[int, int, int], tolerance: int = 40) -> int:
    """How many distinct x positions hold a pixel of ``colour``: points spread along the x axis."""
    return int((np.abs(pixels - np.array(colour)).max(axis=2) <= tolerance).any(axis=0).sum())


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def dash_settings(settings_with: Callable[..., Settings]) -> Settings:
    return settings_with(dashboard={"port": 0, "refresh_s": 0.2})


@pytest.fixture
async def folded(bus: Bus, engine_with: Callable[..., RunningEngine]) -> AsyncIterator[tuple[Bus, RunningEngine]]:
    """A real log, published on a real NATS and folded by the running engine's dashboard projection."""
    await bus.publish_many(realistic_log())
    async with engine_with(only={"dashboard"}) as running:
        last = await bus.last_sequence("log")
        await wait_for(lambda: running.projection("dashboard").store.position().seq >= last)
        yield bus, running


# --------------------------------------------------------------------------- tests


@needs_browser
async def test_every_page_shows_the_log_in_plots_and_tables(
    folded: tuple[Bus, RunningEngine], dash_settings: Settings, browser: Any, tmp_path: Path
) -> None:
    bus, running = folded
    position = running.projection("dashboard").store.position().seq
    shots = tmp_path / "screenshots"
    shots.mkdir()
    async with DashboardServer(dash_settings) as server:
        page = Page(browser, server.url.rstrip("/"), shots)

        await page.open("/", position)
        await page.full_shot("overview")
        tiles = dict(zip(*[iter(await page.js(
            "return [...document.querySelectorAll('.tile div')].map(d => d.textContent)"))] * 2, strict=True))
        assert tiles["Interactions"] == "48" and tiles["Assessed"] == "48" and tiles["Rollbacks"] == "1"
        bars = await page.shot("plot-interactions", "overview-interactions")
        assert coloured(bars, BLUE, 10) > 200 and coloured(bars, ORANGE, 10) > 200  # two roles, stacked
        assert columns_with(bars, BLUE, 10) > 100  # six hours of bars, not one
        # one hour of data: an axis of whole hours around it, not one zoomed into a single bar
        axis = await page.js("return hourAxis([{x: ['2026-01-01T10:00:00+00:00']}])")
        first, last = (datetime.fromisoformat(t.replace("Z", "+00:00")) for t in axis["range"])
        assert last - first == timedelta(hours=6) and first < datetime(2026, 1, 1, 10, tzinfo=UTC)
        for plot in ("plot-reward-role", "plot-reward-model"):
            pixels = await page.shot(plot, plot)
            # points and moving-mean lines of two series, spread over the x axis
            assert coloured(pixels, BLUE) > 300 and coloured(pixels, ORANGE) > 300, plot
            # (a lone point covers about ten columns; 630 px wide in all)
            assert columns_with(pixels, BLUE) > 120 and columns_with(pixels, ORANGE) > 120, plot
        arms = await page.shot("plot-arms", "overview-arms")
        assert coloured(arms, BLUE, 10) > 500 and coloured(arms, ORANGE, 10) > 500
        arm_rows = await page.rows("arms")
        assert len(arm_rows) == 2 * 2 + 2 * 2  # (coder, tester) x (prompt variants + models)
        shares = {(r[0], r[2]): r[4] for r in arm_rows if r[1] == "prompt variant"}
        assert shares[("coder", "terse")] == "50.0 %" and shares[("tester", "stepwise")] == "50.0 %"

        await page.open("/datasets", position)
        await page.full_shot("datasets")
        datasets = await page.rows("datasets")
        assert [r[1] for r in datasets] == ["tester", "coder"]
        assert "61 events up to log #120" in datasets[1][5] and "run-coder-1" in datasets[1][6]
        assert "passed" in datasets[1][6] and "deployed" in datasets[1][6]
        assert "failed" in datasets[0][6]
        assert [r[2] for r in await page.rows("skips")] == ["too_few_examples"]
        balance = await page.shot("plot-balance", "datasets-balance")
        assert columns_with(balance, BLUE, 10) > 60  # three "kept" bars

        await page.open("/training", position)
        await page.full_shot("training")
        runs = {r[0]: r for r in await page.rows("runs")}
        assert runs["run-coder-1"][2] == "completed" and runs["run-coder-1"][4] == "60 / 60"
        assert runs["run-tester-1"][2] == "failed" and "wall-clock" in runs["run-tester-1"][11]
        loss = await page.shot("plot-loss", "training-loss")
        # newest run first: the failed tester run (one point) in blue, the coder run's curve in orange
        assert coloured(loss, ORANGE) > 300 and columns_with(loss, ORANGE) > 300
        assert coloured(loss, BLUE) > 20

        await page.open("/evaluations", position)
        await page.full_shot("evaluations")
        evaluations = await page.rows("evaluations")
        assert [(r[2], r[4].splitlines()[0]) for r in evaluations] == [
            ("run-coder-2", "inconclusive"), ("run-coder-0", "failed"), ("run-coder-1", "passed")]
        assert "15.0 points below" in evaluations[1][6] and "+7" in evaluations[2][5]
        # the inconclusive verdict shows each check with its interval (points) and item count
        assert "task pass rate -5.0 pts [-31.0, 21.0] · n=9" in evaluations[0][4]
        # a lower loss and fewer ms per token are better (green), a lower pass rate worse (red)
        colours = dict(await page.js(
            "return [...document.querySelectorAll('table#evaluations > tbody > tr:first-child td table tbody tr')]"
            ".map(tr => [tr.children[0].innerText, tr.children[3].querySelector('span').className])"))
        assert colours == {"held_out_loss": "up", "ms_per_token": "up", "task_pass_rate": "down"}

        await page.open("/deployments", position)
        await page.full_shot("deployments")
        timeline = await page.rows("timeline")
        assert [r[1] for r in timeline] == ["deployment failed", "rolled back", "drift", "deployed"]
        assert [(r[0], r[1]) for r in await page.rows("current")] == [("coder", "rolled back")]
        pixels = await page.shot("plot-timeline", "deployments-timeline")
        assert coloured(pixels, GREEN, 20) > 50 and coloured(pixels, RED, 20) > 50 and coloured(pixels, ORANGE, 20) > 20

        await page.open("/rejections", position)
        await page.full_shot("rejections")
        rejections = await page.rows("rejections")
        assert [r[1] for r in rejections] == ["training_trigger", "anonymizer"]
        assert "disk full" in rejections[0][5]
        assert coloured(await page.shot("plot-rejections", "rejections-plot"), RED, 10) > 500


@needs_browser
async def test_an_open_page_updates_live_without_a_reload(
    dash_settings: Settings, bus: Bus, engine_with: Callable[..., RunningEngine], browser: Any, tmp_path: Path
) -> None:
    async with engine_with(only={"dashboard"}) as running, DashboardServer(dash_settings) as server:
        page = Page(browser, server.url.rstrip("/"), tmp_path)
        await page.open("/rejections", 0)
        assert await page.rows("rejections") == []
        empty = await page.shot("plot-rejections", "live-before")
        assert coloured(empty, RED, 10) == 0  # the check can fail: an empty plot has no bar
        await page.js("window.sameDocument = true")

        await bus.publish(new_event(EventRejected(
            subject="fw.log.dataset.built", stream_name="FLYWHEEL_LOG", sequence=3, processor="trainer",
            reason="dataset folder missing: datasets/ff"), source="test"))
        await wait_for(lambda: running.projection("dashboard").store.position().seq >= 1)
        rows = await wait_for(lambda: page.rows("rejections"), timeout=15)
        assert rows[0][1] == "trainer" and "dataset folder missing" in rows[0][5]
        assert await page.js("return window.sameDocument === true")  # redrawn in place, not reloaded
        assert coloured(await page.shot("plot-rejections", "live-after"), RED, 10) > 500


async def test_read_only_exposes_no_action_and_actions_publish_when_allowed(
    settings_with: Callable[..., Settings], bus: Bus
) -> None:
    def post(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        if headers is None:
            headers = {"X-Flywheel-Action": "1"}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="POST", headers=headers), timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    read_only = settings_with(dashboard={"port": 0})
    server = await start_dashboard(read_only, bus)
    assert server is not None
    try:
        status, _ = await asyncio.to_thread(post, server.url + "api/train/coder")
        assert status == 404  # no such action: nothing but reads is routed
    finally:
        await server.stop()

    actions = settings_with(dashboard={"port": 0, "read_only": False})
    server = await start_dashboard(actions, bus)
    assert server is not None
    try:
        status, body = await asyncio.to_thread(post, server.url + "api/train/coder", {})
        assert status == 403 and "X-Flywheel-Action" in body["detail"]  # what a cross-site form could send
        status, body = await asyncio.to_thread(post, server.url + "api/train/Not%20A%20Role")
        assert status == 422 and "not a role" in body["detail"]
        status, body = await asyncio.to_thread(post, server.url + "api/train/coder")
        assert status == 200 and body["role"] == "coder"
    finally:
        await server.stop()
    requested = await read_log(bus, event_type="training.requested")
    assert [(e.id, e.data.role, e.data.reason) for e in requested] == [(body["event_id"], "coder", "manual")]


@needs_browser
async def test_the_request_training_button_publishes_when_actions_are_allowed(
    settings_with: Callable[..., Settings], bus: Bus, engine_with: Callable[..., RunningEngine], browser: Any,
    tmp_path: Path,
) -> None:
    recorded = InteractionRecorded(session_id="s", role="coder", model_id="m", input="i", output="o")
    await bus.publish(new_event(InteractionAnonymized(interaction_id=new_id(), interaction=recorded), source="test"))
    async with engine_with(only={"dashboard"}) as running:
        await wait_for(lambda: running.projection("dashboard").store.position().seq >= 1)
        server = await start_dashboard(settings_with(dashboard={"port": 0, "read_only": False}), bus)
        assert server is not None
        try:
            page = Page(browser, server.url.rstrip("/"), tmp_path)
            await page.open("/training", 1)
            assert await page.js("return document.body.innerText.includes('read-only')") is False
            await page.js("[...document.querySelectorAll('button.train')].find(b => b.innerText === 'coder').click()")
            said = await wait_for(lambda: page.js("return document.getElementById('train-result').innerText"))
        finally:
            await server.stop()
    requested = await read_log(bus, event_type="training.requested")
    assert len(requested) == 1 and requested[0].data.role == "coder" and requested[0].id in said


async def test_a_port_in_use_is_a_warning_and_disabled_means_no_server(
    settings_with: Callable[..., Settings], bus: Bus
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        warnings: list[str] = []
        assert await start_dashboard(settings_with(dashboard={"port": port}), bus, warn=warnings.append) is None
    assert len(warnings) == 1 and f"127.0.0.1:{port}" in warnings[0] and "dashboard.port" in warnings[0]
    assert await start_dashboard(settings_with(dashboard={"enabled": False}), bus) is None


def test_pages_are_empty_not_broken_before_the_projection_exists(tmp_path: Path) -> None:
    data = DashboardData(projection_file(tmp_path))
    assert data.position() == 0
    assert data.page("overview") == {"page": "overview", "position": 0, "empty": True}
    with pytest.raises(KeyError):
        data.page("nonsense")
    data.path.parent.mkdir(parents=True)
    sqlite3.connect(data.path).close()  # created by the engine, tables not yet
    assert data.position() == 0 and data.page("training") == {"page": "training", "position": 0, "empty": True}


def test_a_reassessed_interaction_replaces_its_reward_where_it_was_first_scored(tmp_path: Path) -> None:
    from flywheel_loop.engine.projection import ProjectionStore
    from flywheel_loop.plugins.insight.dashboard_view import DashboardView

    def assessed(iid: str, reward: float, minutes_ago: float, model: str | None = "m1") -> bytes:
        return bytes(at(QualityAssessed(interaction_id=iid, role="coder", model_id=model, prompt_variant="v",
                                        scores={}, reward=reward, confidence=1.0), minutes_ago).to_bytes())

    first, second = new_id(), new_id()
    store = ProjectionStore(DashboardView(), projection_file(tmp_path))
    store.apply_batch([(1, assessed(first, 0.2, 180), None), (2, assessed(second, 0.6, 179, None), None),
                       (3, assessed(first, 0.9, 5), None)])  # late evidence for the first
    store.close()
    overview = DashboardData(projection_file(tmp_path)).page("overview")
    assert overview["totals"]["assessed"] == 2 and overview["totals"]["mean_reward"] == pytest.approx(0.75)
    coder = overview["reward_by_role"][0]
    assert coder["y"] == [0.9, 0.6]  # the first keeps the time it was first scored: before the second
    assert sum(coder["n"]) == 2 and max(coder["hour"]) < (NOW - timedelta(minutes=60)).isoformat()
    assert [(s["name"], s["mean"]) for s in overview["reward_by_model"]] == [
        ("(unknown)", [0.6]), ("m1", [0.9])]
    arms = {(a["decision"], a["arm"]): (a["pulls"], a["mean_reward"]) for a in overview["arms"]}
    assert arms == {("prompt_variant", "v"): (2, 0.75), ("model", "m1"): (1, 0.9)}


async def test_the_real_pipeline_feeds_the_dashboard(
    bus: Bus, engine_with: Callable[..., RunningEngine], dash_settings: Settings
) -> None:
    """Agents' raw interactions through the real anonymizer and scoring processors, and an event
    no processor can read, end up on the dashboard's pages."""
    import orjson

    async with engine_with(only={"anonymizer", "scoring", "dashboard"}):
        for i in range(5):
            await bus.publish(new_event(InteractionRecorded(
                session_id="s1", role="coder", model_id="qwen2.5-coder", prompt_variant="stepwise",
                input=f"write test {i}; mail me at dev{i}@example.com", output="def test(): pass"), source="agent"))
        broken = {"id": new_id(), "type": "interaction.recorded", "schema_version": 1, "source": "agent",
                  "time": datetime.now(UTC).isoformat(), "data": {"role": "coder"}}
        await bus.publish_raw("fw.raw.interaction.recorded", orjson.dumps(broken), {"Nats-Msg-Id": broken["id"]})
        data = DashboardData(projection_file(dash_settings.state_dir))

        def settled() -> dict[str, Any] | None:
            totals = data.page("overview")["totals"] if data.position() else {}
            return totals if totals.get("assessed") == 5 and totals.get("rejections") == 1 else None

        totals = await wait_for(settled)
    assert totals["interactions"] == 5 and 0 <= totals["mean_reward"] <= 1
    overview = data.page("overview")
    assert [s["name"] for s in overview["reward_by_model"]] == ["qwen2.5-coder"]
    assert len(overview["reward_by_role"][0]["y"]) == 5
    assert [(a["arm"], a["pulls"]) for a in overview["arms"] if a["decision"] == "prompt_variant"] == [("stepwise", 5)]
    rejection = data.page("rejections")["rejections"][0]
    assert rejection["processor"] == "anonymizer" and "data." in rejection["reason"]


async def test_the_projection_rebuilds_identically_from_the_log(
    folded: tuple[Bus, RunningEngine], dash_settings: Settings, tmp_path: Path
) -> None:
    from flywheel_loop.engine.replay import differences, rebuild
    from flywheel_loop.plugins.insight.dashboard_view import DashboardView

    bus, _ = folded
    target = tmp_path / "replayed.sqlite"
    assert await rebuild(bus, DashboardView(), target) == await bus.last_sequence("log")
    assert differences(projection_file(dash_settings.state_dir), target) == []
    data = DashboardData(target)
    assert data.page("overview")["totals"]["interactions"] == 48
    assert [e["kind"] for e in data.page("deployments")["timeline"]] == [
        "deployment failed", "rolled back", "drift", "deployed"]


def test_the_dashboard_command_serves_until_stopped_and_names_a_bad_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from flywheel_loop.engine.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLYWHEEL_STATE_DIR", str(tmp_path / "state"))
    runner = CliRunner()
    served = runner.invoke(app, ["dashboard", "--port", "0", "--duration", "0.3"])
    assert served.exit_code == 0, served.output
    assert "(read-only) at http://127.0.0.1:" in served.output and "no dashboard projection" in served.output
    bad = runner.invoke(app, ["dashboard", "--port", "70000"])
    assert bad.exit_code == 2 and "--port 70000" in bad.output
