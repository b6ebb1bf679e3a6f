"""Peak memory of a conversion stays below 2x the largest shard (streaming, one tensor at a time)."""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import tiny_config
from tests.conversion.official_synth import make_official_checkpoint

CHILD = textwrap.dedent(
    """
    import json, sys
    from modeling_deepseek_v4.conversion import convert_official_to_plugin
    from tests.rss import peak_rss

    src, dst, shard_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # A dry run first: it plans from the headers and imports everything lazily imported, so the baseline
    # measures the data path only.
    def convert(**options):
        return convert_official_to_plugin(src, dst, dtype="bf16", shard_size=shard_size, **options)

    convert(dry_run=True)
    _, base, peak = peak_rss(lambda: convert(progress=False))
    print(json.dumps({"base": base, "peak": peak}))
    """
)


@pytest.mark.slow
def test_conversion_peak_rss_below_twice_the_largest_shard(tmp_path):
    # A 50k vocabulary makes embed / head ~50 MB each: a checkpoint of several ~50 MB shards.
    config = tiny_config(vocab_size=50_000, hidden_size=512)
    official = make_official_checkpoint(tmp_path / "official", config, n_shards=4)
    largest = max(p.stat().st_size for p in official.shards)
    assert largest > 40e6 and len(official.shards) >= 3
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(official.folder), str(tmp_path / "hf"), str(50 * 10**6)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    usage = json.loads(run.stdout.strip().splitlines()[-1])
    growth = usage["peak"] - usage["base"]
    print(f"largest shard {largest / 1e6:.1f} MB, conversion peak RSS growth {growth / 1e6:.1f} MB")
    assert growth < 2 * largest
