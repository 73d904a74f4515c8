from backforth_spark.core.text import norm_hash, normalise, stable_hash


def test_normalise_folds_case_width_punctuation_and_space():
    assert normalise("  Hello,   WORLD!\n\tＦｕｌｌ-width… ") == "hello world full width"


def test_normalise_handles_casefold_special_cases():
    assert normalise("Straße") == normalise("STRASSE")


def test_norm_hash_equal_for_trivially_different_texts():
    assert norm_hash("The cat sat.") == norm_hash("the  cat   sat")
    assert norm_hash("The cat sat.") != norm_hash("The dog sat.")


def test_stable_hash_separates_parts():
    assert stable_hash("ab", "c") != stable_hash("a", "bc")
    assert len(stable_hash("x")) == 32


def test_normalise_drops_non_ascii_punctuation_and_symbols_and_keeps_letters():
    assert normalise("«Ça va?» — oui… 😀 ok ¿Qué? 価格は¥100。") == "ça va oui ok qué 価格は 100"


def test_normalise_treats_every_code_point_as_a_per_character_reference_does():
    import sys
    import unicodedata

    def reference(text):
        folded = unicodedata.normalize("NFKC", text).casefold()
        return " ".join("".join(" " if unicodedata.category(c)[0] in "PS" else c for c in folded).split())

    every = "".join(chr(cp) for cp in range(sys.maxunicode + 1) if not 0xD800 <= cp < 0xE000)
    pieces = [every[i : i + 4096] for i in range(0, len(every), 4096)]
    assert [normalise(p) for p in pieces] == [reference(p) for p in pieces]
