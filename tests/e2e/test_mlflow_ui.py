"""docs/MLFLOW_UI.md, click by click, in a real browser: the numbers the MLflow UI shows for Tables 1-3 (and the
Optuna search's Table 2) are the printed tables'.

A fresh SQLite store is filled the way the sweeps log, without training: each sweep's parent and trial runs
through the package's own tracking code (``support.open_sweep`` / ``support.log_trial``), each trial's five fold
runs through the fold logger Ray Train's rank 0 uses (``tracking.FoldLogger``), with known per-fold scores; the
trial's summary is ``train.summarize_trial``'s, and the tables are built and logged on the parent runs as a sweep
does at its end (``tables.sweep_tables`` / ``log_tables``). `mlflow server` (`mlflow ui`) serves the store on a
free loopback port (it boots while the store fills), and Debian's Chromium, headless, driven by Playwright (the
``playwright`` package with the system browser: nothing downloaded), follows the doc.

Truths: each table cell equals numpy's mean ± sample std of the known per-fold scores; each number the page shows
(rounded as the tables round) equals the table's cell; a fold run's page shows that fold's known score; the
rendered ``tables/*.md`` holds the printed rows; how many runs a filter shows is what MLflow's own search returns
for it, plus their parents. ``SER_UI_SHOTS=DIR`` also writes the doc's screenshots into DIR
(``SER_UI_SHOTS=docs``). Skips when /usr/bin/chromium or playwright is absent (.ci/run installs both).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from ser_platform import tracking
from ser_platform.catalogue import ABLATION, EMBEDDING_SPACE, PAPER_GRID, SEARCH, Experiment, trial_overrides
from ser_platform.config import load_config
from ser_platform.data.folds import fold_spec
from ser_platform.tables import Table, format_table, log_tables, sweep_tables
from ser_platform.tracking.schema import PARENT_RUN_TAG
from ser_platform.train import FoldResult, TrialResult, summarize_trial

from support import MlflowServer, log_trial, open_sweep

CHROMIUM = "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                     "(pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"Debian's Chromium is absent ({CHROMIUM}): apt-get install -y chromium")
expect = playwright_api.expect

# As the probe that showed this browser working here launched it: no sandbox (root), no GPU, and none of
# Chromium's own connections, which a closed network refuses.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
STEP_MS = 60_000  # the longest wait for one step: on 2 busy cores a page can take tens of seconds
SHOTS = os.environ.get("SER_UI_SHOTS")
SEARCH_BOX = 'metrics.rmse < 1 and params.model = "tree"'  # the runs page's search box, by its placeholder
# docs/MLFLOW_UI.md, "Open the UI", step 4: the columns a table is read from, and the empty ones taken away.
METRIC_COLUMNS = ("test_wa_mean", "test_wa_std", "test_ua_mean", "test_ua_std", "val_ua_mean", "val_ua_std")
PARAM_COLUMNS = ("variant", "loss.alpha", "loss.beta", "loss.margin", "loss.space", "model.focus_attention")
EMPTY_COLUMNS = ("Dataset", "Source", "Models")

# --- the store: the three sweeps of `python experiments/paper_tables.py`, and an Optuna search ---------------

GROUP = "tables-demo"  # paper_tables.py names its sweeps <name>-<experiment key>
FOLDS = (1, 2, 3, 4, 5)
EPOCHS = 2
SEARCH_POINTS = ({"loss.alpha": 0.3, "loss.beta": 0.8, "loss.margin": 0.2, "loss.space": "fused"},
                 {"loss.alpha": 0.9, "loss.beta": 0.5, "loss.margin": 1.1, "loss.space": "speech"},
                 {"loss.alpha": 0.6, "loss.beta": 0.3, "loss.margin": 0.07, "loss.space": "text"})
SWEEPS = {f"{GROUP}-{e.key}": e for e in (ABLATION, PAPER_GRID, EMBEDDING_SPACE)} | {"search-demo": SEARCH}


def known_scores(seed: int) -> dict[int, FoldResult]:
    """Per-fold scores of one trial, drawn once (4 decimals): the truth the page is checked against."""
    rng = np.random.default_rng(seed)

    def near(value: float, low: float, high: float) -> float:
        return round(value + float(rng.uniform(low, high)), 4)

    folds = {}
    for fold in FOLDS:
        ua = near(0.0, 0.35, 0.65)
        folds[fold] = FoldResult(
            fold=fold, best_epoch=int(rng.integers(1, EPOCHS + 1)), val_wa=near(ua, -0.05, 0.05),
            val_ua=near(ua, -0.05, 0.05), test_wa=near(ua, 0.0, 0.06), test_ua=ua,
            confusion=[[3, 1, 0, 0], [0, 2, 1, 0], [1, 0, 3, 0], [0, 0, 1, 2]], epochs_run=EPOCHS, num_test=16,
            history=[{"epoch": e, "loss": 1.4 - 0.2 * e, "val_ua": ua - 0.02 * (EPOCHS - e)}
                     for e in range(1, EPOCHS + 1)])
    return folds


def log_sweep(uri: str, experiment_id: str, name: str, experiment: Experiment, first_seed: int,
              known: dict[str, dict[int, FoldResult]]) -> list[Table]:
    """One sweep as ``sweep.run_sweep`` leaves it: the parent run, each trial run with its fold runs, the tables
    and the best trial on the parent. ``known`` gets each trial run's per-fold scores."""
    config = load_config("demo", overrides={**experiment.base_overrides("demo"), "train.epochs": EPOCHS,
                                            "data.dataset": "/data/iemocap.parquet", "tracking.mlflow_uri": uri})
    ctx = open_sweep(uri, experiment_id, experiment, name, config)
    specs = {k: fold_spec(k) for k in FOLDS}
    speakers = {k: (sorted(s.test_speakers), sorted(s.val_speakers)) for k, s in specs.items()}
    points = list(SEARCH_POINTS) if experiment.is_search else [{"variant": label} for label in experiment.variants]
    for index, params in enumerate(points):
        trial_id = f"{experiment.key[:4]}_{index:05d}"
        run_id = log_trial(ctx, trial_id, params, config)  # the trial's run, RUNNING while its folds train
        variant, overrides = trial_overrides(experiment, params)
        trial_config, identity = config.replace(overrides), ctx.identity(trial_id, variant)
        folds = known[run_id] = known_scores(first_seed + index)
        logger = tracking.FoldLogger(trial_config, tracking.FoldRunContext(
            tracking_uri=uri, experiment_id=experiment_id, parent_run_id=run_id, train_run=f"trial={trial_id}",
            speakers=speakers, tags=identity.tags(), params=identity.labels(trial_config)))
        for fold, result in folds.items():
            logger.finish(fold, result, with_history=True)
        tracking.log_trial_result(tracking.MlflowRun(uri, run_id),
                                  TrialResult(per_fold=folds, summary=summarize_trial(folds)))
    [sweep] = tracking.collect_sweeps(uri, experiment_id, ctx.parent_run_id)
    tables = sweep_tables(sweep, uri)
    parent = tracking.MlflowRun(uri, ctx.parent_run_id)
    log_tables(parent, tables)
    best = max(sweep.trials, key=lambda t: t.metrics["val_ua_mean"])
    tracking.finish_sweep_run(parent, status="FINISHED", trials_complete=len(sweep.trials), trials_errored=0,
                              wall_seconds=1.0, best=(best.run_id, best.metrics))
    return tables


