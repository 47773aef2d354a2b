"""Write the generated catalogue files from the methods' own declarations (modelmerge.catalogue):
recipe/model_merging/catalogue.json (what the recipes and configs read) and docs/methods.md (the table).

    python scripts/catalogue.py           (write both; run it after adding or changing a method)
    python scripts/catalogue.py --check   (exit 1 if either is not current)
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "code"))

from modelmerge import catalogue  # noqa: E402
from modelmerge.atomic import atomic_file  # noqa: E402


def generated():
    """{path relative to the repository: its current text}."""
    return {catalogue.JSON_PATH: catalogue.catalogue_json(), catalogue.MARKDOWN_PATH: catalogue.methods_markdown()}


def stale():
    """The generated files whose text is not current."""
    def current(path, text):
        full = os.path.join(REPO, path)
        return os.path.isfile(full) and open(full, encoding="utf-8").read() == text

    return [path for path, text in generated().items() if not current(path, text)]


def main(argv):
    if argv == ["--check"]:
        paths = stale()
        for path in paths:
            print(f"{path} is not current: run python scripts/catalogue.py", file=sys.stderr)
        return 1 if paths else 0
    if argv:
        sys.exit(f"usage: python scripts/catalogue.py [--check]; got {' '.join(argv)}")
    for path, text in generated().items():
        with atomic_file(os.path.join(REPO, path), overwrite=True) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
