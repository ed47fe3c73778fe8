"""The fuzz targets in CI: every seed corpus through every target, then each target briefly
under atheris (coverage-guided), with the memory limit and hang timeout of `make fuzz`.

The long runs are `make fuzz FUZZ_SECONDS=...`; here each target gets a few seconds, so the suite
stays fast. A finding fails the test and names the input left in the work directory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.fuzz.run import fuzz
from tests.fuzz.targets import CORPUS, TARGETS, check

#: seconds of coverage-guided fuzzing per target in `make test`
CI_SECONDS = 2
SEEDS = sorted(p for p in CORPUS.glob("*/*") if p.is_file())


def test_every_target_has_seeds() -> None:
    assert {p.parent.name for p in SEEDS} == set(TARGETS)
    assert sum(p.stat().st_size for p in SEEDS) < 2 * 1024 * 1024


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_corpus_replays_through_every_target(target: str) -> None:
    # a seed of another target is still outside bytes to this one
    for seed in SEEDS:
        check(target, seed.read_bytes())


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_briefly(target: str, tmp_path: Path) -> None:
    result = fuzz(target, seconds=CI_SECONDS, work_root=tmp_path)
    log = result.log.read_text(errors="replace")
    assert result.ok, (
        f"{target}: findings {result.findings} (exit {result.returncode}):\n{log[-3000:]}"
    )
    assert result.executions > 0, log[-3000:]
    assert result.cov > 0, log[-3000:]
