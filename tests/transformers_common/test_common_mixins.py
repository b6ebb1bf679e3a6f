"""transformers' own common model tests, from the sdist of the installed transformers (sdist_tests.py), run on
this package's classes and, for comparison, on transformers' native `deepseek_v4` (common_cases.py; README
"transformers' common model tests"). If the sdist cannot be obtained, one test fails with the reason instead of the
common tests silently not running; `DSV4_SKIP_TRANSFORMERS_COMMON=1` skips them explicitly.
"""

import pytest

from tests.transformers_common import sdist_tests

if sdist_tests.opted_out():
    pytest.skip(
        f"{sdist_tests.OPT_OUT_ENV}=1: transformers' common model tests explicitly opted out", allow_module_level=True
    )

try:
    sdist_tests.load_mixins()
except sdist_tests.SdistUnavailable as error:
    UNAVAILABLE = str(error)

    def test_transformers_common_tests_available():
        pytest.fail(UNAVAILABLE, pytrace=False)

else:
    # unittest classes: pytest collects them from this module.
    from tests.transformers_common.common_cases import DeepseekV4ExtCommonTest, NativeDeepseekV4CommonTest

    __all__ = ["DeepseekV4ExtCommonTest", "NativeDeepseekV4CommonTest"]
