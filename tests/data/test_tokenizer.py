"""Tokenizer ids against ids checked by hand from the CLIP BPE vocabulary.

How the expected ids were derived (independently of the code under test): the vocabulary is the
256 byte characters in CLIP's byte order (printable ASCII '!'..'~' first, so a character c has id
ord(c) - 33), then the same 256 with '</w>' (id + 256), then one entry per merge line of
bpe_simple_vocab_16e6.txt (merge line k, counted from 1 after the header, has id 511 + k).
So 'a</w>' = 256 + 64 = 320, '.</w>' = 269, ',</w>' = 267, '!</w>' = 256, '-</w>' = 268,
't</w>' = 339, '&</w>' = 261, '1</w>' = 272; whole words are the merge lines that spell them:
'the</w>' 518, 'is</w>' 533, 'and</w>' 537, 'with</w>' 593, 'red</w>' 736, 'man</w>' 786,
'black</w>' 1449, 'white</w>' 1579, 'blue</w>' 1746, 'phone</w>' 1951, 'woman</w>' 2308,
'hair</w>' 2225, 'shirt</w>' 2523, 'wearing</w>' 3309, 'bag</w>' 3365, 'holding</w>' 5050,
'jacket</w>' 6164, 'jeans</w>' 10157, "'s</w>" 568, '...</w>' 678.
"""

from __future__ import annotations

import torch

from php_runner.data.tokenizer import EOT_ID, SOT_ID, tokenize, tokenize_all


def ids(text: str, context_length: int = 77) -> list[int]:
    tokens = tokenize(text, context_length)
    return tokens[tokens != 0].tolist()


def test_special_ids_are_the_official_ones():
    assert (SOT_ID, EOT_ID) == (49406, 49407)


def test_plain_caption():
    assert ids("A woman wearing a black jacket and blue jeans.") == [
        49406, 320, 2308, 3309, 320, 1449, 6164, 537, 1746, 10157, 269, 49407,
    ]


def test_capitals_apostrophe_hyphen_and_punctuation():
    # Lower-cased; "'s" is its own token; "t-shirt" splits into t / - / shirt; "," and "!" stand alone.
    assert ids("The MAN's T-shirt is RED, white!") == [
        49406, 518, 786, 568, 339, 268, 2523, 533, 736, 267, 1579, 256, 49407,
    ]


def test_whitespace_html_entities_ellipsis_and_digits():
    # Whitespace collapses, "&amp;" unescapes to "&", "..." is one merged token, digits stand alone.
    assert ids("  Holding   a\nphone...  Bag &amp; hair 1") == [
        49406, 5050, 320, 1951, 678, 3365, 261, 2225, 272, 49407,
    ]


def test_padding_and_shape():
    tokens = tokenize("a man.")
    assert tokens.dtype == torch.long and tokens.shape == (77,)
    assert tokens[:5].tolist() == [49406, 320, 786, 269, 49407]
    assert torch.all(tokens[5:] == 0)


def test_exactly_full_caption_is_not_truncated():
    assert tokenize("a " * 75).tolist() == [49406] + [320] * 75 + [49407]


def test_over_long_caption_keeps_77_with_eot_last():
    assert tokenize("black " * 80 + "man").tolist() == [49406] + [1449] * 75 + [49407]
    # One token too many: the last word is overwritten by EOT, as the official code does.
    assert tokenize("a " * 75 + "man").tolist() == [49406] + [320] * 75 + [49407]


def test_other_context_length():
    assert tokenize("a woman wearing a black jacket", context_length=5).tolist() == [49406, 320, 2308, 3309, 49407]
    assert tokenize("a man", context_length=8).tolist() == [49406, 320, 786, 49407, 0, 0, 0, 0]


def test_id_49405_is_open_clips_last_merge_not_the_official_mask_token():
    # The one documented difference: BPE merges "jekyll" into the last merge string, which the
    # official vocabulary drops (its id 49405 is <|mask|>), so the official code cannot tokenise it.
    assert ids("jekyll") == [49406, 49405, 49407]


def test_tokenize_all_stacks_rows_equal_to_tokenize():
    texts = ["a man.", "The MAN's T-shirt is RED, white!", "a man."]
    stacked = tokenize_all(texts)
    assert stacked.shape == (3, 77)
    for row, text in zip(stacked, texts):
        assert torch.equal(row, tokenize(text))
    assert tokenize_all([]).shape == (0, 77)


def test_non_ascii_captions_are_byte_level_bpe():
    # Non-ASCII characters are their UTF-8 bytes in CLIP's byte alphabet: e-acute is C3 A9 -> 'Ã©', i-diaeresis
    # C3 AF -> 'Ã¯'. Merge lines: 3655 'Ã ©</w>' (id 4166), 14793 'caf Ã©</w>' (id 15304), 586 'n a' (1097),
    # 35178 'Ã ¯' (35689), 52 'v e</w>' (563).
    assert ids("é") == [49406, 4166, 49407]
    assert ids("Café") == [49406, 15304, 49407]
    assert ids("naïve") == [49406, 1097, 35689, 563, 49407]


def test_official_cleaning_repairs_unescapes_twice_collapses_and_lowercases():
    # ftfy repairs mojibake ('cafÃ©' is café read as Latin-1) and uncurls quotes (’ -> '), folds full-width
    # letters and ligatures (ＲＥＤ -> RED, ﬁ -> fi; merge line 3286 'f ine</w>' is id 3797); HTML is unescaped
    # twice (&amp;amp; -> &amp; -> &); every whitespace run, no-break space included, becomes one space.
    assert ids("cafÃ©") == ids("café") == [49406, 15304, 49407]
    assert ids("The manâ€™s shirt") == ids("The man’s shirt") == [49406, 518, 786, 568, 2523, 49407]
    assert ids("jacket&amp;amp;jeans") == [49406, 6164, 261, 10157, 49407]
    assert ids("ＲＥＤ\u00a0\u00a0shirt") == [49406, 736, 2523, 49407]
    assert ids("a ﬁne bag") == [49406, 320, 3797, 3365, 49407]
