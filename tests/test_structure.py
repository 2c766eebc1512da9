"""The package's shape: no import circle among kimizmq's modules, and the
`kimi` command loads neither the benchmark nor mlx-lm's server."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kimizmq", "kimizmq_bench")


def _module_imports(path: Path, package: str) -> set[str]:
    """The kimizmq and kimizmq_bench modules a file imports at its top level
    (imports inside functions and under `if TYPE_CHECKING:` run later or never)."""
    found = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(filter(None, [package, base]))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {f"{p}.{f.stem}": ROOT / p / f.name for p in PACKAGES for f in (ROOT / p).glob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name.rsplit(".", 1)[0]
        # `from . import x` names module x; `from .m import f` names m (and f, no module)
        graph[name] = {m for m in _module_imports(path, package) if m in modules and m != name}
        graph[name] -= {f"{p}.__init__" for p in PACKAGES}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in `graph`, as the path that closes it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_finding_cycles_sees_a_circle_and_a_clean_graph():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_among_the_package_modules():
    graph = import_graph()
    assert {"kimizmq.engine", "kimizmq.api", "kimizmq.coordinator", "kimizmq.metrics"} <= graph.keys()
    assert "kimizmq.engine" in graph["kimizmq.api"]  # the API depends on the engine ...
    assert not {"kimizmq.api", "kimizmq.coordinator"} & graph["kimizmq.engine"]  # ... never the other way
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_kimi_command_loads_neither_the_benchmark_nor_mlx_lm_server():
    code = (
        "import sys, kimizmq.cli; "
        "print('\\n'.join(m for m in sys.modules if m.startswith(('kimizmq_bench', 'mlx_lm.server'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == []
    # the check itself sees such an import where there is one
    probe = code.replace("import sys, kimizmq.cli;", "import sys, kimizmq.cli, kimizmq_bench.cli;")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert "kimizmq_bench.cli" in out.stdout.split()
