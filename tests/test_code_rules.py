"""Rules about the code itself, checked with `ast` over every module:

- Dependencies point down: the on-demand backends (afsd/ondemand/) know nothing of the cluster, the node
  daemon or the commands above them; the cluster's sources are handed to them (afsd/ondemand/sources.py).
  Imports inside functions and `TYPE_CHECKING` blocks count, and dynamic imports of a literal name too.
- Daemon logic does not rest on `assert` (`python -O` strips it).
- No dead code: every function the backends, the cluster and the node daemon define is referred to
  somewhere (in afsd, its tests or its benches).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
AFSD = REPOSITORY / "afsd"
# What afsd/ondemand/ must never import: everything that uses it.
ABOVE_ONDEMAND = ("afsd.cluster", "afsd.node", "afsd.cli", "afsd.afslet", "afsd.proxy", "afsd.lab")


def module_name(path: Path) -> str:
    parts = path.relative_to(AFSD.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Every module `path` imports (or `source`, read as if it were that module), by absolute name."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            called = ast.unparse(node.func)
            if called in ("importlib.import_module", "import_module", "__import__"):
                found.add(str(node.args[0].value))
    return found


def modules_under(package: Path) -> list[Path]:
    return sorted(path for path in package.rglob("*.py") if "_pb2" not in path.name)


@pytest.mark.parametrize("path", modules_under(AFSD / "ondemand"), ids=lambda p: str(p.relative_to(AFSD)))
def test_no_module_under_ondemand_imports_what_is_above_it(path: Path) -> None:
    upward = sorted(name for name in imported_modules(path)
                    if any(name == top or name.startswith(top + ".") for top in ABOVE_ONDEMAND))
    assert not upward, f"{path.relative_to(AFSD.parent)} imports {', '.join(upward)}"


def test_the_checker_sees_imports_of_every_form() -> None:
    """Guard against a checker that silently sees nothing."""
    source = ("import afsd.cluster.fetcher\nfrom afsd.node import daemon\nfrom ..base import Backend\n"
              "def later():\n    from afsd.cli import node\n    importlib.import_module('afsd.lab.demo')\n")
    found = imported_modules(AFSD / "ondemand" / "fanotify" / "probe.py", source)
    assert {"afsd.cluster.fetcher", "afsd.node", "afsd.ondemand.base.Backend", "afsd.cli.node",
            "afsd.lab.demo"} <= found


DAEMON_CODE = ("ondemand", "node")   # the kernel backends' daemons and the node daemon


@pytest.mark.parametrize("path", [path for package in DAEMON_CODE for path in modules_under(AFSD / package)],
                         ids=lambda p: str(p.relative_to(AFSD)))
def test_daemon_logic_does_not_rest_on_assert(path: Path) -> None:
    """`python -O` strips assert statements: a daemon's checks must be real code."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    assert not lines, f"{path.relative_to(AFSD.parent)} uses assert at line(s) {lines}"


# Called by a framework, never by name in our code: grpc.aio.ServerInterceptor's hook.
FRAMEWORK_HOOKS = frozenset({"intercept_service"})
CHECKED_FOR_DEAD_CODE = ("cluster", "ondemand", "node")


def names_referred_to(path: Path) -> set[str]:
    """Every name `path` uses: variables, attributes, imported names, and words of string constants
    (entry points such as "module:callable", getattr names)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.alias):
            found.add(node.name.rsplit(".", 1)[-1])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(node.value.replace(":", " ").replace(".", " ").split())
    return found


def test_every_function_of_the_backends_cluster_and_node_is_used() -> None:
    code = [path for folder in ("afsd", "tests", "bench") for path in modules_under(REPOSITORY / folder)]
    used = set().union(*(names_referred_to(path) for path in code))
    unused = []
    for path in [path for package in CHECKED_FOR_DEAD_CODE for path in modules_under(AFSD / package)]:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in used
                    and not node.name.startswith("__") and not node.name[0].isupper()   # dunders, gRPC handlers
                    and node.name not in FRAMEWORK_HOOKS):
                unused.append(f"{path.relative_to(REPOSITORY)}:{node.lineno} {node.name}")
    assert not unused, "defined but never used: " + ", ".join(unused)


# Where a handler may end a call itself: afsd.rpc.refuse, which marks the status as the server's own
# answer (afsd-refusal), so that clients tell a refusal from a server they never reached.
REFUSING_MODULE = AFSD / "rpc.py"
ENDS_A_CALL = frozenset({"abort", "set_code"})


def bare_call_endings(path: Path, source: str | None = None) -> list[str]:
    """`context.abort(...)`/`context.set_code(...)` calls in `path` (or `source`): a method of that name
    called on something named like a servicer context, or given a `StatusCode`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, filename=str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ENDS_A_CALL:
            receiver = ast.unparse(node.func.value)
            arguments = " ".join(ast.unparse(argument) for argument in [*node.args, *node.keywords])
            if receiver.lower().endswith(("context", "ctx")) or "StatusCode" in arguments:
                found.append((node.lineno, f"line {node.lineno}: {ast.unparse(node.func)}(...)"))
    return [text for _, text in sorted(found)]


@pytest.mark.parametrize("path", [path for path in modules_under(AFSD) if path != REFUSING_MODULE],
                         ids=lambda p: str(p.relative_to(AFSD)))
def test_handlers_refuse_calls_only_through_afsd_rpc_refuse(path: Path) -> None:
    bare = bare_call_endings(path)
    assert not bare, f"{path.relative_to(AFSD.parent)} ends calls without afsd.rpc.refuse: {'; '.join(bare)}"


def test_the_refusal_checker_sees_every_form() -> None:
    """Guard against a checker that silently sees nothing (and against one that flags other aborts)."""
    source = ("async def handler(request, context):\n    await context.abort(grpc.StatusCode.NOT_FOUND, 'no')\n"
              "async def other(self, servicer_context):\n    servicer_context.set_code(grpc.StatusCode.INTERNAL)\n"
              "async def third(ctx):\n    await ctx.abort(code, 'no')\n"
              "async def fine(container, connection):\n    container.abort(reason)\n    connection.abort()\n")
    assert bare_call_endings(AFSD / "proxy" / "service.py", source) == [
        "line 2: context.abort(...)", "line 4: servicer_context.set_code(...)", "line 6: ctx.abort(...)"]
