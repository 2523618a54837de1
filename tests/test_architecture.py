"""The architecture stays as docs/design.md draws it: Ray only in the engine, torch and transformers
only in the model code (a decode worker never loads them), no import cycles, no repeated blocks."""

import ast
import pickle
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import soundfile as sf
from helpers import ROOT

PACKAGE = ROOT / "pipeline"
MODULES = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
           for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules ``path`` imports (all of them, or only those its import runs: not in functions or
    under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # from pipeline import schema
    return found


def test_only_the_engine_imports_ray():
    users = {name for name, path in MODULES.items()
             if any(m == "ray" or m.startswith("ray.") for m in _imports(path, top_level_only=False))}
    assert users == {"pipeline.engine"}


def test_only_the_model_code_imports_torch_and_transformers():
    for name, path in MODULES.items():
        heavy = {m for m in _imports(path, top_level_only=False) if m.split(".")[0] in ("torch", "transformers")}
        assert not heavy or name.startswith("pipeline.model."), (name, heavy)


def test_no_import_cycles_inside_the_package():
    graph = {name: {m for m in _imports(path, top_level_only=True) if m in MODULES and m != name}
             for name, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for child in sorted(graph[node]):
            assert state.get(child) != "open", f"import cycle: {' -> '.join([*stack, node, child])}"
            if child not in state:
                visit(child, [*stack, node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_a_decode_worker_never_loads_torch_or_transformers(tmp_path):
    """The decode step as Ray ships it (pickled), run in a fresh interpreter, as a Ray worker is."""
    from pipeline.config import load_config
    from pipeline.engine import plan

    sf.write(tmp_path / "a.wav", [0.1, -0.1] * 4_000, 16_000)
    (tmp_path / "m.csv").write_text("id,path\na,a.wav\n")
    overrides = [f"input.path={tmp_path / 'm.csv'}", f"output.path={tmp_path / 'out'}"]
    p = plan(load_config(ROOT / "configs" / "demo.yaml", overrides))
    (tmp_path / "task.pkl").write_bytes(pickle.dumps((p.decode_stage(), p.manifest)))
    code = ("import pickle, sys\n"
            f"stage, table = pickle.loads(open({str(tmp_path / 'task.pkl')!r}, 'rb').read())\n"
            "out = stage(table)\n"
            "print(out['num_samples'][0], out['error'][0], sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'ray')))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().split(maxsplit=2) == ["8000", "None", "[]"]


def _code_lines(path: Path) -> list[tuple[str, int]]:
    """Each line that carries code, stripped, with its number (blank and comment-only lines left out)."""
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            lines.append((text, number))
    return lines


def test_no_block_of_six_lines_is_repeated_inside_the_package():
    """Six consecutive code lines that stand elsewhere in the package too are a helper waiting to be
    written (windows of brackets and other one-token lines alone are not counted)."""
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for name, path in MODULES.items():
        lines = _code_lines(path)
        for i in range(len(lines) - 5):
            window = tuple(text for text, _ in lines[i : i + 6])
            if sum(len(text) > 12 for text in window) >= 4:
                seen[window].append(f"{name}:{lines[i][1]}")
    repeated = {window: places for window, places in seen.items() if len(places) > 1}
    assert not repeated, "\n\n".join("\n".join([*places, *window]) for window, places in repeated.items())
