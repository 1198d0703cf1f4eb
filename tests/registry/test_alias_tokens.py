"""Alias state tokens on a local registry: the same contract as on an object store."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry import AliasState, ConflictError, Registry
from tests.registry.test_registry import _publish


def test_a_stale_token_moves_nothing_and_an_unchanged_one_reads_nothing_new(
    tmp_path: Path,
) -> None:
    reg = Registry(tmp_path)
    for _ in range(3):
        _publish(reg)
    empty = reg.alias_state("seednet")
    assert empty == AliasState({}, {}, "")
    assert reg.alias_state_if_changed("seednet", "") is None

    reg.set_alias("seednet", "production", "1", expected_token=empty.token)
    seen = reg.alias_state_if_changed("seednet", empty.token)
    assert seen is not None and seen.aliases == {"production": "1"} and seen.token
    assert reg.alias_state_if_changed("seednet", seen.token) is None

    reg.set_alias("seednet", "production", "2", expected_token=seen.token)
    before = (tmp_path / "seednet" / "aliases.json").read_bytes()
    with pytest.raises(ConflictError, match="changed since they were read"):
        reg.set_alias("seednet", "production", "3", expected_token=seen.token)
    with pytest.raises(ConflictError, match="changed since they were read"):
        reg.rollback("seednet", expected_token=seen.token)
    assert (tmp_path / "seednet" / "aliases.json").read_bytes() == before
    now = reg.alias_state("seednet")
    assert now.aliases == {"production": "2"} and now.token != seen.token
    assert reg.rollback("seednet", expected_token=now.token) == "1"