@dataclass
class Store:
    """The filled store as served: its URL, each sweep's tables, the known per-fold scores by trial run id."""

    url: str
    experiment_id: str
    client: MlflowClient
    tables: dict[str, list[Table]]
    known: dict[str, dict[int, FoldResult]]

    def table(self, experiment: Experiment) -> tuple[str, Table]:
        """(sweep name, its one table) of ``experiment``."""
        [(name, [table])] = [(n, t) for n, t in self.tables.items() if SWEEPS[n] is experiment]
        return name, table

    def children(self, name: str) -> list[str]:
        """Names of the runs nested under the run called ``name``."""
        [run] = self.client.search_runs([self.experiment_id], f"attributes.run_name = '{name}'")
        found = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{run.info.run_id}'")
        return [r.info.run_name for r in found]

    def shown_count(self, query: str) -> int:
        """How many runs the UI lists for ``query``: MLflow's own search for it, plus the parents of what matches."""
        runs = self.client.search_runs([self.experiment_id], query, max_results=1000)
        ids = {r.info.run_id for r in runs}
        parents = [r.data.tags.get(PARENT_RUN_TAG) for r in runs]
        while parents:
            parent = parents.pop()
            if parent and parent not in ids:
                ids.add(parent)
                parents.append(self.client.get_run(parent).data.tags.get(PARENT_RUN_TAG))
        return len(ids)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """`mlflow server` on the filled store (`mlflow ui`, the doc's command, is the same command in MLflow 3:
    mlflow/cli/__init__.py maps one onto the other). It boots (seconds to tens of seconds on 2 busy cores) while
    the store fills: ``start`` waits for it in a thread."""
    root = tmp_path_factory.mktemp("mlflow-ui")
    uri = tracking.ensure_store(f"sqlite:///{root / 'mlflow.db'}")  # the schema first: the server must not race it
    experiment_id = tracking.experiment_id(uri, "ser_platform")
    server = MlflowServer(uri, root / "server", env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    with ThreadPoolExecutor(1) as pool:
        try:
            started = pool.submit(server.start)
            known: dict[str, dict[int, FoldResult]] = {}
            tables = {name: log_sweep(uri, experiment_id, name, experiment, 10 * position, known)
                      for position, (name, experiment) in enumerate(SWEEPS.items())}
            print("\n\n".join(format_table(t) for built in tables.values() for t in built))
            yield Store(started.result(), experiment_id, MlflowClient(uri), tables, known)
        finally:
            server.stop()


# --- the browser, and the doc's steps ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser_page(store):
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_context(viewport={"width": 1920, "height": 1000}).new_page()
            page.set_default_timeout(STEP_MS)
            expect.set_options(timeout=STEP_MS)
            yield page
        finally:
            browser.close()


def shot(page, name: str) -> None:
    """A screenshot for docs/ when SER_UI_SHOTS names a folder (the pointer moved off the table: no tooltip)."""
    if SHOTS:
        page.mouse.move(1, 990)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


def name_cell(page, name: str):
    """The "Run Name" cell of the run called ``name`` (its ⊞ button, its link)."""
    cells = page.locator('[role="gridcell"][col-id="attributes.`Run Name`"]')
    return cells.filter(has=page.get_by_role("link", name=name, exact=True))


def read_rows(page) -> list[dict[str, str]]:
    """The runs table as shown, top to bottom: per row its run id (``id``), its name and every cell by column id
    (``metrics.`test_ua_mean```, ``params.`variant```, ...); the grid splits a row over its pinned parts."""
    rows = page.evaluate("""() => {
        const rows = {};
        for (const cell of document.querySelectorAll('[role="gridcell"][col-id]')) {
            const row = cell.closest('[role="row"]');
            const entry = rows[row.getAttribute('row-id')] ??= {index: Number(row.getAttribute('row-index'))};
            entry[cell.getAttribute('col-id')] = cell.innerText.trim();
        }
        return Object.entries(rows).map(([id, r]) => ({...r, id})).sort((a, b) => a.index - b.index);
    }""")
    for row in rows:
        row["name"] = row.get("attributes.`Run Name`", "").split("\n")[-1]  # after the colour swatch's label
    return rows


def filter_runs(page, store: Store, query: str) -> None:
    """Type ``query`` in the search box, Enter; wait until the page counts the runs MLflow's search returns."""
    box = page.get_by_placeholder(SEARCH_BOX)
    box.fill(query)
    with page.expect_response(lambda r: "/runs/search" in r.url):
        box.press("Enter")
    expect(page.get_by_text(re.compile(r"^\d+ matching runs$"))).to_have_text(
        f"{store.shown_count(query)} matching runs")


def expand(page, name: str, children: list[str]) -> None:
    """⊞ left of ``name``: its child runs ``children`` appear under it."""
    name_cell(page, name).get_by_role("button").click()
    for child in children:
        expect(name_cell(page, child)).to_be_visible()


def open_the_ui(page, url: str) -> None:
    """docs/MLFLOW_UI.md, "Open the UI", steps 1-4."""
    page.goto(url)
    expect(page.get_by_role("heading", name="Welcome to MLflow")).to_be_visible(timeout=2 * STEP_MS)
    page.get_by_text("Model training", exact=True).click()
    page.get_by_role("button", name="Close", exact=True).click()  # the MLflow Assistant panel
    page.get_by_role("link", name="ser_platform", exact=True).click()
    for name in SWEEPS:  # one row per sweep; once they are in, the column list knows their keys
        expect(name_cell(page, name)).to_be_visible()
    page.get_by_role("button", name="Toggle sidebar").click()
    page.get_by_role("button", name="Columns", exact=True).click()
    for column in (*METRIC_COLUMNS, *PARAM_COLUMNS, *EMPTY_COLUMNS):
        page.get_by_placeholder("Search columns").fill(column)
        # the line that reads exactly the name: "test_ua_mean" also finds the parent's "best_test_ua_mean"
        titles = page.get_by_role("dialog").locator(".du-bois-light-tree-title")
        titles.filter(has_text=re.compile(f"^{re.escape(column)}$")).click()
    page.keyboard.press("Escape")
    for column in (*METRIC_COLUMNS, *PARAM_COLUMNS):
        expect(page.get_by_role("columnheader", name=column, exact=True).first).to_be_visible()
    for column in EMPTY_COLUMNS:
        expect(page.get_by_role("columnheader", name=column, exact=True)).to_have_count(0)


@pytest.fixture(scope="module")
def page(browser_page, store):
    """The experiment's runs table with the doc's columns: what every section below starts from."""
    open_the_ui(browser_page, store.url)
    return browser_page


# --- checks ------------------------------------------------------------------------------------------------------

def shown(row: dict[str, str], key: str) -> str:
    """A metric pair as the tables print it, mean ± std to 3 decimals, from the page's full floats."""
    return f"{float(row[f'metrics.`{key}_mean`']):.3f} ± {float(row[f'metrics.`{key}_std`']):.3f}"


def mean_std(values) -> str:
    values = np.asarray(list(values))
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"  # train.summarize_trial: sample std over folds


def check_against_known(table: Table, known: dict[str, dict[int, FoldResult]]) -> None:
    """Every row of ``table`` against numpy on the per-fold scores it was built from."""
    val = table.header.index("val UA (objective)" if table.search else "val UA")
    for row, run_id in zip(table.rows, table.data["run_id"]):
        folds = known[run_id].values()
        assert [row[table.header.index("WA")], row[table.header.index("UA")], row[val]] == \
            [mean_std(f.test_wa for f in folds), mean_std(f.test_ua for f in folds), mean_std(f.val_ua for f in folds)]


def check_row(table: Table, index: int, row: dict[str, str]) -> None:
    """One trial row of the page against row ``index`` of the table: the run, WA, UA and validation UA."""
    cells = table.rows[index]
    val = table.header.index("val UA (objective)" if table.search else "val UA")
    assert row["id"] == table.data["run_id"][index]
    assert [shown(row, "test_wa"), shown(row, "test_ua"), shown(row, "val_ua")] == \
        [cells[table.header.index("WA")], cells[table.header.index("UA")], cells[val]]


# --- the doc's sections ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("experiment", [ABLATION, PAPER_GRID, EMBEDDING_SPACE], ids=lambda e: f"table{e.table}")
def test_table_in_the_runs_table(page, store, experiment):
    """"Table 1" / "Table 2" / "Table 3": filter params.table, ⊞ on the sweep's parent, read its trial rows."""
    name, table = store.table(experiment)
    check_against_known(table, store.known)
    filter_runs(page, store, f'params.table = "{experiment.table}"')
    parents = {n for n, e in SWEEPS.items() if e.table == experiment.table}  # Table 2: the grid and the search
    assert {r["name"] for r in read_rows(page)} == parents  # folded: fold runs and trials match, yet hidden
    expand(page, name, store.children(name))
    rows = {r.get("params.`variant`"): r for r in read_rows(page)}
    for index, variant in enumerate(table.data["variant"]):
        check_row(table, index, rows[variant])
        for key, value in experiment.row(variant).overrides.items():  # the params that tell the rows apart
            assert rows[variant][f"params.`{key}`"] == str(value), (variant, key)
    parent = next(r for r in rows.values() if r["name"] == name)
    assert parent["params.`variant`"] == "rows: " + "; ".join(table.data["variant"])
    for key in experiment.varied_keys:  # the parent logs only what its trials share
        assert parent[f"params.`{key}`"] == "-", key
    if experiment is ABLATION:
        shot(page, "mlflow_runs")


def test_parent_tables_artifact(page, store):
    """"Where the numbers are": the parent run → Artifacts → tables → table2.md, rendered as printed."""
    name, table = store.table(PAPER_GRID)
    filter_runs(page, store, f'params.table = "{PAPER_GRID.table}"')
    page.get_by_role("link", name=name, exact=True).click()
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("tables", exact=True).click()
    page.get_by_text(f"{table.slug}.md", exact=True).click()
    rendered = page.get_by_role("table")
    expect(rendered).to_be_visible()
    lines = [row.locator('[role="cell"], [role="columnheader"]').all_inner_texts()
             for row in rendered.get_by_role("row").all()]
    assert lines == [table.header, *table.rows]
    shot(page, "mlflow_table_md")
    page.go_back()
    page.go_back()
    expect(page.get_by_placeholder(SEARCH_BOX)).to_have_value(f'params.table = "{PAPER_GRID.table}"')
    expect(name_cell(page, name)).to_be_visible()


def test_fold_runs_under_a_trial(page, store):
    """"Per fold": under the Table 1 filter a trial unfolds into its five fold runs; a fold run's page shows its
    own test UA, and its confusion matrix under Artifacts."""
    name, table = store.table(ABLATION)
    trial = next(t for t in store.children(name) if t.startswith("Full model"))
    filter_runs(page, store, 'params.table = "1"')
    if name_cell(page, trial).count() == 0:  # the parent stays unfolded from "Table 1"
        expand(page, name, [trial])
    expand(page, trial, [f"fold={k}" for k in FOLDS])
    page.get_by_role("link", name="fold=3", exact=True).click()
    test_ua = store.known[table.data["run_id"][table.data["variant"].index("Full model")]][3].test_ua
    expect(page.get_by_role("row", name=re.compile(rf"^test_ua\s+{re.escape(repr(test_ua))}$"))).to_be_visible()
    page.get_by_role("tab", name="Model metrics").click()
    for metric in ("loss", "val_ua"):  # one chart per metric, titled by run and metric
        expect(page.get_by_text(f"fold=3 ({metric})", exact=True)).to_be_visible()
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("confusion_test.png", exact=True).click()
    image = page.get_by_role("img", name="confusion_test.png")
    expect(image).to_be_visible()
    assert image.evaluate("img => img.naturalWidth") > 100
    for _ in range(3):
        page.go_back()
    expect(page.get_by_placeholder(SEARCH_BOX)).to_have_value('params.table = "1"')


def test_a_filter_fold_runs_do_not_match_hides_them(page, store):
    """"Caveats": a filter on a trial metric keeps the trials (under their parents) but not their fold runs: a
    trial shows no ⊞."""
    name, _ = store.table(ABLATION)
    trial = next(t for t in store.children(name) if t.startswith("Full model"))
    filter_runs(page, store, "metrics.test_ua_mean > 0")
    if name_cell(page, trial).count() == 0:
        expand(page, name, [trial])
    expect(name_cell(page, trial).get_by_role("button")).to_have_count(0)
    assert not any(r["name"].startswith("fold=") for r in read_rows(page))


def sort_by(page, key: str) -> None:
    """**Sort: ...** → type ``key`` in its search box → click it (descending, the default)."""
    page.get_by_role("button", name=re.compile("^Sort: ")).click()
    menu = page.get_by_role("menu")
    menu.get_by_placeholder("Search").fill(key)
    with page.expect_response(lambda r: "/runs/search" in r.url):
        menu.get_by_text(key, exact=True).click()
    expect(page.get_by_role("button", name=f"Sort: {key}")).to_be_visible()


def check_sorted_search(page, name: str, table: Table) -> None:
    """The search's runs sorted by its objective: flat (fold runs listed without unfolding), the trials first in
    the printed table's order, with its points and numbers, the parent after them (a tree lists it first)."""
    expect(name_cell(page, "fold=1").first).to_be_visible()
    rows = read_rows(page)
    trials = rows[:len(table.rows)]
    assert next(r for r in rows if r["name"] == name)["index"] > max(r["index"] for r in trials)
    point_columns = slice(table.header.index("α"), table.header.index("space") + 1)
    for index, row in enumerate(trials):
        check_row(table, index, row)
        point = [f"{float(row[f'params.`loss.{k}`']):.3f}" for k in ("alpha", "beta", "margin")]
        assert [*point, row["params.`loss.space`"]] == table.rows[index][point_columns]


def test_search_sorted_by_the_objective(page, store):
    """"Table 2 (search)": every search's runs, then one search's, sorted by val_ua_mean (descending, the
    default) read as the printed table."""
    name, table = store.table(SEARCH)
    check_against_known(table, store.known)
    filter_runs(page, store, 'params.variant = "search"')
    sort_by(page, "val_ua_mean")
    assert "orderByAsc=false" in page.url
    check_sorted_search(page, name, table)
    shot(page, "mlflow_search_sorted")
    filter_runs(page, store, f'tags.`ser.sweep` = "{name}"')  # the sort stays
    check_sorted_search(page, name, table)
    sort_by(page, "Created")  # the tree again: the parent alone, folded
    expect(name_cell(page, "fold=1")).to_have_count(0)
    assert [r["name"] for r in read_rows(page)] == [name]


def test_the_column_choice_stays(page, store):
    """"Open the UI", step 4: the browser keeps the chosen columns for the experiment (a reload)."""
    page.reload()
    for column in (*METRIC_COLUMNS, *PARAM_COLUMNS):
        expect(page.get_by_role("columnheader", name=column, exact=True).first).to_be_visible()
