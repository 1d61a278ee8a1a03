"""The layers of server/ import only downward: a module imports its own folder and the folders
below it, never one above. Read from the source, so a lazy import inside a function counts too."""

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).parents[1] / "server"
# top to bottom; a folder may import itself and anything after it in this list
LAYERS = ["tools", "cli", "entrypoints", "traffic", "core", "storage", "media", "cache", "model", "engines"]
# modules under server/ itself that any layer above `model` may use
FOUNDATION = {"config", "budget", "metrics"}
EVERYWHERE = {"errors", "tracing"}  # exception types; spans, which every layer starts (it imports no layer)


def layer_of(module: str) -> str:
    """`server.core.service` -> `core`; `server.config` -> `config`."""
    return module.split(".")[1]


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [node.module] if node.module != "server" else [f"server.{a.name}" for a in node.names]
    return [name for name in found if name.startswith("server.")]


def allowed(importer: str, imported: str) -> bool:
    if imported == importer or imported in EVERYWHERE:
        return True
    if imported in FOUNDATION:
        return importer in FOUNDATION or LAYERS.index(importer) < LAYERS.index("model")
    if imported not in LAYERS:
        return False
    if importer in FOUNDATION:
        return False  # the foundation stands on nothing
    return LAYERS.index(imported) > LAYERS.index(importer)


def modules() -> list[Path]:
    return sorted(p for p in SERVER.rglob("*.py") if p.name != "__init__.py" or p.stat().st_size)


def test_every_module_belongs_to_a_layer():
    names = {layer_of("server." + str(p.relative_to(SERVER)).replace("/", ".")) for p in modules()}
    unknown = {n.removesuffix(".py") for n in names} - set(LAYERS) - FOUNDATION - EVERYWHERE
    assert not unknown, f"modules outside any layer: {unknown}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(SERVER)))
def test_imports_go_only_downward(path: Path):
    importer = str(path.relative_to(SERVER)).split("/")[0].removesuffix(".py")
    upward = [m for m in imports_of(path) if not allowed(importer, layer_of(m))]
    assert not upward, f"{path.relative_to(SERVER)} imports a layer above it: {upward}"
