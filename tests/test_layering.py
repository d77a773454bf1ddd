"""Dependencies point one way: core <- engines <- server <- CLI; analysis uses engines, never the server.

Every `import functok_vllm...` in the package (at module level or inside a function) is read from the source with
`ast`, and each layer may import only the layers below it. The core also imports no engine or server library at all
(`test_steer_core.py` checks that in a fresh interpreter).
"""

import ast
from pathlib import Path

import functok_vllm

PACKAGE = Path(functok_vllm.__file__).parent
# layer -> the layers it may import (a layer may always import itself). "base": the top-level helper modules
# (steering objects, validation messages, paths, errors, the corpus, function-token discovery...).
ALLOWED = {
    "core": set(),
    "base": {"core"},
    "engines": {"core", "base"},
    "analysis": {"core", "base", "engines"},
    "train": {"core", "base", "engines"},
    "server": {"core", "base", "engines", "analysis"},
    "cli": {"core", "base", "engines", "analysis", "train", "server"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "functok_vllm" or len(parts) == 1:
        return ""
    sub = parts[1]
    if sub in ("core", "engines", "analysis", "train", "server"):
        return sub
    if sub == "cli":
        return "cli"
    return "base"


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in out if m.startswith("functok_vllm")]


def test_every_import_points_down():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        me = layer_of(".".join(rel.parts))
        for line, module in imports(path):
            them = layer_of(module)
            if them and them != me and them not in ALLOWED[me]:
                bad.append(f"{rel}.py:{line} ({me}) imports {module} ({them})")
    assert bad == [], "\n".join(bad)


def test_the_rule_is_checked_on_real_imports():
    """The scan sees the imports it must judge: the server imports engines, engines import the core."""
    app = imports(PACKAGE / "server" / "app.py")
    assert any(layer_of(m) == "engines" for _, m in app)
    worker = imports(PACKAGE / "engines" / "vllm" / "worker.py")
    assert any(layer_of(m) == "core" for _, m in worker) and all(layer_of(m) != "server" for _, m in worker)
    assert not ALLOWED["engines"] & {"server", "analysis", "cli"} and "server" not in ALLOWED["analysis"]
