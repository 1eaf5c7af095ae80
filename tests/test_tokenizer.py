from pathlib import Path

from transformers import CLIPTokenizer

from erasekit.world.assets import model_path
from erasekit.world.train import MAX_TOKENS
from erasekit.world.tokenizer import BOS, EOS, build_vocab, write_tokenizer_files
from erasekit.world.vocab import all_words


def test_committed_tokenizer_files_are_reproducible(tmp_path: Path):
    write_tokenizer_files(tmp_path)
    shipped = model_path() / "tokenizer"
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name


def test_every_world_word_is_one_token_and_round_trips():
    tok = CLIPTokenizer.from_pretrained(str(model_path() / "tokenizer"))
    assert tok.model_max_length == MAX_TOKENS  # the world's short context (see train.py)
    for w in all_words():
        ids = tok(w).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == 3, (w, tok.convert_ids_to_tokens(ids))
        assert tok.decode(ids, skip_special_tokens=True) == w
    text = "a photo of a crimson checkered star against a meadow backdrop"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_unknown_words_fall_back_to_characters():
    tok = CLIPTokenizer.from_pretrained(str(model_path() / "tokenizer"))
    ids = tok("zebra").input_ids
    assert len(ids) > 3 and tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "zebra"


def test_vocab_layout_matches_clip():
    vocab, merges = build_vocab()
    assert vocab[BOS] == len(vocab) - 2 and vocab[EOS] == len(vocab) - 1
    assert len(vocab) == 512 + len(merges) + 2
