"""cli: the argument types every command shares."""

from __future__ import annotations

import argparse

import pytest

from qwen3_vl_service.core import cli


@pytest.mark.unit
@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "-1", "301", "1e9", "abc", ""])
def test_seconds_refuses_what_is_not_a_finite_number_in_range(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.seconds(300)(text)


@pytest.mark.unit
def test_seconds_takes_the_range_and_its_ends():
    parse = cli.seconds(300, least=0.5)
    assert [parse("0.5"), parse("2"), parse("3e2")] == [0.5, 2.0, 300.0]
    with pytest.raises(argparse.ArgumentTypeError):
        parse("0.25")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("command", "args"),
    [("status", ["--sample", "nan"]), ("status", ["--http-timeout", "inf"]), ("stop", ["--timeout", "nan"])],
)
def test_status_and_stop_refuse_a_non_finite_time_in_one_line(command, args, capsys):
    from qwen3_vl_service.lifecycle import status, stop

    main = {"status": status.main, "stop": stop.main}[command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give seconds from" in err[0], err
