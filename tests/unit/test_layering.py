"""Layering guards: where things may live in the e2a package (checked in CI with the rest)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "e2a"

# A string literal is SQL when it *starts* with a statement: keyword plus what must follow it,
# so HTTP methods ("DELETE"), prose ("Select a domain") and log text do not count. Upper-case
# keywords are our SQL convention, which is what keeps prose out.
_SQL_START = re.compile(
    r"""^\s*(?:
        SELECT\s+\S
      | INSERT\s+INTO\s
      | UPDATE\s+\w+(?:\s+\w+)?\s+SET\s
      | DELETE\s+FROM\s
      | WITH\s+(?:RECURSIVE\s+)?\w+(?:\s*\([^)]*\))?\s+AS\s
      | (?:LISTEN|UNLISTEN|NOTIFY)\s+\w
      | (?:CREATE|DROP|ALTER|TRUNCATE)\s+(?:TABLE|INDEX|DATABASE|SCHEMA|ROLE|EXTENSION|UNIQUE)\b
      | (?:BEGIN|COMMIT|ROLLBACK|SAVEPOINT)\s*;?\s*$
      | SET\s+(?:LOCAL\s+)?\w+\s*(?:=|TO)\s
    )""",
    re.VERBOSE,
)


def looks_like_sql(text: str) -> bool:
    """Whether a string literal starts with a SQL statement."""
    return bool(_SQL_START.match(text))


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def sql_literals(source: str) -> list[tuple[int, str]]:
    """(line, first 60 characters) of every string literal in ``source`` that starts with SQL.

    An f-string counts by its leading literal part; docstrings are prose and skipped.
    """
    tree = ast.parse(source)
    skip = _docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        text = None
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
        elif isinstance(node, ast.JoinedStr):
            # placeholders read as a name: f"SELECT {columns} FROM ..." starts with a statement
            text = "".join(str(v.value) if isinstance(v, ast.Constant) else "x" for v in node.values)
            for part in node.values:  # ast.walk reaches the parts later: do not check them alone
                skip.add(id(part))
        if text is not None and looks_like_sql(text):
            found.append((node.lineno, text.strip()[:60]))
    return found


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SELECT id FROM agents WHERE id = %s", True),
        ("  SELECT 1", True),
        ("INSERT INTO feedback (id) VALUES (%s)", True),
        ("UPDATE api_keys SET last_used_at = now()", True),
        ("UPDATE messages m SET status = 'read'", True),
        ("DELETE FROM messages WHERE id = %s", True),
        ("WITH due AS (SELECT 1) SELECT * FROM due", True),
        ("LISTEN e2a_delivery", True),
        ("NOTIFY e2a_delivery, 'x'", True),
        ("CREATE TABLE t (id int)", True),
        ("DELETE", False),
        ("GET", False),
        ("Type DELETE to confirm", False),
        ("add ?confirm=DELETE to delete the account", False),
        ("Select a domain first", False),
        ("select the newest key", False),
        ("NOTIFY", False),
        ("with the agent's key", False),
        ("", False),
    ],
)
def test_looks_like_sql_table(text: str, expected: bool) -> None:
    """The SQL detector flags statements and leaves HTTP methods and prose alone."""
    assert looks_like_sql(text) is expected


def test_sql_literals_sees_fstrings_and_skips_docstrings() -> None:
    """f-strings count as a whole; docstrings never count."""
    source = (
        'def f(cols):\n'
        '    """SELECT in a docstring is prose."""\n'
        '    return f"SELECT {cols} FROM messages"\n'
        'X = "DELETE"\n'
    )
    assert sql_literals(source) == [(3, "SELECT x FROM messages")]


def test_sql_only_in_store() -> None:
    """Every SQL statement of the package lives in e2a/store/ (the store owns all SQL)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        if rel.parts[:2] == ("e2a", "store"):
            continue
        for line, text in sql_literals(path.read_text(encoding="utf-8")):
            offenders.append(f"{rel}:{line}: {text}")
    assert offenders == [], "SQL outside e2a/store/:\n" + "\n".join(offenders)


_BELOW_API = ("delivery", "smtp", "mailauth", "store")


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source``, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            if node.module == "e2a":  # from e2a import api
                found.extend((node.lineno, f"e2a.{alias.name}") for alias in node.names)
    return found


def test_imported_modules_sees_nested_and_from_imports() -> None:
    """Imports inside functions and ``from e2a import api`` are both seen."""
    source = "import os\ndef f():\n    from e2a.api.auth import Principal\nfrom e2a import api, config\n"
    assert sorted(imported_modules(source)) == [
        (1, "os"), (3, "e2a.api.auth"), (4, "e2a"), (4, "e2a.api"), (4, "e2a.config"),
    ]


def test_no_api_imports_below() -> None:
    """e2a/delivery, e2a/smtp, e2a/mailauth and e2a/store never import the HTTP API (e2a.api)."""
    offenders = []
    for layer in _BELOW_API:
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            rel = path.relative_to(PACKAGE.parent)
            for line, module in imported_modules(path.read_text(encoding="utf-8")):
                if module == "e2a.api" or module.startswith("e2a.api."):
                    offenders.append(f"{rel}:{line}: imports {module}")
    assert offenders == [], "the API imported below it:\n" + "\n".join(offenders)
