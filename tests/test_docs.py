"""The README and docs/ cannot rot: their snippets run, their links resolve, their reference tables match the code.

Every fenced block of README.md and docs/*.md is run unless the line before it is
`<!-- not tested: REASON -->`:

- ```yaml: written to a file and checked by `harness validate` (exit 0). After `<!-- file: PATH -->` it is
  written to PATH in the page's scratch directory, where later blocks of the page can use it.
- ```bash: each command line runs in the page's scratch directory (a copy of configs/ and docs/); a
  `harness ...` line goes through the console script's entry point (harness.cli.main), anything else
  through bash. The exit code must be 0, or N where the line's comment says `exit N`.
- ```python: executed, in document order, in one namespace per page, in that directory.
- ```text after `<!-- output -->`: every line of it must appear in what the page's previous bash block printed;
  on a machine whose numerics are not those the docs' figures were made with (tests/numerics.py), with
  every number free (the words, verdicts and layout still must match).

All pages run in one subprocess (`python tests/test_docs.py PLAN RESULTS`), each page in its own
scratch directory, so torch and the harness are imported once and nothing leaks into pytest's process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import traceback
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# the folders' own READMEs: their links are checked, their snippets (benchmarks, a notebook) are not run here
LINKED = PAGES + [ROOT / d / "README.md" for d in ("reports", "examples", "benchmarks")]
RUN = ("yaml", "bash", "python")
SHOWN = ("text", "mermaid")  # documentation only: a diagram, a listing
FENCE = re.compile(r"^```([\w-]*)\s*$")
MARK = re.compile(r"^<!--\s*(not tested|file|output)\s*:?\s*(.*?)\s*-->$")
EXIT = re.compile(r"#.*\bexit (\d+)\b")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"^(?:configs|tests|harness|attacks|defenses|benchmarks|examples|docs|\.ci)/[\w./-]*[\w/]$")


@dataclass
class Block:
    page: str  # relative to ROOT
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: Optional[str] = None  # the reason it is not run
    file: Optional[str] = None  # where a yaml block is written
    output: bool = False  # a text block that shows what the previous bash block printed


def blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        assert i < len(lines), f"{page.name}:{start + 1}: a fenced block is never closed"
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.match(prev)
        block = Block(str(page.relative_to(ROOT)), start + 1, m.group(1), "\n".join(lines[start + 1:i]) + "\n")
        if mark and mark.group(1) == "not tested":
            block.skip = mark.group(2)
        elif mark and mark.group(1) == "output":
            block.output = True
        elif mark:
            block.file = mark.group(2)
        found.append(block)
        i += 1
    return found


def commands(text: str) -> Iterator[str]:
    """A bash block's command lines: continuations joined, blank and comment-only lines left out."""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line and not line.startswith("#"):
            yield line


def expected_exit(line: str) -> int:
    m = EXIT.search(line)
    return int(m.group(1)) if m else 0


# ---------------------------------------------------------------- the driver (runs in the subprocess)

def _run_cli(argv: list[str]) -> tuple[int, str]:
    from harness.cli import main

    out = io.StringIO()
    old = sys.argv
    sys.argv = argv
    code: Any = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    code = 0 if code is None else code if isinstance(code, int) else 1
    return code, out.getvalue()


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _printed(line: str, printed: str, exact: bool) -> bool:
    """Whether `line` appears in `printed`: as it is, or (not `exact`) with any number in place of each of its numbers."""
    if exact:
        return line in printed
    pattern = "".join(r"\d+(?:\.\d+)?" if part is None else re.escape(part)
                      for piece in re.split(r"(\d+(?:\.\d+)?)", line) for part in ([None] if _NUMBER.fullmatch(piece) else [piece]))
    return re.search(pattern, printed) is not None


def _drive_page(page: str, page_blocks: list[dict], scratch: Path, exact: bool = True) -> list[dict]:
    results = []
    os.chdir(scratch)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    printed = ""  # by the last bash block
    for b in page_blocks:
        where = f"{page}:{b['line']}"
        ok, detail = True, ""
        try:
            if b["lang"] == "yaml":
                path = Path(b["file"] or f"_snippet_{b['line']}.yaml")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(b["text"], encoding="utf-8")
                code, said = _run_cli(["harness", "validate", str(path)])
                ok, detail = code == 0, f"harness validate exited {code}: {said.strip()}"
            elif b["lang"] == "python":
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    exec(compile(b["text"], where, "exec"), namespace)
                detail = out.getvalue()
            elif b["lang"] == "text":
                missing = [line for line in b["text"].splitlines() if line.strip() and not _printed(line.strip(), printed, exact)]
                ok, detail = not missing, "not printed by the bash block before it:\n" + "\n".join(missing) + f"\nit printed:\n{printed}"
            elif b["lang"] == "bash":
                printed = ""
                for line in commands(b["text"]):
                    want = expected_exit(line)
                    argv = shlex.split(line, comments=True)
                    if argv and argv[0] == "harness":
                        code, said = _run_cli(argv)
                    else:
                        done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=300)
                        code, said = done.returncode, done.stdout + done.stderr
                    detail += f"$ {line}\n{said}"
                    printed += said
                    if code != want:
                        ok = False
                        detail += f"-> exit {code}, the docs say {want}\n"
                        break
        except Exception:
            ok, detail = False, traceback.format_exc()
        results.append({"page": page, "line": b["line"], "lang": b["lang"], "ok": ok, "detail": detail[-4000:]})
    return results


