"""The docs site (docs/, mkdocs.yml) and the README: the site builds with --strict, every public name has its API
entry, the README stays a short front page whose test command is the one CI runs, and every ```bash and ```python
example in the docs is executed, page by page, on 60 real photos."""

from __future__ import annotations

import ast
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import shared_dataset

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
RUNNABLE = {"bash", "python"}
# Fenced blocks in any other language are shown, never run: output (text), file contents (csv, json, yaml, ...).
SHOWN = {"text", "csv", "json", "yaml", "toml", "html", "dockerfile"}
SKIP = re.compile(r"^<!--\s*skip:(.*?)-->$")
FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)")
BLOCK_TIMEOUT_S = 300
PHOTOS_PER_CLASS = 30
TIMES: dict[str, float] = {}
BLOCK_TIMES: dict[str, float] = {}
CPU_TIMES: dict[str, float] = {}
"""CPU seconds (user + system) of each page's example processes: what the examples cost on a loaded machine too."""


@dataclass
class Block:
    page: str
    line: int
    language: str
    code: str
    skip: str | None
    """The reason given in a `<!-- skip: REASON -->` line right above the block, else None."""


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in document order, with their indentation removed."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language = match.groups()
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        assert i < len(lines), f"{path.name}:{start + 1}: a code block that is never closed"
        i += 1
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.match(previous)
        blocks.append(Block(path.name, start + 1, language.lower(),
                            "\n".join(body) + "\n", skip.group(1).strip() if skip else None))
    return blocks


def doc_pages() -> list[Path]:
    """Every Markdown page of the site, docs/reference/ included."""
    return sorted(DOCS.rglob("*.md"))


def nav_pages() -> list[str]:
    """The pages in mkdocs.yml's nav, in its order (relative to docs/)."""
    return re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w./-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)


def example_pages() -> list[str]:
    """The pages with examples to run, in the nav's order (then any page the nav lacks)."""
    with_examples = {str(p.relative_to(DOCS)) for p in doc_pages()
                     if any(b.language in RUNNABLE and b.skip is None for b in fenced_blocks(p))}
    ordered = [page for page in nav_pages() if page in with_examples]
    return ordered + sorted(with_examples - set(ordered))


def readme_example() -> Block:
    """The README's one example that runs (its install and test commands carry skip lines)."""
    runnable = [b for b in fenced_blocks(README) if b.language in RUNNABLE and b.skip is None]
    assert len(runnable) == 1, f"the README should have exactly one example that runs, not {len(runnable)}"
    return runnable[0]


# ------------------------------------------------------------------------------------------- fast checks


