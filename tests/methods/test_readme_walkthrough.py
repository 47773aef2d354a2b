"""README's "Adding a merge method", followed literally on a copy of the repository's code: the module it shows,
written where it says, registered as it says, the catalogue regenerated; then the method is in merge.py --help,
in the catalogue and in the family suites, and a merge with it computes its formula."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from sis_util import REPO

SECTION = "## Adding a merge method"


def walkthrough():
    """(module path, module text, import line, class name) as the README's section gives them."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index(SECTION):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    path = re.search(r"1\. Write `([\w/]+\.py)`", section).group(1)
    block = re.search(r"```python\n(.*?)\n\s*```", section, re.S).group(1)
    indent = len(block) - len(block.lstrip(" "))
    text = "\n".join(line[indent:] for line in block.splitlines()) + "\n"
    import_line, name = re.search(r"2\. Register it in `code/modelmerge/methods/__init__.py`: `(from \.\w+ import (\w+))`",
                                  section).groups()
    assert re.search(rf"`{name}` at the end of\s+`_CLASSES`", section)
    assert "3. Run `python scripts/catalogue.py`" in section
    return path, text, import_line, name


def copy_of_the_repository(root):
    """The code, the catalogue script, the recipes' catalogue reader and the generated files, under `root`."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(os.path.join(REPO, "code"), os.path.join(root, "code"), ignore=ignore)
    os.makedirs(os.path.join(root, "scripts"))
    shutil.copy(os.path.join(REPO, "scripts", "catalogue.py"), os.path.join(root, "scripts"))
    os.makedirs(os.path.join(root, "recipe", "model_merging"))
    for name in ("__init__.py", "catalogue.py", "catalogue.json"):
        shutil.copy(os.path.join(REPO, "recipe", "model_merging", name), os.path.join(root, "recipe", "model_merging"))
    shutil.copytree(os.path.join(REPO, "docs"), os.path.join(root, "docs"))


def register(root, import_line, name):
    """Step 2: the import among the registry's imports, the class at the end of `_CLASSES`."""
    path = os.path.join(root, "code", "modelmerge", "methods", "__init__.py")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    last_import = max(m.end() for m in re.finditer(r"^from \.\w+ import .*\n", text, re.M))
    text = text[:last_import] + import_line + "\n" + text[last_import:]
    end = text.index("\n)", text.index("_CLASSES"))
    text = text[:end] + f"\n    {name}," + text[end:]
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def run(*command, cwd):
    result = subprocess.run([sys.executable, *command], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_the_walkthrough_adds_a_method_everywhere(tmp_path):
    path, text, import_line, name = walkthrough()
    root = tmp_path / "repo"
    copy_of_the_repository(root)
    with open(root / path, "w", encoding="utf-8") as f:  # step 1
        f.write(text)
    register(root, import_line, name)  # step 2
    run("scripts/catalogue.py", cwd=root)  # step 3
    run("scripts/catalogue.py", "--check", cwd=root)

    method = name.lower()
    catalogue = json.loads((root / "recipe" / "model_merging" / "catalogue.json").read_text(encoding="utf-8"))
    assert catalogue["methods"][method]["kind"] == "element-wise"
    assert catalogue["sweeps"][method]["grid"] == [0.5, 1.0, 1.5]
    assert f"| `{method}` |" in (root / "docs" / "methods.md").read_text(encoding="utf-8")
    assert f"\n  {method}  needs θ_0\n      --x:merge_lambda (float; in [0, inf); default 1.0)" in run(
        "code/merge.py", "--help", cwd=root)
    suite = run("-c", "from model_merging.catalogue import suite_methods; print(suite_methods(0.3, [1, 2], 3)"
                f"['{method}']['parameters'])", cwd=root / "recipe")
    assert suite.strip() == "{'merge_lambda': 1.0}"

    generator = torch.Generator().manual_seed(0)
    ancestor = {"w": torch.randn(4, 3, generator=generator), "b": torch.randn(3, generator=generator)}
    models = [{key: value + torch.randn(value.shape, generator=generator) for key, value in ancestor.items()}
              for _ in range(3)]
    for index, tensors in enumerate([ancestor, *models]):
        save_file(tensors, str(tmp_path / f"m{index}.safetensors"))
    run("code/merge.py", "--merge", method, "--models", *(str(tmp_path / f"m{i}.safetensors") for i in (1, 2, 3)),
        "--ancestor", str(tmp_path / "m0.safetensors"), "--x:merge_lambda", "0.5",
        "--output", str(tmp_path / "merged.safetensors"), "--no_progress", cwd=root)
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for key, theta_0 in ancestor.items():
        middle = torch.stack([m[key] - theta_0 for m in models]).sort(dim=0).values[1]  # the middle of three, entry by entry
        torch.testing.assert_close(merged[key], theta_0 + 0.5 * middle)
