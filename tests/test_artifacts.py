"""The trained-artefact cache: keys, hits, corruption, locking, no half-written files."""

import threading
import time

import pytest
import torch

from interpbook import artifacts
from interpbook.artifacts import artifact_path, cached, spec_key, tensor_digest


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPBOOK_CACHE", str(tmp_path))


def _counting(value):
    calls = []

    def train():
        calls.append(1)
        return value
    return train, calls


def test_miss_then_hit_returns_equal_values():
    train, calls = _counting({"w": torch.arange(6.0).view(2, 3), "steps": 3})
    first = cached("thing", "m", {"lr": 1e-3}, train)
    again = cached("thing", "m", {"lr": 1e-3}, train)
    assert len(calls) == 1
    torch.testing.assert_close(again["w"], first["w"])
    assert again["steps"] == 3


def test_key_changes_with_every_field():
    base = {"model": "m", "config": {"lr": 1e-3, "k": 32}, "corpus": "abc", "format": 1}
    keys = {spec_key(base), spec_key({**base, "config": {"lr": 2e-3, "k": 32}}),
            spec_key({**base, "config": {"lr": 1e-3, "k": 16}}), spec_key({**base, "corpus": "abd"}),
            spec_key({**base, "format": 2})}
    assert len(keys) == 5
    assert spec_key(dict(reversed(list(base.items())))) == spec_key(base)   # order does not matter
    train, calls = _counting(torch.zeros(1))
    cached("thing", "m", base, train)
    cached("thing", "m", {**base, "config": {"lr": 2e-3, "k": 32}}, train)
    assert len(calls) == 2


def test_tensor_digest_sees_values_and_shape():
    a = torch.arange(6)
    assert tensor_digest(a) == tensor_digest(a.clone())
    assert tensor_digest(a) != tensor_digest(a.view(2, 3))
    assert tensor_digest(a) != tensor_digest(a.flip(0))


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
def test_corrupted_file_is_detected_removed_and_retrained(damage):
    spec = {"x": 1}
    train, calls = _counting({"w": torch.randn(50, 50)})
    cached("thing", "m", spec, train)
    path = artifact_path("thing", "m", spec)
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":
        path.write_bytes(blob[:-10] + bytes([blob[-10] ^ 0xFF]) + blob[-9:])
    else:
        path.write_bytes(blob.partition(b"\n")[2])
    with pytest.warns(UserWarning, match="unusable"):
        again = cached("thing", "m", spec, train)
    assert len(calls) == 2
    assert again["w"].shape == (50, 50)
    cached("thing", "m", spec, train)          # the retrained file is good again
    assert len(calls) == 2


def test_failed_training_leaves_nothing_behind():
    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cached("thing", "m", {"x": 1}, broken)
    assert list(artifact_path("thing", "m", {"x": 1}).parent.iterdir()) == []


def test_failed_write_leaves_no_temporary_file(monkeypatch):
    def failing_encode(obj):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts, "_encode", failing_encode)
    with pytest.raises(OSError, match="disk full"):
        cached("thing", "m", {"x": 1}, lambda: torch.zeros(1))
    assert list(artifact_path("thing", "m", {"x": 1}).parent.iterdir()) == []


def test_concurrent_callers_train_once():
    calls = []

    def slow_train():
        calls.append(1)
        time.sleep(0.3)
        return torch.ones(3)

    results = []
    threads = [threading.Thread(target=lambda: results.append(cached("thing", "m", {"x": 1}, slow_train)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3
    assert all(torch.equal(r, torch.ones(3)) for r in results)


def test_bad_spec_and_kind_are_named():
    with pytest.raises(TypeError, match="plain JSON"):
        spec_key({"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="kind"):
        artifact_path("../up", "m", {})
