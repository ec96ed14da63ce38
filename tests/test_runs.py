"""The run folder's versioned layout, and the house rules: one owner of its file names, no import cycles."""

import ast
import json
import shutil
from pathlib import Path

import pytest

import ichedge
from ichedge.data import DataError
from ichedge.runs import CONFIG, LAYOUT_VERSION, ExportFolder, RunFolder
from ichedge.runtimes import Predictor

PACKAGE = Path(ichedge.__file__).parent


def _copy_run(run: Path, to: Path, edit) -> Path:
    """A copy of a run folder with its config.json edited (the shared run stays untouched)."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("export*"))
    meta = json.loads((to / CONFIG).read_text())
    edit(meta)
    (to / CONFIG).write_text(json.dumps(meta))
    return to


def test_a_new_run_and_its_export_record_their_layout(tiny_run, tiny_export):
    assert json.loads((tiny_run / CONFIG).read_text())["layout"] == LAYOUT_VERSION
    run = RunFolder.open(tiny_run)
    assert run.preprocessing.size == 32 and run.context_model() is not None
    assert tiny_export.folder in [e.path for e in run.exports()]
    assert ExportFolder(tiny_export.folder).card()["layout"] == LAYOUT_VERSION


def test_a_layout_1_run_folder_still_loads_and_predicts_the_same(tiny_run, tmp_path):
    def as_layout_1(meta):  # before the layout key, heads, trimming and slice context existed
        del meta["layout"]
        for key in ("head", "trim", "context"):
            del meta["config"][key]

    old = _copy_run(tiny_run, tmp_path / "old", as_layout_1)
    run = RunFolder.open(old)
    assert run.meta["layout"] == LAYOUT_VERSION
    assert (run.config["head"], run.config["trim"], run.config["context"]) == ("paper", False, False)
    x = run.split_part("test")[0].x
    assert (Predictor.load(old).predict(x) == Predictor.load(tiny_run).predict(x)).all()


def test_a_newer_layout_is_refused_with_a_clear_message(tiny_run, tmp_path):
    newer = _copy_run(tiny_run, tmp_path / "newer", lambda meta: meta.update(layout=LAYOUT_VERSION + 1))
    with pytest.raises(DataError, match=f"layout {LAYOUT_VERSION + 1} .*reads up to layout {LAYOUT_VERSION}: "
                                        "upgrade ichedge"):
        RunFolder.open(newer)
    broken = _copy_run(tiny_run, tmp_path / "broken", lambda meta: meta.pop("split"))
    with pytest.raises(DataError, match="config.json: missing split"):
        RunFolder.open(broken)
    with pytest.raises(DataError, match="not a run folder"):
        RunFolder.open(tmp_path)


RUN_FILE_NAMES = {"config.json", "model.keras", "history.csv", "metrics.json", "predictions.npz", "context.json",
                  "model_card.json", "model_card.md", "model_float32.tflite", "model_int8.tflite", "profile.json",
                  "report.html", "worklist.csv", "worklist.json", "slices.csv", "errors.txt", "results.csv",
                  "results.md", "near_duplicates.csv", "audit.json", "predictions.csv"}


def _code_strings(tree: ast.AST) -> set[str]:
    """String constants of a module that are not docstrings."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return {n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings}


def test_only_runs_spells_the_file_names_of_result_folders():
    for path in PACKAGE.glob("*.py"):
        if path.name == "runs.py":
            continue
        strings = _code_strings(ast.parse(path.read_text()))
        spelled = {s for s in strings for name in RUN_FILE_NAMES if name in s}
        assert not spelled, f"{path.name} spells {spelled}: take the name from ichedge.runs"


def _ichedge_imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at module level) for each import of an ichedge module, TYPE_CHECKING blocks left out."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ichedge") and id(node) not in typing_only:
            names = [node.module.split(".")[1]] if "." in node.module else [a.name for a in node.names]
            out += [(name, node in tree.body) for name in names]
    return out


def test_no_import_cycles_and_no_hidden_imports_of_ichedge_modules():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph, inside = {}, []
    for path in PACKAGE.glob("*.py"):
        found = _ichedge_imports(path)
        graph[path.stem] = {m for m, _ in found if m in modules}
        inside += [f"{path.stem} imports {m} inside a function" for m, top in found if not top and m in modules]
    # cli.py loads the commands (and TensorFlow) only after it has decided what output to show
    assert inside == ["cli imports commands inside a function"]

    done: set[str] = set()

    def visit(module: str, stack: tuple[str, ...]) -> None:
        assert module not in stack, f"import cycle: {' -> '.join((*stack, module))}"
        if module not in done:
            for dep in graph[module]:
                visit(dep, (*stack, module))
            done.add(module)

    for module in graph:
        visit(module, ())
