"""Progress in logs: a line every 10% when stderr is not a terminal, not a frame per step; peak memory."""

import sys

from detector.progress import peak_memory_mb, progress


def test_a_log_gets_a_line_every_ten_percent(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert list(progress(range(200), desc="detect", unit="img")) == list(range(200))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and "\r" not in "".join(lines)  # 10%, 20%, ..., 90% and one "done"
    assert lines[0].startswith("detect: 10% (20/200 img)") and lines[-1].startswith("detect: done (200 img)")
    bar = progress(total=4, desc="search")  # the manual form: update() and close()
    for _ in range(4):
        bar.update()
    bar.close()
    assert capsys.readouterr().err.splitlines()[-1].startswith("search: done (4 it)")


def test_disabled_progress_prints_nothing(capsys):
    assert list(progress([1, 2], disable=True)) == [1, 2]
    assert capsys.readouterr().err == ""


def test_peak_memory_is_the_resident_size():
    assert 10 < peak_memory_mb() < 64 * 1024  # this Python process with torch loaded: tens of MB at least
