"""The documentation stays true to the code (fast tier, no model built):

- every command the README shows, with each of its options, is run by a named test;
- docs/configuration.md is what docs/make_config_reference.py makes from entrep/config.py now;
- the README's layering rule holds for every import in entrep/;
- the make targets the README gives run what it says; relative links in README.md and docs/ resolve.
"""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

# ------------------------------------------------------------------------------ README commands -> tests
# The programs a README command may start with (longest first where one is a prefix of another).
PROGRAMS = ("make demo", "make test-fast", "make test", "accelerate launch train.py", "python train.py",
            "python infer.py", "python submit.py", "python -m entrep.data check", "python -m entrep.preflight",
            "python -m entrep.score", "python -m entrep.blend", "python -m entrep.ablate", "python -m entrep.demo",
            "python -m entrep.runs", "python -m entrep.report")

DEMO = "tests/test_readme.py::test_make_demo_runs_end_to_end"  # runs `make demo`: the Makefile's demo recipe
E2E = "tests/test_e2e.py::test_train_infer_submit_on_demo"
RUNS = "tests/test_page.py::test_the_runs_table_lists_every_run_and_blend_with_fold_spreads_sorts_and_diffs"
PAGE = "tests/test_page.py::test_python_m_entrep_report_rebuilds_the_page_from_the_run_and_its_release"
MAKE_TESTS = "tests/test_docs.py::test_the_make_test_targets_run_pytest_as_the_readme_says"

# (program, option or override key; "" = the program itself) -> (test that runs it, text that shows it there:
# in the test's file, or for the `make demo` test in the Makefile's demo recipe)
COVERED = {
    ("make demo", ""): (DEMO, '"make", "demo"'),
    ("make test-fast", ""): (MAKE_TESTS, '"test-fast"'),
    ("make test", ""): (MAKE_TESTS, '"test"'),
    ("python -m entrep.data check", ""): (DEMO, "-m entrep.data check"),
    ("python -m entrep.data check", "--test"): (DEMO, "--test $(DEMO_DATA)/test"),
    ("python -m entrep.preflight", ""): ("tests/test_preflight.py::test_preflight_on_the_demo_config",
                                        '"-m", "entrep.preflight"'),
    ("python -m entrep.preflight", "--config"): ("tests/test_preflight.py::test_preflight_on_the_demo_config",
                                                 '"--config"'),
    ("python -m entrep.preflight", "--data"): ("tests/test_preflight.py::test_preflight_on_the_demo_config",
                                               '"--data"'),
    ("accelerate launch train.py", ""): (DEMO, "$(ACCELERATE) train.py"),
    ("accelerate launch train.py", "--config"): (DEMO, "train.py --config"),
    ("accelerate launch train.py", "--data"): (DEMO, "--data $(DEMO_DATA)"),
    ("accelerate launch train.py", "--name"): (DEMO, "--name demo_seed1"),
    ("accelerate launch train.py", "train.seed"): (DEMO, "train.seed=1"),
    ("accelerate launch train.py", "train.resume"): (E2E, '"train.resume=true"'),
    ("python train.py", ""): ("tests/test_resume.py::test_killed_run_resumes_to_the_same_result", '"train.py"'),
    ("python infer.py", ""): (DEMO, "infer.py --run"),
    ("python infer.py", "--run"): (DEMO, "infer.py --run"),
    ("python infer.py", "--data"): (DEMO, "--data $(DEMO_DATA)/test"),
    ("python submit.py", ""): (DEMO, "submit.py --run"),
    ("python submit.py", "--run"): (DEMO, "submit.py --run"),
    ("python submit.py", "--topk"): (E2E, '"--topk"'),
    ("python submit.py", "--out"): (E2E, '"--out"'),
    ("python -m entrep.score", ""): (DEMO, "-m entrep.score"),
    ("python -m entrep.score", "--track"): (DEMO, "--track"),
    ("python -m entrep.score", "--submission"): (DEMO, "--submission"),
    ("python -m entrep.score", "--truth"): (DEMO, "--truth"),
    ("python -m entrep.blend", ""): (DEMO, "-m entrep.blend"),
    ("python -m entrep.blend", "--runs"): (DEMO, "--runs $(RUNS)/demo"),
    ("python -m entrep.blend", "--name"): (DEMO, "--name demo_blend"),
    ("python -m entrep.ablate", ""): ("tests/test_ablate.py::test_ladder_runs_and_each_rung_flips_exactly_its_switch",
                                      "from entrep.commands.ablate import"),
    ("python -m entrep.demo", ""): (DEMO, "-m entrep.demo"),
    ("python -m entrep.runs", ""): (DEMO, "-m entrep.runs $(RUNS)"),
    ("python -m entrep.runs", "--sort"): (RUNS, '"--sort"'),
    ("python -m entrep.runs", "--diff"): (RUNS, '"--diff"'),
    ("python -m entrep.report", ""): (PAGE, '"-m", "entrep.report"'),
    ("python -m entrep.report", "--data"): (PAGE, '"--data"'),
    ("entrep.predict", ""): ("tests/test_entry_points.py::test_entrep_predict_is_a_library_call_that_matches_infer_py",
                             "entrep.predict("),
    ("entrep.train_fold", ""): ("tests/test_entry_points.py::test_entrep_train_fold_trains_a_fold_as_train_py_does",
                                "entrep.train_fold("),
}


