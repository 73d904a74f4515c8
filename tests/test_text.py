from backforth_spark.text import norm_hash, normalise, stable_hash


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
