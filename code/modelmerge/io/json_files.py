"""The JSON objects of checkpoint folders (config.json, adapter_config.json, ...): read with one-line errors,
and updated key by key."""
import json
import os

from modelmerge.io.formats import CheckpointError


def read_json_object(path, shown_as=None):
    """The JSON object in the file `path`, or a CheckpointError naming it (as `shown_as`, if given)."""
    try:
        with open(path) as f:
            content = json.load(f)
    except ValueError as error:
        raise CheckpointError(f"{shown_as or path}: not valid JSON ({error})") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{shown_as or path}: expected a JSON object, found {type(content).__name__}")
    return content


def update_json_object(path, updates, shown_as):
    """Set the keys `updates` in the JSON object of file `path` (created if missing); errors name `shown_as`."""
    content = read_json_object(path, shown_as) if os.path.isfile(path) else {}
    content.update(updates)
    with open(path, "w") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
