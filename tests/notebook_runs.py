"""Running a notebook as a test: its cells top to bottom with a form's values set, and what the cells showed."""

import re
import time
from pathlib import Path

import nbclient
import nbformat

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def execute(name: str, cwd: Path, kernel: str = "python3", params: dict[str, str] | None = None):
    """The notebook run top to bottom (raising on any cell's error), with its outputs. `params` sets form fields
    (`NAME = value  #@param ...` lines) as a user does in Colab's form: {"FAMILY": '"paper"'}."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "outputs not stripped"
    for field, value in (params or {}).items():
        pattern = re.compile(rf"^{field} = .*?(  #@param.*)$", re.MULTILINE)
        sources = [cell.source for cell in notebook.cells]
        assert sum(len(pattern.findall(source)) for source in sources) == 1, f"{name}.ipynb: no one {field} field"
        line = f"{field} = {value}"
        for cell in notebook.cells:
            cell.source = pattern.sub(lambda found, line=line: line + found.group(1), cell.source)
    started = time.monotonic()
    nbclient.NotebookClient(notebook, timeout=600, kernel_name=kernel,
                            resources={"metadata": {"path": str(cwd)}}).execute()
    print(f"{name}.ipynb ran in {time.monotonic() - started:.0f}s")
    return notebook


def outputs_text(notebook) -> str:
    """Everything the cells show, as text: streams, and each display's text/plain (a redrawn one: its last frame)."""
    parts = []
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            shown = out.get("text", "") if out.output_type == "stream" else out.get("data", {}).get("text/plain", "")
            parts.append(shown)
    return "\n".join(parts)
