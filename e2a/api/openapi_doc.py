"""Generate ``e2a/api/openapi.json`` and ``docs/api-reference.md`` from :mod:`e2a.api.openapi_spec`.

Usage (from the repository root)::

    python -m e2a.api.openapi_doc          # rewrite both files
    python -m e2a.api.openapi_doc --check  # exit 1 when either file is stale

The Markdown reference is rendered from the JSON document itself (not from the Python source),
so what a reader sees is exactly what OpenAPI tools and the server see. Output is
deterministic; tests compare the committed files with a fresh rendering.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from e2a.api.openapi_spec import TS_FRAC, TS_SEC, build_document

METHOD_ORDER = ("get", "head", "post", "put", "delete")
AUTH_TEXT = {
    "none": "none",
    "optional": "none (a valid key, if sent, attaches the user)",
    "key": "API key (user- or agent-scoped; an agent key is restricted to its agent)",
    "user": "user-scoped API key (agent keys: 403 `insufficient_scope`)",
    "token": "the magic-link token in the link (no API key)",
    "metrics": "none, or `Authorization: Bearer <metrics.token>` when `metrics.token` is set",
}


def render_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def load_document() -> dict[str, Any]:
    """The shipped document (``e2a/api/openapi.json`` inside the installed package)."""
    return json.loads(resources.files("e2a.api").joinpath("openapi.json").read_text("utf-8"))


# ---------------------------------------------------------------------------- schema text


def _ref_name(schema: dict[str, Any]) -> str | None:
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def type_text(schema: dict[str, Any]) -> str:
    """A short human type: ``string``, ``integer (1–604800)``, `` `a` \\| `b` ``, ``Agent[]``."""
    name = _ref_name(schema)
    if name:
        return f"[{name}](#{name.lower()})"
    if schema.get("title") and schema.get("type") == "object":
        return f"[{schema['title']}](#{schema['title'].lower()})"
    if "anyOf" in schema:
        parts = [type_text(s) for s in schema["anyOf"] if s.get("type") != "null"]
        return " or ".join(parts)
    if "enum" in schema:
        return " | ".join(f"`{v}`" for v in schema["enum"] if v is not None)
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    pattern = schema.get("pattern", "")
    if pattern == TS_FRAC["pattern"]:
        return "ts-frac"
    if pattern == TS_SEC["pattern"]:
        return "ts-sec"
    if pattern.startswith("^msg_"):
        return "string `msg_…`"
    kind = schema.get("type")
    kinds = [k for k in (kind if isinstance(kind, list) else [kind]) if k and k != "null"]
    if kinds == ["array"]:
        items = schema.get("items", {})
        inner = type_text(items)
        base = f"{inner}[]" if not inner.startswith("`") else f"array of {inner}"
        if isinstance(kind, list) and "null" in kind and "description" not in schema:
            base += " or null"
        return base
    if not kinds:
        return "any"
    text = " or ".join(kinds)
    if isinstance(kind, list) and "null" in kind and schema.get("__response"):
        text += " or null"
    bounds = []
    if "minimum" in schema or "maximum" in schema:
        bounds.append(f"{schema.get('minimum', '')}–{schema.get('maximum', '')}")
    if "minLength" in schema or "maxLength" in schema:
        lo, hi = schema.get("minLength"), schema.get("maxLength")
        bounds.append(f"≤ {hi} chars" if lo is None else f"{lo}–{hi} chars" if hi else f"≥ {lo} char")
    if "pattern" in schema and schema["pattern"].startswith("^e2a"):
        bounds.append(f"`{schema['pattern']}`")
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def fields_table(schema: dict[str, Any], *, request: bool) -> list[str]:
    props = schema.get("properties", {})
    if not props:
        return []
    required = set(schema.get("required", []))
    lines = ["| Field | Type | " + ("Required" if request else "Present") + " | Notes |", "|---|---|---|---|"]
    for name, sub in props.items():
        if request:
            presence = "yes" if name in required else "no"
        else:
            presence = "always" if name in required else "when set"
        lines.append(f"| `{name}` | {_cell(type_text(sub))} | {presence} | {_cell(sub.get('description', ''))} |")
    return lines


# ---------------------------------------------------------------------------- endpoints


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """``node`` with a local ``$ref`` (``#/components/...``) followed."""
    ref = node.get("$ref")
    if not isinstance(ref, str):
        return node
    target: Any = doc
    for part in ref.lstrip("#/").split("/"):
        target = target[part]
    return target


def _anchor(method: str, path: str) -> str:
    raw = f"{method} {path}".lower()
    return "".join(c for c in raw.replace(" ", "-") if c.isalnum() or c in "-_")


def _operations(doc: dict[str, Any]):
    for path, item in doc["paths"].items():
        for method in METHOD_ORDER:
            if method in item:
                yield path, method, item[method], item.get("parameters", [])


def _curl(method: str, path: str, op: dict[str, Any]) -> str | None:
    auth = op.get("x-e2a-auth")
    if auth == "token" or method == "head":
        return None
    url_path = (
        path.replace("{email}", "my-bot@agents.example.com")
        .replace("{id}", "msg_0123456789abcdef0123456789abcdef")
        .replace("{domain}", "example.com")
    )
    if path.endswith("/signing-secrets/{id}"):
        url_path = path.replace("{id}", "wsec_0123456789abcdef0123456789abcdef")
    if path.startswith("/api/v1/keys/"):
        url_path = path.replace("{id}", "apk_0123456789abcdef0123456789abcdef")
    if path == "/api/v1/users/me":
        url_path += "?confirm=DELETE"
    parts = ["curl -s"]
    if method != "get":
        parts.append(f"-X {method.upper()}")
    parts.append(f'"$E2A{url_path}"')
    if auth in ("key", "user"):
        parts.append('-H "Authorization: Bearer $KEY"')
    example = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("example")
    if example is not None:
        parts.append("-d '" + json.dumps(example, ensure_ascii=False) + "'")
    if len(" ".join(parts)) <= 100:
        return " ".join(parts)
    return " \\\n  ".join(parts)


def _success_example(op: dict[str, Any]) -> tuple[str, Any] | None:
    for status, resp in op["responses"].items():
        if status.startswith("2"):
            example = resp.get("content", {}).get("application/json", {}).get("example")
            if example is not None:
                return status, example
    return None


def render_operation(
    doc: dict[str, Any], path: str, method: str, op: dict[str, Any], shared_params: list[dict[str, Any]]
) -> list[str]:
    out = [f"### {method.upper()} `{path}`", "", f"**{op['summary']}.** Auth: {AUTH_TEXT[op['x-e2a-auth']]}.", ""]
    out += [op["description"], ""]
    params = [*shared_params, *op.get("parameters", [])]
    if params:
        out += ["| Parameter | In | Type | Notes |", "|---|---|---|---|"]
        for prm in params:
            req = " (required)" if prm.get("required") and prm["in"] == "query" else ""
            out.append(
                f"| `{prm['name']}` | {prm['in']}{req} | {_cell(type_text(prm['schema']))} | "
                f"{_cell(prm.get('description', ''))} |"
            )
        out.append("")
    body = op.get("requestBody")
    if body:
        media, content = next(iter(body["content"].items()))
        kind = "JSON" if media == "application/json" else "form (`application/x-www-form-urlencoded`)"
        need = "required" if body.get("required") else "optional (may be empty)"
        out += [f"Request body: {kind}, {need}.", ""]
        out += fields_table(content["schema"], request=True) + [""]
    out += ["| Status | Response |", "|---|---|"]
    errors = op.get("x-e2a-errors", {})
    for status, resp in op["responses"].items():
        resp = resolve(doc, resp)
        if status in errors:
            codes = ", ".join(f"`{c}`" for c in errors[status])
            out.append(f"| {status} | error: {codes} |")
            continue
        content = resp.get("content", {})
        if "application/json" in content:
            schema = content["application/json"]["schema"]
            name = _ref_name(schema)
            what = f"[{name}](#{name.lower()})" if name else _inline(schema)
        elif content:
            what = f"`{next(iter(content))}`: {resp['description']}"
        else:
            what = resp["description"] + " (no body)"
        out.append(f"| {status} | {_cell(what)} |")
    out.append("")
    curl = _curl(method, path, op)
    if curl:
        out += ["Example:", "", "```sh", curl, "```", ""]
        success = _success_example(op)
        if success:
            status, example = success
            out += [f"→ {status}", "", "```json", json.dumps(example, ensure_ascii=False), "```", ""]
    return out


def _inline(schema: dict[str, Any]) -> str:
    """A response body described inline: ``{"status": "ok"}``-like field list."""
    props = schema.get("properties")
    if not props:
        return "JSON object"
    required = set(schema.get("required", []))
    parts = []
    for name, sub in props.items():
        mark = "" if name in required else "?"
        parts.append(f"`{name}`{mark}: {type_text(sub)}")
    return "{" + ", ".join(parts) + "}"


def render_markdown(doc: dict[str, Any]) -> str:
    info = doc["info"]
    lines = [
        f"# {info['title']} reference",
        "",
        "<!-- Generated by `python -m e2a.api.openapi_doc` from e2a/api/openapi.json; do not edit by hand. -->",
        "",
        "The machine-readable OpenAPI 3.1 document is served by every e2a server at "
        "`GET /api/openapi.json` (no key needed) and ships in the package as `e2a/api/openapi.json`. "
        "In the examples, `$E2A` is the server's base URL (for example `http://127.0.0.1:8080`) and "
        "`$KEY` an API key.",
        "",
        info["description"],
        "",
        "## Endpoints",
        "",
        "| Method | Path | Auth | Summary |",
        "|---|---|---|---|",
    ]
    for path, method, op, _shared in _operations(doc):
        auth = op["x-e2a-auth"]
        lines.append(f"| {method.upper()} | [`{path}`](#{_anchor(method, path)}) | {auth} | {op['summary']} |")
    lines.append("")
    for tag in doc["tags"]:
        ops = [(p, m, o, s) for p, m, o, s in _operations(doc) if tag["name"] in o["tags"]]
        if not ops:
            continue
        lines += [f"## {tag['name']}", "", tag["description"], ""]
        for path, method, op, shared in ops:
            lines += [f'<a id="{_anchor(method, path)}"></a>', ""]
            lines += render_operation(doc, path, method, op, shared)
    lines += ["## Objects", ""]
    for name, schema in doc["components"]["schemas"].items():
        lines += [f"### {name}", ""]
        if schema.get("description"):
            lines += [schema["description"], ""]
        table = fields_table(schema, request=False)
        if table:
            lines += table + [""]
        for field, sub in schema.get("properties", {}).items():
            if sub.get("type") == "object" and sub.get("properties"):
                lines += [f"`{field}`:", ""] + fields_table(sub, request=False) + [""]
    lines += [
        "## Error codes",
        "",
        "Every non-2xx response of the JSON API (not the magic-link pages, not `/metrics`) is "
        '`{"error": {"code": "…", "message": "…"}}` with `Content-Type: application/json`. A missing '
        "object and an object owned by someone else are the same 404.",
        "",
        "| Code | Status | Meaning |",
        "|---|---|---|",
    ]
    for row in doc["x-e2a-error-codes"]:
        lines.append(f"| `{row['code']}` | {row['status']} | {_cell(row['meaning'])} |")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- files


def repo_paths(root: Path) -> tuple[Path, Path]:
    return root / "e2a" / "api" / "openapi.json", root / "docs" / "api-reference.md"


def expected_files() -> tuple[str, str]:
    """(openapi.json text, api-reference.md text) as they must be committed."""
    doc = build_document()
    text = render_json(doc)
    return text, render_markdown(json.loads(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated file is stale")
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[2]), help="repository root")
    args = parser.parse_args(argv)
    json_path, md_path = repo_paths(Path(args.root))
    stale = []
    for path, text in zip((json_path, md_path), expected_files(), strict=True):
        current = path.read_text("utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text, "utf-8")
    if args.check and stale:
        for path in stale:
            print(f"stale: {path} (run: python -m e2a.api.openapi_doc)", file=sys.stderr)
        return 1
    for path in stale:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
