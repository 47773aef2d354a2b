"""Loading configs: import the config module and call its `py()`; an `async def py()` keeps running inside
the manager, which steps it whenever a `tk.async_run` it awaits is done."""
import asyncio
import importlib
import inspect
import os
import traceback

import sisyphus.global_settings as gs
import sisyphus.toolkit as tk
from sisyphus.block import set_root_block
from sisyphus.errors import SisError

_SISYPHUS_DIR = os.path.dirname(os.path.abspath(__file__))


class ConfigLoader:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.readers = []  # (config file, asyncio.Task) of async configs
        self.loaded = []  # config arguments, in load order

    def load(self, config):
        """Load `config`: 'config/x.py' (calls py() if it exists) or 'config/x.func' (calls func())."""
        module_name, function_name, filename = _resolve(config)
        self.loaded.append(config)
        set_root_block(filename)
        tk.current_config_ = filename
        try:
            module = importlib.import_module(module_name)
            function = getattr(module, function_name, None)
            if function is None and function_name != "py":
                raise SisError(f"no function {function_name}() defined")
            if inspect.iscoroutinefunction(function):
                self.readers.append((filename, self.loop.create_task(function())))
            elif function is not None:
                function()
        except Exception as e:
            raise config_error(filename, e) from e
        self.step()

    def step(self):
        """Let every async config run until it waits again; raise the error of one that failed."""
        if self.waiting():
            self.loop.run_until_complete(_settle())
        for filename, reader in self.readers:
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                raise config_error(filename, reader.exception())

    def waiting(self):
        """Async configs that have not returned yet."""
        return [filename for filename, reader in self.readers if not reader.done()]

    def close(self):
        for _, reader in self.readers:
            reader.cancel()
        if self.waiting():
            self.loop.run_until_complete(asyncio.gather(*(r for _, r in self.readers), return_exceptions=True))
        self.loop.close()


async def _settle():
    for _ in range(50):  # enough loop iterations for woken configs to reach their next await
        await asyncio.sleep(0)


def _resolve(config):
    """(module name, function name, file) of a config argument."""
    path = os.path.relpath(os.path.abspath(config), gs.BASE_DIR) if os.path.isabs(config) else os.path.normpath(config)
    if path.endswith(".py"):
        stem, function = path[:-3], "py"
    else:
        stem, _, function = path.rpartition(".")
    filename = stem + ".py"
    package_init = os.path.join(stem, "__init__.py")
    if not os.path.isfile(os.path.join(gs.BASE_DIR, filename)) and \
            os.path.isfile(os.path.join(gs.BASE_DIR, package_init)):
        filename = package_init  # 'config.main': main() of the config package
    if path.startswith("..") or not os.path.isfile(os.path.join(gs.BASE_DIR, filename)):
        raise SisError(f"{config}: no such config file in the setup directory {gs.BASE_DIR}")
    for entry in gs.IMPORT_PATHS:
        if entry.endswith("/") and stem.startswith(entry):
            stem = stem[len(entry):]
            break
    module = stem.replace(os.sep, ".")
    if not all(part.isidentifier() for part in module.split(".")) or not function.isidentifier():
        raise SisError(f"{config}: a config must be a .py file whose path parts are Python identifiers")
    return module, function, filename


def config_error(filename, error):
    """A one-line SisError: where in the config it happened, and the cause (with its origin if elsewhere)."""
    if isinstance(error, SyntaxError) and error.filename:
        return SisError(f"{_relative(error.filename)}:{error.lineno}: SyntaxError: {error.msg}")
    frames = traceback.extract_tb(error.__traceback__)
    config_path = os.path.join(gs.BASE_DIR, filename)
    lines = [f.lineno for f in frames if os.path.abspath(f.filename) == config_path]
    where = f"{filename}:{lines[-1]}" if lines else filename
    if isinstance(error, SisError):
        return SisError(f"{where}: {error}")
    cause = f"{type(error).__name__}: {error}"
    origin = frames[-1] if frames else None
    if origin and os.path.abspath(origin.filename) not in (config_path,) and \
            not os.path.abspath(origin.filename).startswith(_SISYPHUS_DIR):
        cause += f" (raised at {_relative(origin.filename)}:{origin.lineno})"
    return SisError(f"{where}: {cause}")


def _relative(path):
    path = os.path.abspath(path)
    return os.path.relpath(path, gs.BASE_DIR) if path.startswith(gs.BASE_DIR + os.sep) else path