def test_docs_build_strict(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page missing from the nav, or an API entry that cannot be
    collected fails it."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    command = [str(mkdocs)] if mkdocs.exists() else [sys.executable, "-m", "mkdocs"]
    start = time.perf_counter()
    built = subprocess.run([*command, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    seconds = time.perf_counter() - start
    TIMES["mkdocs build --strict"] = seconds
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-6000:]
    assert seconds < 60, f"the docs took {seconds:.0f} s to build (target: under 60 s)"
    site = tmp_path / "site"
    for page in nav_pages():
        folder = page.removesuffix(".md").removesuffix("index")
        assert (site / folder / "index.html").is_file(), f"{page} was not built"
    assert "train" in (site / "reference" / "training" / "index.html").read_text(encoding="utf-8")


def test_every_page_is_in_the_nav():
    in_nav = set(nav_pages())
    missing = [str(p.relative_to(DOCS)) for p in doc_pages() if str(p.relative_to(DOCS)) not in in_nav]
    assert not missing, f"pages missing from mkdocs.yml's nav: {missing}"


def _public_names() -> dict[str, str]:
    """transferkit.__all__ -> its defining module, read from src/transferkit/__init__.py (`_WHERE`)."""
    tree = ast.parse((ROOT / "src" / "transferkit" / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_WHERE" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("src/transferkit/__init__.py has no _WHERE")


def test_every_public_name_has_an_api_entry():
    import transferkit

    where = _public_names()
    assert sorted(where) == sorted(transferkit.__all__)
    entries = set()
    for page in (DOCS / "reference").glob("*.md"):
        entries |= set(re.findall(r"^:::\s*([\w.]+)", page.read_text(encoding="utf-8"), re.M))
    missing = [name for name, module in sorted(where.items())
               if f"transferkit.{module}.{name}" not in entries and f"transferkit.{name}" not in entries]
    assert not missing, ("public names without an entry in docs/reference/ (add `::: transferkit.MODULE.NAME` to "
                         f"the page of its area): {missing}")


def test_readme_is_a_short_front_page_with_ci_test_command():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) < 120, f"README.md has {len(lines)} lines (target: under 120; details go to docs/)"
    test_command = ("python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' -c constraints-dev.txt && "
                    ".venv/bin/python -m pytest")
    assert test_command in lines, "the README's test command changed"
    ci_lines = [line for line in CI.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == test_command, "CI must run exactly the README's test command"
    assert ("python3 -m venv .venv && .venv/bin/pip install -e '.[onnx]' && .venv/bin/transferkit demo"
            in lines), "the README's first command changed"
    for target in re.findall(r"\]\((docs/[^)#\s]+)", text):
        assert (ROOT / target).is_file(), f"the README links to {target}, which does not exist"
    assert "mkdocs serve" in text and "mkdocs build --strict" in text


def test_code_blocks_are_runnable_or_shown_and_skips_say_why():
    """Every fenced block is bash or python (run) or a language that is only shown; a skipped block gives its
    reason; skips stay rare."""
    skipped = []
    for path in [*doc_pages(), README]:
        for block in fenced_blocks(path):
            where = f"{path.name}:{block.line}"
            assert block.language in RUNNABLE | SHOWN, (
                f"{where}: ```{block.language or '(no language)'}: write ```bash or ```python for what runs, "
                f"or one of {sorted(SHOWN)} for what is only shown")
            if block.skip is not None:
                assert block.language in RUNNABLE, f"{where}: only bash and python blocks can be skipped"
                assert len(block.skip) >= 10, f"{where}: a skip needs its reason: <!-- skip: REASON -->"
                if path != README:
                    skipped.append(where)
    assert len(skipped) <= 12, f"too many skipped examples ({len(skipped)}): {skipped}"


def test_readme_example_is_run_by_the_quickstart():
    """The README's example is executed as part of docs/quickstart.md: its lines, in its order."""
    example = [line for line in readme_example().code.splitlines() if line.strip()]
    quickstart = [line for block in fenced_blocks(DOCS / "quickstart.md")
                  if block.language == readme_example().language and block.skip is None
                  for line in block.code.splitlines()]
    position = 0
    for line in example:
        assert line in quickstart[position:], f"the README's example line {line!r} is not run by quickstart.md"
        position = quickstart.index(line, position) + 1


def test_block_parser_reads_skips_indents_and_languages(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- skip: needs two machines -->\n```bash\nfalse\n```\n\n- item\n\n  ```python\n"
                    "  print(1)\n  ```\n```text\nout\n```\n", encoding="utf-8")
    blocks = fenced_blocks(page)
    assert [(b.language, b.skip, b.code) for b in blocks] == [
        ("bash", "needs two machines", "false\n"), ("python", None, "print(1)\n"), ("text", None, "out\n")]


# ------------------------------------------------------------------------------------------- the examples


@pytest.fixture(scope="session")
def doc_photos(tmp_path_factory) -> Path:
    """photos/ with ants/ and bees/: the first 30 hymenoptera training images of each class (sorted by name)."""
    source = shared_dataset("hymenoptera") / "train"
    photos = tmp_path_factory.mktemp("doc-photos") / "photos"
    for label in ("ants", "bees"):
        (photos / label).mkdir(parents=True)
        for image in sorted((source / label).iterdir())[:PHOTOS_PER_CLASS]:
            shutil.copy2(image, photos / label / image.name)
    return photos


@pytest.fixture(scope="module", autouse=True)
def report_times(request):
    """Per-page seconds of the examples (and the build time), printed at the end of the module."""
    yield
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or capture is None or not TIMES:
        return
    examples = sum(s for name, s in TIMES.items() if name.endswith(".md"))
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        totals = [("examples in all", examples)] if BLOCK_TIMES else []
        for name, seconds in [*BLOCK_TIMES.items(), *TIMES.items(), *totals]:
            cpu = f" (cpu {CPU_TIMES[name]:6.1f} s)" if name in CPU_TIMES else ""
            reporter.write_line(f"docs: {name:<40} {seconds:6.1f} s{cpu}")
        if CPU_TIMES:
            reporter.write_line(f"docs: {'examples in all, cpu':<40} {sum(CPU_TIMES.values()):6.1f} s "
                                f"(load average now {os.getloadavg()[0]:.1f})")


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """One example in `cwd`: bash blocks with -e -o pipefail, python blocks with this interpreter. Its output goes to
    a file (a server it left in the background then cannot hold the test up), and its process group is ended
    afterwards, so nothing it started outlives it."""
    script = cwd / f".block-{block.line}.{'sh' if block.language == 'bash' else 'py'}"
    script.write_text(block.code, encoding="utf-8")
    log = cwd / f".block-{block.line}.log"
    command = (["bash", "-e", "-o", "pipefail", script.name] if block.language == "bash"
               else [sys.executable, script.name])
    with log.open("w", encoding="utf-8") as output:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            process.wait(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            output.write(f"\n[killed after {BLOCK_TIMEOUT_S} s]\n")
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log.read_text(encoding="utf-8", errors="replace")
    script.unlink()
    log.unlink()
    return subprocess.CompletedProcess(command, process.returncode, text, "")


@pytest.mark.slow
@pytest.mark.parametrize("page", example_pages())
def test_page_examples_run(page, doc_photos, tmp_path):
    """Each page's bash and python blocks, in document order, in a fresh folder holding photos/ (ants/, bees/),
    with this environment's commands first on PATH and the session's private default cache."""
    if shutil.which("curl") is None:
        pytest.fail("the examples call servers with curl: apt-get install curl")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(doc_photos, work / "photos")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
           "COLUMNS": "120"}
    assert env["TRANSFERKIT_CACHE_DIR"], "the default cache must be the session's private one (conftest.py)"
    start, cpu_start = time.perf_counter(), _children_cpu()
    for block in fenced_blocks(DOCS / page):
        if block.language not in RUNNABLE or block.skip is not None:
            continue
        started = time.perf_counter()
        done = run_block(block, work, env)
        BLOCK_TIMES[f"  {page}:{block.line}"] = time.perf_counter() - started
        assert done.returncode == 0, (f"docs/{page}:{block.line}: the ```{block.language} example failed (exit "
                                      f"{done.returncode}):\n{block.code}\n--- output ---\n{done.stdout[-6000:]}")
    TIMES[page] = time.perf_counter() - start
    CPU_TIMES[page] = _children_cpu() - cpu_start


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
