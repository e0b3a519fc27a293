"""Radii as people write them (8/255) and as the report and terminal show them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from auditor.cli import cli
from auditor.eps import eps_key, eps_text, parse_eps
from auditor.errors import AuditError
from auditor.scan import resolve_eps

DIGIT = (1, 28, 28)


def test_fractions_parse_to_the_same_results_key_as_their_decimals():
    assert parse_eps("8/255") == 8 / 255 and parse_eps("0.3") == 0.3 and parse_eps(" 2 ") == 2.0
    assert eps_key(parse_eps("8/255")) == eps_key(0.0313725) == "0.0313725"
    assert parse_eps("-1/255") == -1 / 255  # a number: --eps and policies each check the range
    for bad in ("abc", "1/0", "nan", "inf", "8/", "/255"):
        with pytest.raises(ValueError):
            parse_eps(bad)


def test_whole_grey_levels_read_as_fractions_and_short_decimals_stay():
    assert [eps_text(k / 255) for k in (1, 2, 4, 8, 16)] == ["1/255", "2/255", "4/255", "8/255", "16/255"]
    assert eps_text("0.0313725") == "8/255"  # a results key
    assert [eps_text(value) for value in (0.3, 0.2, 0.1, 2.0, 0.5, 1.0, 0.0, 0.123456)] == [
        "0.3", "0.2", "0.1", "2", "0.5", "1", "0", "0.123456"]


def test_a_radius_given_twice_in_two_spellings_is_one_row():
    assert [eps_key(eps) for eps in resolve_eps(DIGIT, "linf", [8 / 255, 0.0313725, 0.1])] == ["0.0313725", "0.1"]


def test_cli_takes_fractions_and_refuses_bad_radii_in_one_line():
    runner = CliRunner()
    result = runner.invoke(cli, ["scan", "examples/mnist_cnn.onnx", "--eps", "8/255x"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].endswith("'8/255x' is not a number or a fraction such as 8/255")


def test_the_python_api_takes_one_radius_or_fractions():
    assert resolve_eps(DIGIT, "linf", 0.3) == (0.3,)
    assert resolve_eps(DIGIT, "linf", "8/255") == (8 / 255,)
    assert resolve_eps(DIGIT, "l2", ["1/2", 1.0]) == (0.5, 1.0)
    for bad, message in [("abc", "not a number"), (float("inf"), "finite"), ([None], "--eps")]:
        with pytest.raises(AuditError, match=message):
            resolve_eps(DIGIT, "l2", bad)


def test_default_radii_follow_the_image_kind_not_the_data_source():
    # an .npz of MNIST-sized digits is audited at the MNIST radii, like the built-in data
    assert resolve_eps((1, 28, 28), "linf", None) == (0.1, 0.2, 0.3)
    assert resolve_eps((1, 32, 32), "l2", ()) == (1.0, 1.5, 2.0)
    # colour images, and greyscale ones larger than 32 x 32, at the CIFAR/ImageNet radii
    assert resolve_eps((3, 32, 32), "linf", None) == (2 / 255, 4 / 255, 8 / 255)
    assert resolve_eps((1, 224, 224), "l2", None) == (0.25, 0.5, 1.0)


def test_an_l2_radius_beyond_the_pixel_cube_is_refused():
    assert resolve_eps((1, 2, 2), "l2", 2.0) == (2.0,)  # exactly the diameter sqrt(4)
    with pytest.raises(AuditError, match="exceeds the L2 diameter 2 of"):
        resolve_eps((1, 2, 2), "l2", 2.5)
    with pytest.raises(AuditError, match="exceeds the \\[0,1\\] pixel range"):
        resolve_eps(DIGIT, "linf", 1.5)
