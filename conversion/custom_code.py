"""The custom code of a converted folder, the same as `save_pretrained` writes (hf-integration.md §5): `config.json`
with `auto_map` for AutoConfig, AutoModel and AutoModelForCausalLM, the flat modeling files and `requirements.txt`,
so that `dsv4-convert to-hf` output loads with `trust_remote_code=True` where this package is not installed and
`push_folder` publishes it as is.

The files are found the way transformers finds them on `save_pretrained` (`custom_object_save`): the file that
defines each registered class plus everything it imports relatively (`get_relative_import_files`), so the list
follows the modeling package instead of being repeated here. `auto_map` comes from the classes'
`register_for_auto_class` registrations (the package's `__init__.py`). `tests/conversion/test_converted_folder.py`
checks that the result equals a `save_pretrained` folder's custom code.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

from modeling_deepseek_v4 import DeepseekV4ExtConfig, DeepseekV4ExtForCausalLM, DeepseekV4ExtModel
from modeling_deepseek_v4.compat import REQUIREMENTS_TXT

_AUTO_CLASSES = (DeepseekV4ExtConfig, DeepseekV4ExtModel, DeepseekV4ExtForCausalLM)


def auto_map() -> dict[str, str]:
    """`{"AutoConfig": "configuration_deepseek_v4.DeepseekV4ExtConfig", ...}` for the registered classes."""
    return {cls._auto_class: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}" for cls in _AUTO_CLASSES}


def code_files() -> list[Path]:
    """The modeling package's files that a Hub copy needs, in the order transformers would copy them."""
    files: list[Path] = []
    for cls in _AUTO_CLASSES:
        module_file = sys.modules[cls.__module__].__file__
        for path in (module_file, *get_relative_import_files(module_file)):
            if Path(path) not in files:
                files.append(Path(path))
    return files


def write_custom_code(folder: Path, config: DeepseekV4ExtConfig) -> None:
    """Write `config.json` (with the complete `auto_map`), the modeling files and `requirements.txt` into `folder`
    (the converter's temporary folder, renamed into place only when everything is written)."""
    config.auto_map = auto_map()
    config.save_pretrained(folder)
    for path in code_files():
        shutil.copyfile(path, folder / path.name)
    (folder / "requirements.txt").write_text(REQUIREMENTS_TXT)