def _drive(plan_path: str, results_path: str) -> None:
    import torch

    torch.set_num_threads(1)  # tiny models on a shared machine: one thread is the faster setting
    plan = json.loads(Path(plan_path).read_text(encoding="utf-8"))
    results = []
    for page, page_blocks in plan["pages"].items():
        scratch = Path(tempfile.mkdtemp(prefix="docs-", dir=plan["scratch"]))
        for folder in ("configs", "docs"):
            shutil.copytree(ROOT / folder, scratch / folder)
        results.extend(_drive_page(page, page_blocks, scratch, plan.get("exact", True)))
    Path(results_path).write_text(json.dumps(results), encoding="utf-8")


# ---------------------------------------------------------------- the tests

import pytest  # noqa: E402  (the driver above runs without pytest's import cost)

ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
def _runs(b: Block) -> bool:
    return b.skip is None and (b.lang in RUN or b.output)


RUN_PAGES = sorted({b.page for b in ALL_BLOCKS if _runs(b)})


@pytest.fixture(scope="module")
def snippet_results(tmp_path_factory) -> dict[str, list[dict]]:
    scratch = tmp_path_factory.mktemp("docs")
    from .numerics import elsewhere_note, on_reference

    exact = on_reference()
    if not exact:
        print(elsewhere_note())
    plan = {"scratch": str(scratch), "pages": {}, "exact": exact}
    for b in ALL_BLOCKS:
        if _runs(b):
            plan["pages"].setdefault(b.page, []).append(asdict(b))
    plan_path, results_path = scratch / "plan.json", scratch / "results.json"
    plan_path.write_text(json.dumps(plan), encoding="utf-8")
    done = subprocess.run([sys.executable, __file__, str(plan_path), str(results_path)], cwd=scratch,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the snippet driver failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    by_page: dict[str, list[dict]] = {}
    for r in json.loads(results_path.read_text(encoding="utf-8")):
        by_page.setdefault(r["page"], []).append(r)
    return by_page


@pytest.mark.parametrize("page", RUN_PAGES)
def test_snippets_run(page: str, snippet_results) -> None:
    results = snippet_results.get(page, [])
    assert len(results) == sum(b.page == page and _runs(b) for b in ALL_BLOCKS)
    failed = [f"{r['page']}:{r['line']} ({r['lang']}):\n{r['detail']}" for r in results if not r["ok"]]
    assert not failed, "\n\n".join(failed)


def test_every_block_is_run_or_says_why() -> None:
    for b in ALL_BLOCKS:
        where = f"{b.page}:{b.line}"
        assert b.lang in RUN + SHOWN, f"{where}: a ```{b.lang or '(no language)'} block: use one of {RUN + SHOWN}"
        if b.skip is not None:
            assert len(b.skip) >= 10, f"{where}: `not tested` needs a reason"
        if b.output:
            assert b.lang == "text", f"{where}: `<!-- output -->` goes before a ```text block"
        if b.file is not None:
            assert b.lang == "yaml" and not Path(b.file).is_absolute() and ".." not in Path(b.file).parts, where
    # a parser that found nothing would pass everything: the docs do hold this much
    run = [b for b in ALL_BLOCKS if b.skip is None]
    harness_lines = [c for b in run if b.lang == "bash" for c in commands(b.text) if c.startswith("harness ")]
    assert sum(b.lang == "yaml" for b in run) >= 10 and sum(b.lang == "python" for b in run) >= 4
    assert {c.split()[1] for c in harness_lines} >= {"run", "gate", "compare", "verify", "harden", "validate"}


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    in_fence = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        if in_fence or not line.startswith("#"):
            continue
        slug = _slug(line.lstrip("#"))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _prose(page: Path) -> str:
    """The page without its fenced blocks (a link or a path in a snippet is the snippet's business)."""
    out, in_fence = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if not in_fence:
            out.append(line)
    return "\n".join(out)


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_paths_resolve(page: Path) -> None:
    prose = _prose(page)
    bad = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"link {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"link {target}: {dest.name} has no heading with that anchor")
    for span in CODE_SPAN.findall(prose):
        for token in span.split():
            path, _, test = token.partition("::")
            if REPO_PATH.match(path) and "<" not in path:
                if not (ROOT / path).exists():
                    bad.append(f"`{token}`: no such file or folder in the repository")
                elif test and not re.search(rf"^def {re.escape(test)}\(", (ROOT / path).read_text(encoding="utf-8"), re.M):
                    bad.append(f"`{token}`: {path} has no test {test}")
    assert not bad, f"{page.relative_to(ROOT)}:\n" + "\n".join(bad)


def _models_in(annotation: Any, listed: bool = False) -> Iterator[tuple[type, bool]]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, listed
        return
    origin = typing.get_origin(annotation)
    for arg in typing.get_args(annotation):
        yield from _models_in(arg, listed or origin is list)


def _sections(cls: type, path: str = "") -> Iterator[tuple[str, type]]:
    yield path, cls
    for name, field in cls.model_fields.items():
        for sub, listed in _models_in(field.annotation):
            yield from _sections(sub, f"{path}.{name}".lstrip(".") + ("[]" if listed else ""))


def test_configuration_reference_lists_every_key_with_its_default() -> None:
    import yaml

    from harness.config import Config

    for path, cls in _sections(Config):
        fields = {k: f for k, f in cls.model_fields.items() if k != "params"}  # params: the entry's own knobs
        # one table per class at a path (attacks[] holds an attack or the corruptions entry)
        documented = [{r["key"]: r for r in t} for t in _tables(ROOT / "docs" / "configuration.md", path or "top level")]
        assert documented, f"docs/configuration.md has no section for `{path}` ({cls.__name__})"
        match = next((t for t in documented if set(t) == set(fields)), None)
        assert match is not None, (f"docs/configuration.md, `{path or 'top level'}` ({cls.__name__}): the keys are "
                                   f"{sorted(fields)}, the tables list {[sorted(t) for t in documented]}")
        for key, field in fields.items():
            cell = match[key]["default"]
            where = f"docs/configuration.md, `{path}.{key}`".replace("`.", "`")
            if cell == "required":
                assert field.is_required(), f"{where}: documented as required, but defaults to {field.default!r}"
                continue
            assert not field.is_required(), f"{where}: required in the code, documented with a default {cell}"
            code = CODE_SPAN.fullmatch(cell)
            if code:  # a plain value: it must be the code's; prose ("see ...") is not compared
                assert yaml.safe_load(code.group(1)) == field.default, f"{where}: the docs say {cell}, the code {field.default!r}"


def _tables(page: Path, heading: str) -> list[list[dict[str, str]]]:
    """The separate tables (runs of consecutive table lines) under every heading whose key is `heading`."""
    found: list[list[dict[str, str]]] = []
    current, run = None, None
    for line in _prose(page).splitlines() + [""]:
        if line.startswith("#"):
            span = CODE_SPAN.search(line)
            current = span.group(1) if span else line.lstrip("#").strip().lower()
        if line.startswith("|") and current == heading:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            key = CODE_SPAN.fullmatch(cells[0])
            if run is None:
                run = []
                found.append(run)
            if key and len(cells) >= 2:
                run.append({"key": key.group(1), "default": cells[1]})
        else:
            run = None
    return [t for t in found if t]


@pytest.mark.parametrize("kind, page", [("attacks", "attacks.md"), ("defenses", "defenses.md"), ("probes", "poisoning.md")])
def test_every_registered_name_has_its_docs(kind: str, page: str) -> None:
    if kind == "attacks":
        from harness.attacks import ATTACKS as registry
    elif kind == "defenses":
        from harness.defenses import DEFENSES as registry
    else:
        from harness.attacks.poisoning import PROBES as registry
    names = set(registry.names())
    if kind == "probes":
        from harness.evaluation.probes import SCANS

        names |= set(SCANS)
    table_names = {n for line in _prose(ROOT / "docs" / page).splitlines() if line.startswith("|")
                   for n in CODE_SPAN.findall(line.split("|")[1])}
    assert names <= table_names, f"docs/{page} has no table row for {sorted(names - table_names)}"


def test_quick_start_test_command_is_the_one_ci_runs() -> None:
    """Step 2 of the README's quick start is what .ci/run runs first (there with pip's -q)."""
    quick = next(b for b in blocks(ROOT / "README.md") if b.lang == "bash")
    steps = list(commands(quick.text))
    assert steps[0] == "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/harness run"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert steps[1].replace("pip install -e", "pip install -q -e") in ci.splitlines()


if __name__ == "__main__":
    _drive(sys.argv[1], sys.argv[2])