def fenced_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def command_lines(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and
            not line.lstrip().startswith("#")]


def program_of(line: str) -> str | None:
    for p in PROGRAMS:
        if line == p or line.startswith(p + " "):
            return p
    return None


def features(line: str, program: str) -> set[str]:
    """The options (`--flag`) and override keys (`a.b=`) a command line uses."""
    out = set()
    for tok in line[len(program):].split():
        if tok.startswith("--"):
            out.add(tok.split("=")[0])
        elif m := re.fullmatch(r"([a-z_]+(?:\.[a-z_]+)+)=.*", tok):
            out.add(m.group(1))
    return out


def readme_uses() -> list[tuple[str, str, str]]:
    """(program, feature, where) for every command, option and library call the README shows."""
    text = README.read_text()
    uses = []
    for block in fenced_blocks(text, "bash"):
        for line in command_lines(block):
            program = program_of(line)
            uses.append((program or line, "", line))
            uses += [(program, f, line) for f in sorted(features(line, program))] if program else []
    for block in fenced_blocks(text, "python"):
        uses += [(f"entrep.{name}", "", f"entrep.{name}(") for name in re.findall(r"\bentrep\.(\w+)\(", block)]
    commands = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    uses += [(cmd, "", "the Commands table") for cmd in re.findall(r"^\| `([^`]+)` \|", commands, flags=re.M)]
    return uses


def test_every_command_the_readme_shows_is_run_by_a_named_test():
    uses = readme_uses()
    assert any(p == "accelerate launch train.py" for p, _, _ in uses) and any(p == "make demo" for p, _, _ in uses)
    missing = sorted({(p, f, where) for p, f, where in uses if (p, f) not in COVERED})
    assert not missing, ("the README shows commands no test runs; add a test and an entry to COVERED, or drop "
                         f"them from the README: {missing}")


def _test_source(test_id: str) -> str:
    path, name = test_id.split("::")
    source = (ROOT / path).read_text()
    names = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
    assert name in names, f"{test_id}: no such test"
    if test_id == DEMO:  # it runs `make demo`: what that runs is the Makefile's demo recipe
        makefile = (ROOT / "Makefile").read_text()
        source += makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    return source


@pytest.mark.parametrize("use", sorted(COVERED), ids=lambda u: f"{u[0]} {u[1]}".strip())
def test_each_named_test_exists_and_runs_what_it_is_named_for(use):
    test_id, evidence = COVERED[use]
    assert evidence in _test_source(test_id), (use, test_id, evidence)


