"""Sharded (DCP) checkpoints are as safe as the single-file ones: no pickle from the checkpoint
runs code, every file is checksummed, a dtype mismatch is an error, and every failure is a
CheckpointError naming the path. (Multi-rank save and load: tests/test_parallel_spawned.py.)"""

import json
import pickle
import warnings
import zlib
from pathlib import Path

import pytest
import torch

from functional_llm.checkpoint import CheckpointError
from functional_llm.parallel import checkpoint as sharded
from functional_llm.testing import assert_trees_equal

STATE = {
    "params": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(4, dtype=torch.bfloat16)},
    "step": torch.tensor(7),
}


@pytest.fixture
def saved(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it saves in a single process
        return sharded.save(tmp_path / "ck", STATE)


def like():
    return {"params": {"w": torch.zeros(3, 4), "b": torch.zeros(4, dtype=torch.bfloat16)},
            "step": torch.tensor(0)}  # fmt: skip


def reseal(path: Path) -> None:
    """Recompute the manifest's checksums, as someone crafting a checkpoint would."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {n: zlib.crc32((path / n).read_bytes()) for n in manifest["files"]}
    (path / "manifest.json").write_text(json.dumps(manifest))


def load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sharded.load(path, like())


def test_round_trip_in_one_process(saved):
    assert_trees_equal(load(saved), STATE)
    assert not saved.with_name("ck.partial").exists()


def test_a_crafted_metadata_pickle_does_not_run(saved, tmp_path):
    class Exploit:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    (saved / ".metadata").write_bytes(pickle.dumps(Exploit()))
    reseal(saved)
    with pytest.raises(CheckpointError, match=r"DCP metadata refused: pathlib.Path.touch|touch"):
        load(saved)
    assert not (tmp_path / "pwned").exists()


def test_flipped_bytes_in_a_shard_are_found(saved):
    shard = next(saved.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"{saved}: checksum mismatch .* {shard.name}"):
        load(saved)


def test_a_truncated_shard_is_a_checkpoint_error_even_when_resealed(saved):
    shard = next(saved.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load(saved)
    reseal(saved)  # the checksums now pass: DCP's own failure must still be a CheckpointError
    with pytest.raises(CheckpointError, match=f"{saved}: the sharded checkpoint cannot be read"):
        load(saved)


def test_another_dtype_or_shape_is_an_error_not_a_cast(saved):
    other = like()
    other["params"]["w"] = other["params"]["w"].double()
    with pytest.raises(CheckpointError, match=r"params.w: \(3, 4\) float32 in the checkpoint, "
                                              r"but \(3, 4\) float64"):  # fmt: skip
        sharded.load(saved, other)
    other["params"]["w"] = torch.zeros(4, 3)
    with pytest.raises(CheckpointError, match=r"params.w: \(3, 4\) float32 .* \(4, 3\) float32"):
        sharded.load(saved, other)


def test_a_directory_without_our_manifest_is_refused(saved, tmp_path):
    (saved / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"no readable manifest\.json"):
        load(saved)
    with pytest.raises(CheckpointError, match="no sharded checkpoint at"):
        load(tmp_path / "absent")
