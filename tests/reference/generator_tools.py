"""What the fixture generators share: loading a sibling generator as a module, writing JSON files, quieting the
reference libraries, and the library versions a fixture was made with (VERSIONS.json)."""

import functools
import importlib
import importlib.util
import json
import sys
from pathlib import Path


def generator(stem: str):
    """tests/reference/<stem>.py as a module, loaded once (the tests load generators the same way)."""
    name = f"minidit_tests_reference_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / f"{stem}.py")
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def write_json(path: Path, content: dict, **options) -> None:
    """Two-space-indented JSON and a final newline (`options` go to json.dumps, e.g. sort_keys=True)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, **options) + "\n", encoding="utf-8")


write_sorted_json = functools.partial(write_json, sort_keys=True)  # diffusers writes its JSON files so


def quiet_diffusers():
    """diffusers (returned) and transformers with their warnings off: the tiny checkpoints trip several."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    return diffusers


def versions(*packages: str) -> dict:
    """{package: its __version__} in the order given, then the Python version."""
    found = {name: importlib.import_module(name).__version__ for name in packages}
    return {**found, "python": sys.version.split()[0]}