def test_the_configs_the_readme_names_are_shipped():
    named = set(re.findall(r"configs/[\w.-]+\.yaml", README.read_text()))
    assert named and all((ROOT / n).is_file() for n in named), named


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_the_make_test_targets_run_pytest_as_the_readme_says():
    """`make -n`: what `make test` and `make test-fast` would run (CI runs `make test` through .ci/run)."""
    venv = Path(sys.prefix)
    def dry(target):
        r = subprocess.run(["make", "-n", target, f"VENV={venv}", "-o", f"{venv}/.installed", "-o",
                            f"{venv}/.installed-dev"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return [line for line in r.stdout.splitlines() if "-m pytest" in line]

    (every,) = dry("test")
    (fast,) = dry("test-fast")
    assert "-n 2" in every and "--dist loadgroup" in every and "not slow" not in every
    assert "-n 2" in fast and '-m "not slow"' in fast
    assert re.search(r"^make test$", (ROOT / ".ci/run").read_text(), flags=re.M)


# ------------------------------------------------------------------------------ generated reference
def test_the_configuration_page_is_what_the_generator_makes_now():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import make_config_reference as gen
    finally:
        sys.path.remove(str(ROOT / "docs"))
    assert gen.PAGE.read_text(encoding="utf-8") == gen.render(), \
        "docs/configuration.md is stale: run python docs/make_config_reference.py"


def test_the_configuration_page_names_every_key():
    from entrep.config import Config, _keys

    page = (ROOT / "docs/configuration.md").read_text()
    import dataclasses
    leaves = [k for k in _keys(Config) if not dataclasses.is_dataclass(_field_type(k))]
    assert leaves and all(f"| `{k}` |" in page for k in leaves), [k for k in leaves if f"| `{k}` |" not in page]


def _field_type(key: str):
    import typing

    from entrep.config import Config

    tp = Config
    for part in key.split("."):
        tp = typing.get_type_hints(tp)[part]
    return tp


# ------------------------------------------------------------------------------ layering
SHIMS = {"score", "blend", "preflight", "ablate", "demo", "report", "runs", "data.__main__"}


def readme_layers() -> dict[str, int]:
    """module (dotted, under entrep) -> layer, from the README's Layout table."""
    layout = README.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for n, cell in re.findall(r"^\| (\d+) \| (.+?) \|", layout, flags=re.M):
        names = re.findall(r"`([^`]+)`", cell)
        if names and names[0].endswith("/"):
            package = names[0].rstrip("/")
            inside = names[1:] or [p.stem for p in (ROOT / "entrep" / package).glob("*.py")
                                   if p.stem not in ("__init__", "__main__")]
            names = [f"{package}.{m}" for m in inside]
        for m in names:
            layers[m] = int(n)
    return layers


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT / "entrep").with_suffix("").parts)


def entrep_imports(path: Path) -> list[tuple[str, int]]:
    """(imported entrep module, line) for every import in the file, deferred ones inside functions too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.module, node.lineno)] + [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    known = {module_name(p) for p in (ROOT / "entrep").rglob("*.py")}
    return [(name[len("entrep."):], line) for name, line in out
            if name.startswith("entrep.") and name[len("entrep."):] in known]


def test_the_readme_layering_rule_holds_for_every_import():
    layers = readme_layers()
    modules = {module_name(p): p for p in (ROOT / "entrep").rglob("*.py")
               if p.name != "__init__.py" and module_name(p) not in SHIMS}
    assert set(modules) == set(layers), ("modules missing from the README's layer table, or listed there but "
                                         f"gone: {sorted(set(modules) ^ set(layers))}")
    upward, same = [], {}
    for m, path in modules.items():
        for target, line in entrep_imports(path):
            if target == m:
                continue
            if layers[target] > layers[m]:
                upward.append(f"entrep/{path.relative_to(ROOT / 'entrep')}:{line} (layer {layers[m]}) imports "
                              f"{target} (layer {layers[target]})")
            elif layers[target] == layers[m]:
                same.setdefault(m, set()).add(target)
    assert not upward, upward

    def cycle_from(start, node, seen):
        for nxt in same.get(node, ()):
            if nxt == start:
                return [node, nxt]
            if nxt not in seen:
                seen.add(nxt)
                if found := cycle_from(start, nxt, seen):
                    return [node, *found]
        return None

    cycles = [c for m in same if (c := cycle_from(m, m, {m}))]
    assert not cycles, f"modules of one layer import each other in a circle: {cycles}"


def test_no_function_in_the_package_is_over_60_lines():
    """A function too long to read whole on one screen hides its steps: split it."""
    long = [f"entrep/{p.relative_to(ROOT / 'entrep')}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in (ROOT / "entrep").rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long


def test_the_shims_only_hand_over_to_commands():
    """Each shim imports run_main alone and names its command module for run_main to import (so a
    Ctrl-C during the command's imports is handled like one later)."""
    paths = [ROOT / "entrep" / (m.replace(".", "/") + ".py") for m in SHIMS] + [ROOT / s for s in
                                                                                ("train.py", "infer.py", "submit.py")]
    for path in paths:
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imported == {"entrep.cli"}, (path, imported)
        (target,) = re.findall(r'run_main\("(entrep\.commands\.\w+)"\)', path.read_text())
        assert (ROOT / (target.replace(".", "/") + ".py")).is_file(), (path, target)


# ------------------------------------------------------------------------------ links
@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = [target for target in re.findall(r"\]\(([^)\s]+)\)", text)
              if not re.match(r"[a-z]+://|#|mailto:", target)
              and not (page.parent / target.split("#")[0]).exists()]
    assert not broken, broken
