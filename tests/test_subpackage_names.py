"""`conversion/`, `model_cards/` and `quantization/` are installed as `modeling_deepseek_v4.<name>` (pyproject
package-dir). From a checkout's root the folders are also importable by their bare names, which would load the same
files a second time as other modules (a second `ConversionError` class that `except` clauses would miss); the bare
names are refused with an ImportError that names the right import."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("conversion", "model_cards", "quantization")


def test_bare_subpackage_names_are_refused_from_a_checkout():
    code = textwrap.dedent(
        f"""
        import importlib, sys
        for name in {NAMES!r}:
            for module in (name, name + ".cli" if name == "conversion" else name + ".render"):
                try:
                    importlib.import_module(module)
                except ImportError as error:
                    assert f"import it as `modeling_deepseek_v4.{{name}}`" in str(error), error
                else:
                    raise AssertionError(f"import {{module}} succeeded")
                assert name not in sys.modules, name
        import modeling_deepseek_v4.conversion as conversion
        import modeling_deepseek_v4.model_cards, modeling_deepseek_v4.quantization
        from modeling_deepseek_v4.conversion.checkpoint import ConversionError
        assert conversion.ConversionError is ConversionError
        assert not set({NAMES!r}) & set(sys.modules), sorted(set({NAMES!r}) & set(sys.modules))
        print("ok")
        """
    )
    # cwd = the checkout's root, where the bare folders are on sys.path (`python -c` puts the cwd first).
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_nothing_imports_the_bare_names():
    """The repository's own code and tests use the installed names only."""
    pattern = tuple(f"{kind} {name}" for kind in ("import", "from") for name in NAMES)
    offenders = []
    for path in ROOT.rglob("*.py"):
        if any(part.startswith(".") for part in path.relative_to(ROOT).parts):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(pattern) and stripped.split()[1].split(".")[0] in NAMES:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {stripped}")
    assert not offenders, offenders
