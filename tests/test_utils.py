"""The shared helpers: first lines of errors, train/eval mode for a block, sizes, atomic file writes."""
import pytest
from torch import nn

from flexsurgeon.utils import as_size, first_line, parse_size, replacing, training_mode, write_text_replacing


def test_first_line_of_an_error():
    assert first_line(ValueError("  bad value\nmore detail")) == "bad value"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(ValueError(" "), "") == ""


def test_training_mode_is_put_back_when_the_block_raises():
    model = nn.Sequential(nn.Dropout()).train()
    with pytest.raises(RuntimeError), training_mode(model, False):
        assert not model.training and not model[0].training
        raise RuntimeError
    assert model.training and model[0].training


@pytest.mark.parametrize("value,size", [(224, (224, 224)), ((256, 192), (256, 192)), ([7, 9], (7, 9)),
                                        (0, None), ((1, 2, 3), None), ((True, 4), None), (2.5, None)])
def test_as_size(value, size):
    assert as_size(value) == size


def test_parse_size():
    assert parse_size("224") == (224, 224) and parse_size("256X192") == (256, 192) == parse_size("256,192")
    with pytest.raises(ValueError, match="e.g. 224 or 256x192"):
        parse_size("big")
    with pytest.raises(ValueError, match="with positive numbers"):
        parse_size("0x4")


def test_replacing_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "a.txt"
    write_text_replacing(path, "old")
    with pytest.raises(OSError), replacing(path) as tmp:
        tmp.write_text("half")
        raise OSError
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    write_text_replacing(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_clip_cuts_long_messages_at_a_word_and_marks_the_cut():
    from flexsurgeon.utils import clip

    assert clip("short enough", 40) == "short enough"
    text = "could not resolve host huggingface.co after several retries, giving up now"
    cut = clip(text, 40)
    assert len(cut) <= 40 and cut.endswith("...") and text.startswith(cut[:-3])
    assert cut[:-3].split()[-1] in text.split()  # a whole word, not cut mid-word
