"""The background checkpoint writer and the resume's event clean-up, on real tensors and files.

No training here (tests/test_lifecycle.py has those): a real module and optimizer, a real
``torch.save``, real TensorBoard event files read back with TensorBoard's own EventAccumulator.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tbhealth.monitor.events import EventWriter
from tbhealth.monitor.orphans import drop_orphaned_scalars
from tbhealth.training.checkpoint import remove_stale_temps
from tbhealth.training.checkpoint_writer import CheckpointWriter


def trained_state() -> tuple[torch.nn.Module, dict]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1, "note": ["a", {"b": 2}]}


def test_the_file_holds_the_state_at_save_time_not_at_write_time(tmp_path):
    """The writer is held before serialising; meanwhile the training thread changes the weights in
    place (as the next optimizer step does): the file still holds the values of the save."""
    model, state = trained_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gate = threading.Event()
    writer = CheckpointWriter()
    future = writer.save(state, tmp_path / "a.pt", before_commit=lambda s: gate.wait(30))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state["note"][1]["b"] = 3
    gate.set()
    assert future.result(30) == tmp_path / "a.pt"
    saved = torch.load(tmp_path / "a.pt", weights_only=False)
    assert all(torch.equal(saved["model"][k], v) for k, v in before.items())
    assert saved["note"] == ["a", {"b": 2}] and saved["step"] == 1
    assert hasattr(saved["model"], "_metadata"), "a module's state_dict keeps its version metadata"
    model.load_state_dict(saved["model"])


def test_one_state_is_serialised_once_and_linked_under_its_other_names(tmp_path):
    _, state = trained_state()
    writer = CheckpointWriter()
    with writer.draining():
        futures = [writer.save(state, tmp_path / name, key=("step", 1)) for name in ("best.pt", "epoch-1.pt", "last.pt")]
        other = writer.save(state, tmp_path / "manual.pt", key=("step", 2))
    assert [f.result(0) for f in futures] == [tmp_path / n for n in ("best.pt", "epoch-1.pt", "last.pt")]
    assert os.path.samefile(tmp_path / "best.pt", tmp_path / "last.pt")
    assert os.path.samefile(tmp_path / "best.pt", tmp_path / "epoch-1.pt")
    assert other.result(0) == tmp_path / "manual.pt" and not os.path.samefile(tmp_path / "manual.pt", tmp_path / "last.pt")


def test_snapshots_reuse_one_set_of_host_buffers(tmp_path):
    """At most one extra host copy of the state: the second snapshot copies into the first's buffers."""
    _, state = trained_state()
    writer = CheckpointWriter()
    writer.save(state, tmp_path / "1.pt").result(30)
    first = {k: b.data_ptr() for k, b in writer._staging._buffers.items()}
    writer.save(state, tmp_path / "2.pt").result(30)
    assert {k: b.data_ptr() for k, b in writer._staging._buffers.items()} == first


def test_a_failed_write_fails_its_future_and_is_never_linked_to(tmp_path):
    _, state = trained_state()
    (tmp_path / "file").write_text("not a folder")
    writer = CheckpointWriter()
    bad = writer.save(state, tmp_path / "file" / "x.pt", key=7)
    assert isinstance(bad.exception(30), OSError)
    good = writer.save(state, tmp_path / "y.pt", key=7)  # same state: written afresh, not linked to nothing
    assert good.result(30) == tmp_path / "y.pt"
    assert torch.load(tmp_path / "y.pt", weights_only=False)["step"] == 1


def test_writes_finish_in_order_and_draining_waits_for_them(tmp_path):
    _, state = trained_state()
    writer = CheckpointWriter()
    with writer.draining():
        futures = [writer.save(state | {"step": i}, tmp_path / f"{i}.pt") for i in range(4)]
    assert all(f.done() for f in futures)
    assert [torch.load(tmp_path / f"{i}.pt", weights_only=False)["step"] for i in range(4)] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="closed"):
        writer.save(state, tmp_path / "late.pt")


def test_stale_temp_files_of_atomic_writes_are_removed_and_nothing_else(tmp_path):
    names = [".last.pt.0123abcd.tmp", ".status.json.deadbeef.tmp", "notes.tmp", ".hidden.tmp", "last.pt"]
    for n in names:
        (tmp_path / n).write_text("x")
    assert sorted(remove_stale_temps(tmp_path, tmp_path / "missing")) == [".last.pt.0123abcd.tmp", ".status.json.deadbeef.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden.tmp", "last.pt", "notes.tmp"]


# --------------------------------------------------------------------------- events past a checkpoint


def points(run: Path, tag: str) -> list[int]:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    kind = "scalars" if tag in acc.Tags()["scalars"] else "tensors"
    return [e.step for e in (acc.Scalars(tag) if kind == "scalars" else acc.Tensors(tag))]


def test_scalars_past_the_checkpoint_mark_are_dropped_and_texts_kept(tmp_path):
    """A checkpoint's mark at step 5; the run goes on to step 10 and is killed mid-record; a later
    incarnation dies before its first checkpoint. The resume keeps steps 1-5 of each series, the
    texts of both, and nothing of the cut record."""
    first = EventWriter(tmp_path)
    for step in range(1, 6):
        first.scalars(step, {"step/loss": 1.0 / step})
    mark = first.mark()
    for step in range(6, 11):
        first.scalars(step, {"step/loss": 1.0 / step})
    first.text(8, "logs", "something happened at step 8")
    first.close()
    assert mark.wait(10) and mark.offset is not None
    with open(first.path, "ab") as f:  # the kill cut a record short
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x01\x02")
    later = EventWriter(tmp_path)
    later.scalars(6, {"step/loss": 0.5})
    later.text(6, "logs", "resumed, then killed again")
    later.close()
    assert points(tmp_path, "step/loss")[-1] == 6 and len(points(tmp_path, "step/loss")) == 11  # the damage

    dropped = drop_orphaned_scalars(tmp_path, {"file": first.path.name, "offset": mark.offset})
    assert dropped == 6
    assert points(tmp_path, "step/loss") == [1, 2, 3, 4, 5]
    assert points(tmp_path, "logs") == [8, 6]
    assert drop_orphaned_scalars(tmp_path, {"file": first.path.name, "offset": mark.offset}) == 0, "idempotent"


def test_a_checkpoint_without_an_events_position_touches_nothing(tmp_path):
    writer = EventWriter(tmp_path)
    writer.scalars(1, {"x": 1.0})
    writer.close()
    size = writer.path.stat().st_size
    assert drop_orphaned_scalars(tmp_path, None) == 0
    assert writer.path.stat().st_size == size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_is_copied_to_pinned_buffers_without_a_sync_on_the_training_thread(tmp_path):
    """On a GPU the snapshot is non-blocking copies into pinned memory plus one event: the training
    thread launches more work at once (here: changes the weights), the file still holds the values
    of the save, and the host buffers are pinned."""
    model = torch.nn.Linear(256, 256).cuda()
    before = {k: v.cpu() for k, v in model.state_dict().items()}
    writer = CheckpointWriter()
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync below raises
    try:
        future = writer.save({"model": model.state_dict()}, tmp_path / "g.pt")
        with torch.no_grad():
            model.weight.mul_(0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    future.result(60)
    assert all(b.is_pinned() for b in writer._staging._buffers.values())
    saved = torch.load(tmp_path / "g.pt", weights_only=False)
    assert all(torch.equal(saved["model"][k], v) for k, v in before.items())
