#!/usr/bin/env python3
"""Check every vLLM symbol, signature and field the CUDA path uses against released vLLM source, statically.

    python scripts/check_vllm_seams.py --vllm 0.25.1 0.33.0 0.34.0 [--cache DIR] [--offline] [--json OUT]

For each version: the wheel ``vllm-X-*.whl`` is taken from the cache directory (default
``$VLLM_ATTNCAP_CACHE/vllm-wheels``, else ``~/.cache/vllm-attncap/vllm-wheels``) or fetched into it with
``pip download vllm==X --no-deps``; its ``.py`` files are read from the zip and parsed with ``ast`` (nothing is
installed or imported). Every seam of the table in ``scripts/vllm_seams.py`` is looked up; the report says, per
version, what is missing or changed and prints each method's signature where the versions differ.

Exit status: 0 when every required seam holds in every version (optional seams and ``any_field`` spellings may
differ: the code handles them); 1 when a required seam is missing; 2 when a wheel is neither cached nor
downloadable (``--offline`` turns a missing wheel into a skip with its reason, exit 0 if nothing else failed).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_seams import IF_MODULE, SEAMS  # noqa: E402


def default_cache() -> Path:
    base = os.environ.get("VLLM_ATTNCAP_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "vllm-attncap") / "vllm-wheels"


def find_wheel(cache: Path, version: str) -> Path | None:
    hits = sorted(cache.glob(f"vllm-{version}-*.whl"))
    return hits[0] if hits else None


def fetch_wheel(cache: Path, version: str) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps", "--only-binary=:all:",
                    "-d", str(cache), "-q"], check=True)
    w = find_wheel(cache, version)
    if w is None:
        raise FileNotFoundError(f"pip download vllm=={version} left no wheel in {cache}")
    return w


class Source:
    """The ``.py`` files of one wheel, parsed on demand."""

    def __init__(self, wheel: Path) -> None:
        self.zip = zipfile.ZipFile(wheel)
        self.names = set(self.zip.namelist())
        self._trees: dict[str, tuple[ast.Module, str] | None] = {}

    def module(self, name: str) -> tuple[ast.Module, str] | None:
        if name not in self._trees:
            path = name.replace(".", "/")
            tree = None
            for cand in (path + ".py", path + "/__init__.py"):
                if cand in self.names:
                    text = self.zip.read(cand).decode("utf-8")
                    tree = (ast.parse(text), text)
                    break
            self._trees[name] = tree
        return self._trees[name]

    def resolve(self, module: str, name: str, depth: int = 0):
        """``(module, node)`` of the top-level definition of ``name`` seen from ``module`` (following imports)."""
        mod = self.module(module)
        if mod is None or depth > 8:
            return None
        tree = mod[0]
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return module, node
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return module, node
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                return module, node
        for node in ast.walk(tree):  # imports, also inside `if TYPE_CHECKING` / try blocks
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if (a.asname or a.name) == name:
                        src = _abs_module(module, node, self)
                        if src is not None:
                            got = self.resolve(src, a.name, depth + 1)
                            if got is not None:
                                return got
        # `current_platform` and friends: a module-level __getattr__ or lazy name
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                if f'"{name}"' in ast.get_source_segment(mod[1], node) or f"'{name}'" in ast.get_source_segment(mod[1], node):
                    return module, node
        return None

    def class_chain(self, module: str, cls: str):
        """The class and its bases that resolve inside vLLM, nearest first: ``[(module, ClassDef), ...]``."""
        out, todo, seen = [], [(module, cls)], set()
        while todo:
            m, c = todo.pop(0)
            got = self.resolve(m, c)
            if got is None or not isinstance(got[1], ast.ClassDef) or (got[0], c) in seen:
                continue
            seen.add((got[0], c))
            out.append(got)
            for b in got[1].bases:
                bname = b.id if isinstance(b, ast.Name) else (b.attr if isinstance(b, ast.Attribute) else None)
                if isinstance(b, ast.Subscript):
                    v = b.value
                    bname = v.id if isinstance(v, ast.Name) else None
                if bname:
                    todo.append((got[0], bname))
        return out


def _abs_module(module: str, node: ast.ImportFrom, src: Source) -> str | None:
    if node.level == 0:
        return node.module
    is_pkg = src.module(module) is not None and (module.replace(".", "/") + "/__init__.py") in src.names
    parts = module.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def _members(cls: ast.ClassDef) -> dict[str, ast.AST]:
    out = {}
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def _self_fields(cls: ast.ClassDef) -> set[str]:
    out = set()
    for node in ast.walk(cls):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for t in targets:
            for sub in ast.walk(t):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                    out.add(sub.attr)
    return out


def _params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    names += [x.arg for x in a.kwonlyargs]
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return names


def check_seam(src: Source, seam) -> dict:
    kind, module, name, detail, used_by = seam
    res = {"kind": kind, "module": module, "name": name, "used_by": used_by, "ok": False, "info": ""}
    optional = detail == "optional"
    res["optional"] = optional
    if kind == "module":
        res["ok"] = src.module(module) is not None
        return res
    if src.module(module) is None:
        res["info"] = "module missing"
        res["optional"] = optional or module in IF_MODULE
        return res
    if kind in ("class", "function", "name"):
        got = src.resolve(module, name)
        res["ok"] = got is not None
        if got is None:
            res["info"] = "not defined or imported there"
        else:
            res["info"] = f"in {got[0]}"
            if kind == "function" and isinstance(got[1], ast.FunctionDef):
                res["signature"] = _params(got[1])
                if isinstance(detail, tuple):
                    missing = [p for p in detail if p not in res["signature"]]
                    res["ok"] = not missing
                    res["info"] += f"; missing parameters {missing}" if missing else ""
        return res
    cls_name, _, member = name.partition(".")
    chain = src.class_chain(module, cls_name)
    if not chain:
        res["info"] = f"class {cls_name} missing"
        return res
    if kind == "any_field":
        found = [f for f in detail if any(f in _members(c) or f in _self_fields(c) for _, c in chain)]
        res["ok"] = bool(found)
        res["info"] = f"present: {found}; absent: {[f for f in detail if f not in found]}"
        return res
    for m, c in chain:
        members = _members(c)
        if kind == "member" and member in members:
            res["ok"], res["info"] = True, f"in {m}.{c.name}"
            return res
        if kind == "field" and (member in members or member in _self_fields(c)):
            res["ok"], res["info"] = True, f"in {m}.{c.name}"
            return res
        if kind in ("method", "source") and isinstance(members.get(member), (ast.FunctionDef, ast.AsyncFunctionDef)):
            fn = members[member]
            res["signature"] = _params(fn)
            if kind == "method":
                missing = [p for p in (detail or ()) if p not in res["signature"]]
                res["ok"] = not missing
                res["info"] = f"in {m}.{c.name}" + (f"; missing parameters {missing}" if missing else "")
            else:
                text = ast.get_source_segment(src.module(m)[1], fn) or ""
                labels = [label for label, pat in detail.items() if pat in text]
                res["ok"] = len(labels) == 1
                res["info"] = f"{labels[0] if labels else 'none of ' + str(list(detail))} ({m}.{c.name}.{member})"
                res["label"] = labels[0] if labels else None
            return res
    res["info"] = f"{member} not found in {[f'{m}.{c.name}' for m, c in chain]}"
    return res


def check_version(wheel: Path) -> list[dict]:
    src = Source(wheel)
    return [check_seam(src, s) for s in SEAMS]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm", nargs="+", required=True, metavar="VERSION")
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--offline", action="store_true", help="use cached wheels only; skip (with reason) the others")
    ap.add_argument("--json", type=Path, help="write the full result here")
    args = ap.parse_args(argv)

    results, status = {}, 0
    for v in args.vllm:
        wheel = find_wheel(args.cache, v)
        if wheel is None and args.offline:
            print(f"vllm {v}: SKIPPED (no cached wheel in {args.cache}; run without --offline to fetch it)")
            continue
        if wheel is None:
            try:
                wheel = fetch_wheel(args.cache, v)
            except (subprocess.CalledProcessError, FileNotFoundError) as e:
                print(f"vllm {v}: cannot fetch the wheel: {e}")
                status = max(status, 2)
                continue
        results[v] = check_version(wheel)

    versions = list(results)
    for v in versions:
        bad = [r for r in results[v] if not r["ok"] and not r["optional"]]
        opt = [r for r in results[v] if not r["ok"] and r["optional"]]
        layout = next((r.get("label") for r in results[v] if r["kind"] == "source"), None)
        print(f"\nvllm {v}: {len(results[v]) - len(bad) - len(opt)}/{len(results[v])} seams hold; "
              f"FlashAttention KV layout: {layout}")
        for r in bad:
            print(f"  MISSING  {r['kind']:9s} {r['module']}:{r['name']}  ({r['info']}; used by {r['used_by']})")
            status = max(status, 1)
        for r in opt:
            print(f"  absent   {r['kind']:9s} {r['module']}:{r['name']}  (optional: {r['info']}; {r['used_by']} "
                  "copes without it)")
        for r in results[v]:
            if r["kind"] == "any_field":
                print(f"  spelling {r['module']}:{r['name']}  {r['info']}")
    if len(versions) > 1:
        print("\nSignatures that differ between versions:")
        n = 0
        for i, seam in enumerate(SEAMS):
            sigs = {v: results[v][i].get("signature") for v in versions}
            if len({tuple(s) if s else None for s in sigs.values()}) > 1:
                n += 1
                print(f"  {seam[1]}:{seam[2]}")
                for v, s in sigs.items():
                    print(f"    {v}: ({', '.join(s) if s else 'absent'})")
        if not n:
            print("  none")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
