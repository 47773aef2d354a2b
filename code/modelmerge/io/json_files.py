"""JSON objects in files (program configs; config.json, adapter_config.json, ... of checkpoint folders): read with
one-line errors, and updated key by key."""
import json
import os


def read_json_object(path, shown_as=None, error=None):
    """The JSON object in the file `path`, or an `error` (a ValueError class, by default CheckpointError) naming the
    file as `shown_as`, if given."""
    if error is None:
        from modelmerge.io.formats import CheckpointError as error  # formats imports torch, the programs' configs not
    shown = shown_as or path
    try:
        with open(path) as f:
            content = json.load(f)
    except FileNotFoundError:
        raise error(f"{shown} does not exist") from None
    except ValueError as cause:
        raise error(f"{shown}: not valid JSON ({cause})") from None
    if not isinstance(content, dict):
        raise error(f"{shown}: expected a JSON object, found {type(content).__name__}")
    return content


def update_json_object(path, updates, shown_as):
    """Set the keys `updates` in the JSON object of file `path` (created if missing); errors name `shown_as`."""
    content = read_json_object(path, shown_as) if os.path.isfile(path) else {}
    content.update(updates)
    with open(path, "w") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
