"""lowbit.progress: progress goes to stderr, or to the stream the caller passes, never stdout."""

from __future__ import annotations

import io

import pytest

from lowbit.progress import progress_bar, progress_line


def test_progress_line_writes_to_stderr_or_the_given_stream(capsys: pytest.CaptureFixture[str]):
    progress_line("step 1")
    progress_line("hidden", enabled=False)
    stream = io.StringIO()
    progress_line("step 2", stream=stream)
    out, err = capsys.readouterr()
    assert (out, err, stream.getvalue()) == ("", "step 1\n", "step 2\n")


def test_progress_bar_yields_every_item_wherever_it_draws(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich draws as on a terminal
    stream = io.StringIO()
    assert list(progress_bar(range(3), "counting", stream=stream)) == [0, 1, 2]
    assert list(progress_bar(iter("ab"), "letters", enabled=False)) == ["a", "b"]
    assert list(progress_bar([4, 5], "default")) == [4, 5]
    out, err = capsys.readouterr()
    assert out == ""
    assert "counting" in stream.getvalue() and "default" in err
