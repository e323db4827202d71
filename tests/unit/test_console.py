"""The console (ser_platform/console.py): what Ray is asked to stream, and how a worker's lines travel."""

from __future__ import annotations

import logging

from ser_platform.console import Console, worker_lines


class Channel:
    """The slice of ray.util.queue.Queue a worker uses."""

    def __init__(self, broken: bool = False):
        self.lines: list[str] = []
        self.broken = broken

    def put_nowait(self, line: str) -> None:
        if self.broken:
            raise RuntimeError("the queue's actor is gone")
        self.lines.append(line)


def test_quiet_by_default_and_everything_with_verbose():
    assert Console().ray_init_kwargs() == {"log_to_driver": False, "logging_level": logging.ERROR}
    assert Console(verbose=True).ray_init_kwargs() == {}  # Ray's defaults: every process streamed


def test_worker_lines_go_to_the_channel_with_the_trials_prefix(caplog):
    channel = Channel()
    say = worker_lines(channel, "trial 1a2b | ")
    with caplog.at_level(logging.INFO, logger="ser_platform.train"):
        say("fold 1 epoch 1/5 | train loss 1.2")
    assert channel.lines == ["trial 1a2b | fold 1 epoch 1/5 | train loss 1.2"] and not caplog.records


def test_without_a_channel_or_with_a_dead_one_lines_go_to_the_logger_ray_streams(caplog):
    with caplog.at_level(logging.INFO, logger="ser_platform.train"):
        worker_lines(None)("fold 2: best epoch 3")
        worker_lines(Channel(broken=True), "trial x | ")("fold 3: best epoch 1")
    assert [r.getMessage() for r in caplog.records] == ["fold 2: best epoch 3", "trial x | fold 3: best epoch 1"]
