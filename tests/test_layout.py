"""The code's layout, read from its source: the import graph of igpt/ and pipelines/ (every import statement, a
function's too: no cycle, the model package above nothing but its leaves, no training code importing a report
module, entry points only in pipelines/), and no function over 60 lines."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORTS = {"igpt.track.compare", "igpt.track.study_report", "igpt.track.laws"}
LEAVES = {"igpt.errors", "igpt.fields", "igpt.recipes"}  # import no other igpt module: anything may use them


def _modules() -> dict[str, Path]:
    out = {}
    for p in [*ROOT.glob("igpt/**/*.py"), *ROOT.glob("pipelines/*.py")]:
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def graph() -> dict[str, set[str]]:
    """module -> the igpt/pipelines modules it imports (``from a import b``: ``a.b`` when that is a module)."""
    mods = _modules()
    g = {}
    for name, path in mods.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        g[name] = {m for m in found if m in mods and m != name}
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    state, out = {}, []

    def visit(u: str, path: list[str]) -> None:
        state[u] = "open"
        for v in sorted(g[u]):
            if state.get(v) == "open":
                out.append(path[path.index(v):] + [u, v] if v in path else [u, v])
            elif v not in state:
                visit(v, path + [u])
        state[u] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [])
    return out


def test_the_graph_is_read_and_has_no_cycle():
    g = graph()
    assert "igpt.model.config" in g["igpt.model.hf"] and "igpt.fields" in g["igpt.model.config"]  # imports are read
    assert not cycles(g), cycles(g)
    # the check finds one: a made-up arrow back closes a circle
    assert cycles({**g, "igpt.fields": {"igpt.model.config"}})


def test_the_model_imports_only_itself_and_leaves():
    g = graph()
    bad = {m: sorted(v - LEAVES) for m, v in g.items() if m.startswith("igpt.model")
           and v - LEAVES - {k for k in g if k.startswith("igpt.model")}}
    assert not bad, bad
    assert all(g[m] <= LEAVES for m in LEAVES), {m: g[m] for m in LEAVES}


def test_no_training_code_imports_a_report_module():
    g = graph()
    training = [m for m in g if m.startswith(("igpt.model", "igpt.data", "igpt.train", "igpt.eval"))]
    assert len(training) > 20
    bad = {m: sorted(g[m] & REPORTS) for m in training if g[m] & REPORTS}
    assert not bad, bad


def test_the_library_never_imports_an_entry_point_and_each_entry_point_is_one_call():
    """``pipelines/`` holds entry points only: each parses its job's config and calls the library (``pipelines.JOBS``
    names where each job lives); igpt imports none of them."""
    from pipelines import JOBS

    g = graph()
    assert not {m: v for m, v in g.items() if m.startswith("igpt") and any(x.startswith("pipelines") for x in v)}
    entries = sorted(p.stem for p in (ROOT / "pipelines").glob("*.py") if p.stem != "__init__")
    assert entries == sorted(JOBS)
    for job in entries:
        assert g[f"pipelines.{job}"] <= {"pipelines"}, job  # nothing but the dispatcher
        assert len((ROOT / "pipelines" / f"{job}.py").read_text().splitlines()) < 10, job
        module, config = JOBS[job]
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), module


def test_no_function_is_over_60_lines():
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert len(_modules()) > 50 and not long, long
