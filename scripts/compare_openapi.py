"""Compare the gateway's OpenAPI document at another commit with the working tree's, ignoring order.

    uv run python scripts/compare_openapi.py 04e467a

Exits 0 when the two documents are the same once keys and unordered lists are sorted, else prints
where they differ and exits 1. The other commit is checked out into a temporary worktree and its app
built there with this venv's packages; the app factory is found where that commit keeps it.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# where the app factory and the settings lived over the project's history, newest first
LAYOUTS = [("server/entrypoints/app.py", "server.entrypoints.app", "server.config"),
           ("server/api/app.py", "server.api.app", "server.api.settings")]
DOCUMENT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from {app} import create_app
from {settings} import Settings
print(json.dumps(create_app(Settings()).openapi()))
"""


def document(tree: Path) -> dict:
    for marker, app, settings in LAYOUTS:
        if (tree / marker).exists():
            code = DOCUMENT.format(app=app, settings=settings)
            out = subprocess.run([sys.executable, "-c", code, str(tree)], check=True, capture_output=True,
                                 text=True, cwd=tree).stdout
            return json.loads(out)
    raise SystemExit(f"no app factory found in {tree}")


def canonical(value):
    """Sorted keys; lists whose order carries no meaning (required names, tags, enums...) sorted too.
    Schema lists such as anyOf/allOf keep their order apart from being compared as sorted JSON."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        items = [canonical(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    return value


def differences(before, after, where: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        found = [f"{where}/{k}: only before" for k in before.keys() - after.keys()]
        found += [f"{where}/{k}: only after" for k in after.keys() - before.keys()]
        for k in sorted(before.keys() & after.keys()):
            found += differences(before[k], after[k], f"{where}/{k}")
        return found
    return [] if before == after else [f"{where}: {json.dumps(before)[:200]} != {json.dumps(after)[:200]}"]


def main(base: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), base], check=True, cwd=ROOT)
        try:
            before = canonical(document(tree))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=True, cwd=ROOT)
    after = canonical(document(ROOT))
    found = differences(before, after)
    for line in found:
        print(line)
    print(f"{len(found)} differences between {base} and the working tree")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "HEAD"))
