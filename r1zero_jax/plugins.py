"""Objects named in a config by import path: a task, a reward function.

"package.module:name" imports a module; "path/to/file.py:name" loads a user's own file (relative
to the working directory), so a task can live outside the package. Grader workers load reward
functions by the same spec in their own process.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Any


def check_spec(spec: str, what: str) -> str:
    """`spec` if it has the form MODULE:NAME or FILE.py:NAME, else a ValueError naming `what`."""
    module, _, name = spec.rpartition(":")
    if not module or not name.isidentifier():
        raise ValueError(f"{what}={spec!r}: expected 'package.module:name' or 'path/file.py:name'")
    return spec


def absolute(spec: str) -> str:
    """The spec with a file path made absolute (for a process with another working directory)."""
    module, _, name = spec.rpartition(":")
    return f"{os.path.abspath(module)}:{name}" if module.endswith(".py") else spec


def load(spec: str, what: str = "object") -> Any:
    """The object `spec` names; a clear error when its module or name is missing."""
    module, _, name = check_spec(spec, what).rpartition(":")
    if module.endswith(".py"):
        path = os.path.abspath(module)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}={spec!r}: no file {path}")
        # One module per file path, so the trainer and a worker share classes' identities.
        mod_name = "r1zero_user_" + hashlib.sha1(path.encode()).hexdigest()[:12]
        mod = sys.modules.get(mod_name)
        if mod is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            mod = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = mod
            try:
                loader_spec.loader.exec_module(mod)
            except BaseException:
                del sys.modules[mod_name]
                raise
    else:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise ValueError(f"{what}={spec!r}: cannot import {module!r} ({e})") from None
    if not hasattr(mod, name):
        raise ValueError(f"{what}={spec!r}: {module} has no {name!r}")
    return getattr(mod, name)
