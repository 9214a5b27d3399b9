"""EventWriter files are read back by TensorBoard's own readers and by a real server."""

from __future__ import annotations

import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from google.protobuf import json_format
from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.compat.proto import event_pb2, summary_pb2, types_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked_crc
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from tbhealth.monitor.events import EventWriter, masked_crc32c

LAYOUT = {
    "Loss": {"loss": ["train/loss", "val/loss"]},
    "Accuracy": {"accuracy": ["train/acc", "val/acc"]},
}


def only_event_file(logdir: Path) -> Path:
    files = list(logdir.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    return files[0]


def read_events(path: Path) -> list:
    """Every Event in the file; the loader checks each record's length and CRCs."""
    return list(event_file_loader.RawEventFileLoader(str(path)).Load())


def parsed_events(path: Path) -> list[event_pb2.Event]:
    return [event_pb2.Event.FromString(raw) for raw in read_events(path)]


def layout_as_dict(layout: dict) -> dict:
    """A custom-scalars layout in its JSON form back in EventWriter's mapping form."""
    return {
        cat["title"]: {chart["title"]: chart["multiline"]["tag"] for chart in cat["chart"]}
        for cat in layout["category"]
    }


def accumulate(logdir: Path) -> event_accumulator.EventAccumulator:
    sizes = {"scalars": 0, "tensors": 0}  # keep every point
    return event_accumulator.EventAccumulator(str(logdir), size_guidance=sizes).Reload()


@pytest.mark.parametrize("size", [0, 1, 3, 4, 8, 63, 64, 65, 1023, 1024, 1025, 1027, 5000])
def test_masked_crc_matches_tensorboard(size):
    data = os.urandom(size)
    assert masked_crc32c(data) == tb_masked_crc(data)


def test_crc32c_check_value():
    # the published CRC-32C check value, masked as TFRecord masks it
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_records_framed_exactly_as_tensorboards_record_writer(tmp_path):
    with EventWriter(tmp_path) as writer:
        writer.scalars(1, {"a": 1.0})  # a short record
        writer.scalars(2, {f"layer{i}/grad_norm": i / 3 for i in range(20)})
        writer.text(3, "report", "x" * 5000)  # a long one
    ours = only_event_file(tmp_path).read_bytes()

    theirs = io.BytesIO()
    for raw in read_events(only_event_file(tmp_path)):
        RecordWriter(theirs).write(raw)
    assert ours == theirs.getvalue()


def test_scalars_read_back_with_event_accumulator(tmp_path):
    writer = EventWriter(tmp_path / "run")
    for step in range(5):
        writer.scalars(step, {"train/loss": 1.0 / (step + 1), "train/acc": step * 10.0})
    writer.scalars(5, {"train/loss": math.nan, "train/acc": math.inf})
    writer.close()

    acc = accumulate(tmp_path / "run")
    assert sorted(acc.Tags()["scalars"]) == ["train/acc", "train/loss"]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [0, 1, 2, 3, 4, 5]
    assert [e.value for e in loss[:5]] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert math.isnan(loss[5].value)
    assert acc.Scalars("train/acc")[5].value == math.inf
    assert acc.FirstEventTimestamp() <= loss[0].wall_time <= time.time()


def test_file_starts_with_version_event_and_one_event_per_call(tmp_path):
    writer = EventWriter(tmp_path, filename_suffix=".v2")
    writer.scalars(7, {f"layer{i}/grad_norm": float(i) for i in range(20)}, wall_time=123.5)
    writer.scalars(8, {"lr": 0.1})
    writer.close()

    path = only_event_file(tmp_path)
    host = re.escape(socket.gethostname())
    pattern = rf"events\.out\.tfevents\.\d{{10}}\.{host}\.{os.getpid()}\.\d+\.v2"
    assert re.fullmatch(pattern, path.name), path.name
    events = parsed_events(path)
    assert events[0].file_version == "brain.Event:2"
    assert len(events) == 3
    first = events[1]
    assert (first.step, first.wall_time, len(first.summary.value)) == (7, 123.5, 20)
    assert [v.simple_value for v in first.summary.value] == [float(i) for i in range(20)]
    assert events[2].summary.value[0].tag == "lr"


def test_text_is_read_by_the_text_plugin_format(tmp_path):
    writer = EventWriter(tmp_path)
    writer.text(3, "notes", "**diverging** at step 3")
    writer.close()

    acc = accumulate(tmp_path)
    assert acc.Tags()["tensors"] == ["notes"]
    assert "notes" in acc.PluginTagToContent("text")
    metadata = acc.SummaryMetadata("notes")
    assert metadata.data_class == summary_pb2.DATA_CLASS_TENSOR
    (point,) = acc.Tensors("notes")
    assert point.step == 3
    assert point.tensor_proto.dtype == types_pb2.DT_STRING
    assert point.tensor_proto.string_val == [b"**diverging** at step 3"]


def test_custom_scalars_layout_is_readable(tmp_path):
    writer = EventWriter(tmp_path)
    writer.custom_scalars(LAYOUT)
    writer.close()

    acc = accumulate(tmp_path)
    tag = "custom_scalars__config__"
    assert tag in acc.PluginTagToContent("custom_scalars")
    assert acc.SummaryMetadata(tag).data_class == summary_pb2.DATA_CLASS_TENSOR
    layout = layout_pb2.Layout.FromString(acc.Tensors(tag)[0].tensor_proto.string_val[0])
    assert layout_as_dict(json_format.MessageToDict(layout)) == LAYOUT


def test_data_reaches_disk_without_flush_or_close(tmp_path):
    """The writer thread flushes on its own every ``flush_secs`` (a reader never waits for close)."""
    writer = EventWriter(tmp_path, flush_secs=0.5)
    try:
        path = only_event_file(tmp_path)
        writer.scalars(1, {"train/loss": 2.0})
        deadline = time.monotonic() + 30  # generous: a loaded machine; timing is benchmarks' business
        while len(read_events(path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(read_events(path)) == 2, "the scalar event never reached the disk without flush()"
    finally:
        writer.close()


def test_flush_blocks_until_written(tmp_path):
    writer = EventWriter(tmp_path, flush_secs=60)
    try:
        for step in range(100):
            writer.scalars(step, {"x": float(step)})
        writer.flush()
        assert len(read_events(only_event_file(tmp_path))) == 101
    finally:
        writer.close()


def test_close_is_idempotent_and_later_calls_are_dropped(tmp_path):
    writer = EventWriter(tmp_path)
    writer.scalars(0, {"x": 1.0})
    writer.close()
    writer.close()
    writer.scalars(1, {"x": 2.0})
    writer.flush()
    assert writer.dropped == 1
    assert len(read_events(only_event_file(tmp_path))) == 2


def test_full_queue_drops_instead_of_blocking(tmp_path):
    writer = EventWriter(tmp_path, flush_secs=60, max_queue=10)
    # The writer wakes early once half full; whatever it has not drained by then is dropped.
    for step in range(1000):
        writer.scalars(step, {"x": float(step)})
    writer.close()
    written = len(read_events(only_event_file(tmp_path))) - 1
    assert writer.dropped > 0
    assert written + writer.dropped == 1000


def test_bad_value_is_logged_once_and_writing_goes_on(tmp_path, caplog):
    writer = EventWriter(tmp_path)
    writer.scalars(0, {"x": "not a number"})
    writer.scalars(1, {"x": object()})
    writer.scalars(2, {"x": 3.0})
    writer.close()
    errors = [r for r in caplog.records if r.name == "tbhealth.monitor.events"]
    assert len(errors) == 1 and "could not encode" in errors[0].getMessage()
    assert [e.step for e in accumulate(tmp_path).Scalars("x")] == [2]


def test_concurrent_producers(tmp_path):
    writer = EventWriter(tmp_path, flush_secs=0.05)

    def produce(worker: int) -> None:
        for step in range(500):
            writer.scalars(step, {f"w{worker}/a": float(step), f"w{worker}/b": -float(step)})

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()

    assert writer.dropped == 0
    acc = accumulate(tmp_path)
    for w in range(4):
        points = acc.Scalars(f"w{w}/a")
        assert sorted(p.step for p in points) == list(range(500))
        assert all(p.value == p.step for p in points)
    events = parsed_events(only_event_file(tmp_path))[1:]
    assert len(events) == 2000 and all(len(e.summary.value) == 2 for e in events)


# --- a real TensorBoard server (helper could move to tests/conftest.py for sharing) -------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def wait_for_json(url: str, ready, proc: subprocess.Popen, timeout: float = 60.0):
    """Poll ``url`` until ``ready(body)`` holds; fail early if TensorBoard exited."""
    deadline = time.monotonic() + timeout
    body = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"tensorboard exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            body = get_json(url)
            if ready(body):
                return body
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not ready after {timeout} s; last answer: {body!r}")


@pytest.mark.slow
def test_real_tensorboard_serves_the_written_data_live(tmp_path):
    run_dir = tmp_path / "logs" / "run1"
    writer = EventWriter(run_dir, flush_secs=1.0)
    port = free_port()
    proc = None
    try:
        writer.custom_scalars(LAYOUT)
        for step, loss in enumerate([2.0, 1.5, 1.25]):
            writer.scalars(step, {"train/loss": loss, "val/loss": loss + 0.5})
        writer.text(2, "notes", "hello *tensorboard*")
        writer.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "logs"),
             "--port", str(port), "--load_fast=false", "--reload_interval=1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        base = f"http://localhost:{port}/data"
        wait_for_json(f"{base}/runs", lambda runs: "run1" in runs, proc)
        scalars_url = f"{base}/plugin/scalars/scalars?" + urllib.parse.urlencode(
            {"run": "run1", "tag": "train/loss"}
        )
        points = wait_for_json(scalars_url, lambda p: len(p) == 3, proc)
        assert [(step, value) for _, step, value in points] == [(0, 2.0), (1, 1.5), (2, 1.25)]

        # Live: a new epoch, no flush(), the file still open; the server must show it soon.
        writer.scalars(3, {"train/loss": 1.0, "val/loss": 1.75})
        points = wait_for_json(scalars_url, lambda p: len(p) == 4, proc, timeout=15)
        assert points[-1][1:] == [3, 1.0]

        assert layout_as_dict(get_json(f"{base}/plugin/custom_scalars/layout")) == LAYOUT

        query = urllib.parse.urlencode({"run": "run1", "tag": "notes"})
        (text,) = get_json(f"{base}/plugin/text/text?{query}")
        assert text["step"] == 2 and "<em>tensorboard</em>" in text["text"]
    finally:
        writer.close()
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
