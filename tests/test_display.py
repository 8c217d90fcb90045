"""What readers look at: printed messages and image titles fit the page and the image they belong to."""
import matplotlib
import pytest
from PIL import Image

from helpers import display

matplotlib.use("Agg")


def test_say_wraps_to_the_page_width_and_keeps_every_word(capsys):
    text = "Note: " + " ".join(f"word{i}" for i in range(60)) + " data/runs/tiny/a_rather/long/path/that/stays/whole"
    display.say(text)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 1 and lines[0].startswith("Note: ") and all(line.startswith("  ") for line in lines[1:])
    assert all(len(line) <= display.LINE_WIDTH for line in lines[:-1])
    assert " ".join(line.strip() for line in lines) == text  # nothing lost, a long path not broken
    display.say("short")
    assert capsys.readouterr().out == "short\n"


@pytest.mark.parametrize("size", [1.9, 2.6])
def test_image_titles_wrap_to_their_image(size):
    fits = int(size * 72 / (8 * 0.6))
    titles = ["dabench_test\nDiffAgent-RRHF: Stable Diffusion v1.5 (pruned, ema-only)", "seed 3"]
    figure = display.image_grid([Image.new("RGB", (8, 8))] * 2, titles, columns=2, size=size)
    shown = [axis.get_title() for axis in figure.axes[:2]]
    assert shown[1] == "seed 3" and shown[0].startswith("dabench_test\nDiffAgent-RRHF:")
    assert all(len(line) <= fits for line in shown[0].split("\n")) and shown[0].count("\n") >= 2
    assert shown[0].split() == titles[0].split()  # wrapped, not cut
