"""transformers' own common test mixins, taken from the source distribution of the *installed* transformers.

The top-level `tests/*.py` files (`test_modeling_common.py` with `ModelTesterMixin`, `test_configuration_common.py`
with `ConfigTester`, `test_pipeline_mixin.py` with `PipelineTesterMixin`, ...) ship in the transformers sdist on
PyPI, not in the wheel. `load_mixins()` downloads the sdist matching `transformers.__version__` once with pip
(`pip download transformers==X --no-binary :all: --no-deps`), extracts those files into a cache and imports them as
the package `transformers_sdist_tests`, next to a few stand-ins for what the sdist leaves out:

- `exporters/test_export.py` (`ExportTesterMixin`) and `generation/test_utils.py` (`GenerationTesterMixin`):
  empty mixins. The generate tests are not run here; this package's own tests cover generation
  (tests/models/test_generate.py, test_generation_modes.py, test_mtp_speculation.py, test_static_cache.py, ...).
- `utils/test_configuration_utils.py`: `config_common_kwargs`, copied from transformers' file of the v5 line.
- `src/transformers/__init__.py`: empty. `test_configuration_common` / `test_pipeline_mixin` call
  `direct_transformers_import` on a source checkout; on an empty file it returns the installed transformers.

Cache: `$DSV4_TRANSFORMERS_TESTS_CACHE` or `~/.cache/modeling_deepseek_v4/transformers-tests`, one folder per
version (an extracted folder is reused without network). Offline: `DSV4_TRANSFORMERS_SDIST=/path/to/
transformers-X.tar.gz` (fetched elsewhere with the pip command above) is used instead of downloading. A failed
download raises `SdistUnavailable` with pip's output, which test_common_mixins.py turns into a failing test: the
common tests never silently do not run. `DSV4_SKIP_TRANSFORMERS_COMMON=1` opts out explicitly (reported as a skip
with that reason).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_sdist_tests"
OPT_OUT_ENV = "DSV4_SKIP_TRANSFORMERS_COMMON"
CACHE_ENV = "DSV4_TRANSFORMERS_TESTS_CACHE"
SDIST_ENV = "DSV4_TRANSFORMERS_SDIST"
# The files the common tests import; the sdist must contain them.
REQUIRED = ("test_modeling_common.py", "test_configuration_common.py", "test_pipeline_mixin.py")
_MARKER = "extracted.txt"

_EXPORT_SHIM = '''"""Stand-in for transformers' tests/exporters/test_export.py, which the sdist does not ship:
no export tests."""


class ExportTesterMixin:
    pass
'''

_GENERATION_SHIM = '''"""Stand-in for transformers' tests/generation/test_utils.py (GenerationTesterMixin), which
the sdist does not ship: no generate tests run through the common mixins. modeling_deepseek_v4 tests generation in
its own suite (tests/models/test_generate.py, test_generation_modes.py, test_mtp_speculation.py,
test_static_cache.py)."""


class GenerationTesterMixin:
    pass
'''

# transformers' tests/utils/test_configuration_utils.py (v5 line), Apache-2.0, Copyright 2019 HuggingFace Inc.
_CONFIG_UTILS_SHIM = '''"""`config_common_kwargs` of transformers' tests/utils/test_configuration_utils.py
(v5 line; Apache-2.0, Copyright 2019 HuggingFace Inc.), which the sdist does not ship; read by
ConfigTester.check_config_arguments_init."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
'''


class SdistUnavailable(RuntimeError):
    """The transformers sdist (and so its common tests) could not be obtained."""


def cache_root() -> Path:
    default = Path.home() / ".cache" / "modeling_deepseek_v4" / "transformers-tests"
    return Path(os.environ.get(CACHE_ENV) or default)


def opted_out() -> bool:
    return os.environ.get(OPT_OUT_ENV, "").strip().lower() in ("1", "true", "yes")


def _download_sdist(version: str, dest: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"transformers=={version}",
        "--no-binary",
        ":all:",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        str(dest),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(dest.glob(f"transformers-{version}.tar.gz"))
    if done.returncode != 0 or not found:
        raise SdistUnavailable(
            f"Could not download the transformers {version} source distribution, which holds transformers' common "
            f"model tests (tests/test_modeling_common.py, ...).\n$ {' '.join(command)}\n(exit {done.returncode})\n"
            f"{(done.stdout + done.stderr)[-3000:]}\n"
            f"Fix the access to PyPI; or run that command where PyPI is reachable and set {SDIST_ENV} to the "
            f"downloaded transformers-{version}.tar.gz; or skip these tests explicitly with {OPT_OUT_ENV}=1."
        )
    return found[0]


def _given_sdist(version: str) -> Path | None:
    given = os.environ.get(SDIST_ENV)
    if not given:
        return None
    path = Path(given)
    if path.name != f"transformers-{version}.tar.gz" or not path.is_file():
        raise SdistUnavailable(
            f"{SDIST_ENV}={given}: expected an existing transformers-{version}.tar.gz, the source distribution of "
            f"the installed transformers {version}."
        )
    return path


def _extract(archive: Path, version: str, package: Path) -> int:
    """Writes the sdist's top-level `tests/*.py` into `package`; returns how many."""
    prefix = f"transformers-{version}/tests/"
    count = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name[len(prefix) :] if member.name.startswith(prefix) else ""
            # Top-level Python files only: no folders, no path tricks.
            if not member.isfile() or not name.endswith(".py") or "/" in name or name.startswith("."):
                continue
            source = tar.extractfile(member)
            (package / name).write_bytes(source.read())
            count += 1
    missing = [name for name in REQUIRED if not (package / name).is_file()]
    if missing:
        raise SdistUnavailable(f"{archive.name} has no tests/{missing[0]}: cannot run transformers' common tests.")
    return count


def _write_shims(version_dir: Path, package: Path) -> None:
    files = {
        package / "__init__.py": "",
        package / "exporters" / "__init__.py": "",
        package / "exporters" / "test_export.py": _EXPORT_SHIM,
        package / "generation" / "__init__.py": "",
        package / "generation" / "test_utils.py": _GENERATION_SHIM,
        package / "utils" / "__init__.py": "",
        package / "utils" / "test_configuration_utils.py": _CONFIG_UTILS_SHIM,
        version_dir / "src" / "transformers" / "__init__.py": "",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def prepare(version: str | None = None) -> Path:
    """The folder holding `transformers_sdist_tests/` for `version` (default: the installed transformers)."""
    version = version or transformers.__version__
    version_dir = cache_root() / version
    if (version_dir / _MARKER).is_file():
        return version_dir
    version_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=version_dir.parent))
    try:
        archive = _given_sdist(version) or _download_sdist(version, staging / "download")
        package = staging / "tree" / PACKAGE
        package.mkdir(parents=True)
        count = _extract(archive, version, package)
        _write_shims(staging / "tree", package)
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        (staging / "tree" / _MARKER).write_text(f"{archive.name} sha256 {digest}: {count} files from tests/\n")
        shutil.rmtree(version_dir, ignore_errors=True)
        # Renamed into place only when complete, so an interrupted run leaves no half-extracted cache.
        os.replace(staging / "tree", version_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return version_dir


def load_mixins():
    """Imports and returns the sdist test package (`transformers_sdist_tests`) of the installed transformers;
    raises `SdistUnavailable` when it cannot be obtained."""
    version_dir = prepare()
    if str(version_dir) not in sys.path:
        sys.path.insert(0, str(version_dir))
    import transformers_sdist_tests

    return transformers_sdist_tests
