"""The import graph keeps its shape: no cycles, the science library free of Django, the case
domain free of the other portal apps, the portal's layers pointing down. Read from the real
import graph (every import statement, including those inside functions)."""

from __future__ import annotations

import os
import subprocess
import sys

import grimp
import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("analysis", "client", "portal")


@pytest.fixture(scope="module")
def graph():
    sys.path.insert(0, str(REPO_ROOT))
    try:
        return grimp.build_graph(*PACKAGES, cache_dir=None)
    finally:
        sys.path.remove(str(REPO_ROOT))


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(edges) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_through_others(graph):
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert import_cycles(edges) == []


def test_the_import_contracts_hold():
    """The contracts in pyproject.toml ([tool.importlinter]), checked by import-linter; in a
    process of its own, away from what the test run has imported and patched."""
    run = subprocess.run(
        [sys.executable, "-c", LINT],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 kept, 0 broken" in run.stdout


LINT = (
    "import sys; from importlinter.cli import lint_imports; "
    "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"
)


def test_every_task_goes_to_a_queue_a_worker_listens_to():
    """Workers consume "gpu" (analyses) and "cpu" (everything else): see deploy/compose.yaml."""
    from django.conf import settings

    from portal.celery import app

    app.loader.import_default_modules()
    tasks = sorted(name for name in app.tasks if name.startswith("portal."))
    on_gpu = {"portal.analyses.tasks.run_analysis"} | set(settings.CELERY_TASK_ROUTES)
    assert "portal.viewer.tasks.pretile_slide" in tasks
    assert on_gpu <= set(tasks)  # every route names a task that exists
    for name in tasks:
        queue = app.amqp.router.route({}, name)["queue"].name
        assert queue == ("gpu" if name in on_gpu else "cpu"), name
