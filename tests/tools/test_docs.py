"""README.md and docs/*.md: every relative link and #anchor resolves, and every command in their
fenced code blocks names something that exists (`python -m X --help` runs, `bash x.sh` parses,
`python x.py` / `torchrun ... x.py` files exist)."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped except - and _, spaces -> -."""
    text = re.sub(r"`|\*\*|__", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def split_fences(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(prose with fenced blocks removed, [(language, block body)])."""
    prose, blocks, lang, body, inside = [], [], "", [], False
    for line in text.splitlines():
        m = FENCE.match(line)
        if m and not inside:
            inside, lang, body = True, line[3:].strip().lower(), []
        elif m and inside:
            inside = False
            blocks.append((lang, "\n".join(body)))
        elif inside:
            body.append(line)
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text())
    out, seen = set(), {}
    for line in prose.splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(path: Path) -> list[str]:
    prose, _ = split_fences(path.read_text())
    prose = re.sub(r"`[^`\n]*`", "", prose)           # inline code is not a link
    return [a or b for a, b in LINK.findall(prose)]


def broken_links(path: Path) -> list[str]:
    """Every relative link of one markdown file that does not resolve, as 'target: why'."""
    bad = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):    # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: {dest} does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return bad


def commands(path: Path) -> list[list[str]]:
    """The commands of a file's shell code blocks, each as argv without leading VAR=value words."""
    _, blocks = split_fences(path.read_text())
    out = []
    for lang, body in blocks:
        if lang not in SHELL_LANGS:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            if not line or line.startswith("#"):
                continue
            try:
                argv = shlex.split(line, comments=True)
            except ValueError:
                continue
            while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
                argv = argv[1:]
            if argv:
                out.append(argv)
    return out


def is_python(word: str) -> bool:
    return re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", word) is not None


def all_commands() -> list[tuple[str, list[str]]]:
    return [(p.relative_to(ROOT).as_posix(), c) for p in doc_files() for c in commands(p)]


# ---------------------------------------------------------------------------------------------- links

def test_docs_exist():
    assert (ROOT / "README.md").exists()
    assert len(doc_files()) > 1, "docs/*.md missing"


def test_links_are_found():
    n = sum(len(links(p)) for p in doc_files())
    assert n > 20, f"only {n} links found: the link parser is broken"
    assert any("#" in t for p in doc_files() for t in links(p)), "no #anchor links found"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_slug_rule():
    assert slug("When context parallelism pays (a MODEL)") == "when-context-parallelism-pays-a-model"
    assert slug("torch.compile") == "torchcompile"
    assert slug("`vicinity_attention`") == "vicinity_attention"
    assert slug("k-NN attention (KVT)") == "k-nn-attention-kvt"


def test_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Local part\n\n"
                    "[ok](other.md) [ok anchor](other.md#a-section) [ok local](#local-part) "
                    "[web](https://example.com/x) `[not a link](missing.md)`\n\n"
                    "[missing file](nothere.md) [bad anchor](other.md#no-such) [bad local](#nope)\n\n"
                    "```\n[in code](alsomissing.md)\n```\n")
    bad = broken_links(page)
    assert len(bad) == 3, bad
    assert any(b.startswith("nothere.md") for b in bad)
    assert any(b.startswith("other.md#no-such") for b in bad)
    assert any(b.startswith("#nope") for b in bad)


def test_command_parser(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("```bash\nFOO=1 python -m pkg.mod --x \\\n    --y   # comment\nbash a/b.sh --help\n```\n"
                    "```python\npython -m not_a_command\n```\n")
    assert commands(page) == [["python", "-m", "pkg.mod", "--x", "--y"], ["bash", "a/b.sh", "--help"]]


# ------------------------------------------------------------------------------------------- commands

def test_commands_are_found():
    cmds = all_commands()
    assert any(c[0] == "bash" for _, c in cmds), "no bash command found in the docs' code blocks"
    assert any(is_python(c[0]) and c[1:2] == ["-m"] for _, c in cmds), "no python -m command found"


def _modules() -> list[str]:
    return sorted({c[2] for _, c in all_commands() if is_python(c[0]) and len(c) > 2 and c[1] == "-m"})


@pytest.mark.parametrize("where,argv", all_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x[:3]))
def test_command_names_something_that_exists(where, argv):
    prog = argv[0]
    if is_python(prog) and len(argv) > 2 and argv[1] == "-m":
        mod = argv[2]
        assert importlib.util.find_spec(mod) is not None, f"{where}: module {mod} not found"
    elif is_python(prog) and len(argv) > 1:
        assert (ROOT / argv[1]).is_file(), f"{where}: {argv[1]} does not exist"
    elif prog == "bash":
        script = ROOT / argv[1]
        assert script.is_file(), f"{where}: {argv[1]} does not exist"
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{where}: bash -n {argv[1]}: {r.stderr}"
    elif prog == "torchrun":
        scripts = [a for a in argv[1:] if a.endswith(".py")]
        assert scripts and all((ROOT / s).is_file() for s in scripts), f"{where}: {argv}"
    elif prog == "pip":
        pass                                              # installs; nothing in the repository to check
    else:
        pytest.fail(f"{where}: unknown command {' '.join(argv)} (teach tests/tools/test_docs.py about it)")


@pytest.mark.parametrize("module", _modules())
def test_python_module_help_runs(module):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"python -m {module} --help failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
