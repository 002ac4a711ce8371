"""The pocketsphinx-testdata clip loader: a fake tree in tmp_path (fast) and the installed package (slow)."""

import numpy as np
import pytest
import soundfile as sf

from speechtrim.data.clip import Clip
from speechtrim.data.realspeech import (
    POCKETSPHINX_ROOT,
    load_pocketsphinx_clips,
    parse_sphinx_transcription,
)

FIRST_LIBRIVOX = (
    "and mister john dashwood had then leisure to consider how much there might be prudently in his power "
    "to do for them"
)


def fake_tree(root, cards_ids=("001", "002"), drop_wav=None):
    """A minimal pocketsphinx data tree with two librivox and two cards clips."""
    (root / "librivox").mkdir(parents=True)
    (root / "cards").mkdir()
    (root / "librivox" / "fileids").write_text("book-0001\nbook-0002\n")
    (root / "librivox" / "transcription").write_text(
        "<s> it was a dark night </s> (book-0001)\n\n<s>  and  stormy </s> (book-0002)\n"
    )
    (root / "cards" / "cards.fileids").write_text("\n".join(cards_ids) + "\n")
    (root / "cards" / "cards.transcription").write_text("<s> ten of clubs  </s> (001)\n<s> five five  </s> (002)\n")
    for path in ["librivox/book-0001", "librivox/book-0002", "cards/001", "cards/002"]:
        if path != drop_wav:
            sf.write(root / f"{path}.wav", np.full(1600, 0.1, np.float32), 16000, subtype="PCM_16")
    return root


def test_parse_sphinx_transcription(tmp_path):
    path = tmp_path / "t"
    path.write_text("<s> hello   world </s> (a-1)\n<s> bye </s> (b)\n")
    assert parse_sphinx_transcription(path) == {"a-1": "hello world", "b": "bye"}
    path.write_text("no id here\n")
    with pytest.raises(ValueError, match=r"t:1: not a Sphinx transcript line"):
        parse_sphinx_transcription(path)


def test_fake_tree_loads_in_order(tmp_path):
    clips = load_pocketsphinx_clips(fake_tree(tmp_path))
    assert [(c.source, c.id, c.text) for c in clips] == [
        ("librivox", "book-0001", "it was a dark night"),
        ("librivox", "book-0002", "and stormy"),
        ("cards", "001", "ten of clubs"),
        ("cards", "002", "five five"),
    ]
    assert all(not c.synthetic for c in clips)
    assert clips[0].load().shape == (1600,)
    assert [c.id for c in load_pocketsphinx_clips(tmp_path, subsets="cards")] == ["001", "002"]


def test_missing_package_says_apt_get(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install pocketsphinx-testdata"):
        load_pocketsphinx_clips(tmp_path / "absent")


def test_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHTRIM_POCKETSPHINX_DATA", str(fake_tree(tmp_path)))
    assert len(load_pocketsphinx_clips()) == 4


def test_broken_trees(tmp_path):
    with pytest.raises(FileNotFoundError, match="002.wav is missing"):
        load_pocketsphinx_clips(fake_tree(tmp_path / "a", drop_wav="cards/002"))
    with pytest.raises(ValueError, match="'003' has no line"):
        load_pocketsphinx_clips(fake_tree(tmp_path / "b", cards_ids=("001", "003")))
    with pytest.raises(ValueError, match="unknown subset"):
        load_pocketsphinx_clips(tmp_path / "a", subsets=("timit",))


@pytest.mark.slow
def test_installed_clips():
    if not POCKETSPHINX_ROOT.is_dir():
        pytest.fail("pocketsphinx-testdata is not installed: sudo apt-get install pocketsphinx-testdata")
    clips = load_pocketsphinx_clips()
    assert len(clips) == 10
    assert [c.source for c in clips] == ["librivox"] * 5 + ["cards"] * 5
    assert isinstance(clips[0], Clip) and clips[0].text == FIRST_LIBRIVOX
    assert clips[0].id == "sense_and_sensibility_01_austen_64kb-0870"
    assert clips[5].text == "ten of clubs" and clips[9].text == "eight of spades four of clubs seven of hearts"
    assert all("<s>" not in c.text and "(" not in c.text and c.text == c.text.strip() for c in clips)
    for clip in clips:
        audio = clip.load()
        assert audio.dtype == np.float32 and 1.0 < audio.size / 16000 < 8.0
        assert np.sqrt(np.mean(audio**2)) > 0.005
