import pytest

from dycoke_cli.errors import UsageError
from dycoke_cli.evaluation.compare import word_diff
from dycoke_cli.evaluation.methods import parse_methods
from dycoke_cli.evaluation.qa import is_correct, normalize
from dycoke_cli.options import CompressionOptions, Method, Selection


@pytest.mark.parametrize("prediction,reference,ok", [
    ("Red.", "red", True),
    ("the red cup", "red", True),  # articles are stripped; "red" is the first content word
    ("a cup that is red", "red", False),
    ("left", "left", True),
    ("A red cup moves left.", "a red cup moves left", True),
    ("a red cup moves left and turns blue", "a red cup moves left", False),
    ("", "red", False),
])
def test_is_correct(prediction, reference, ok):
    assert is_correct(prediction, reference) is ok


def test_normalize():
    assert normalize("The RED cup, an apple!") == ["red", "cup", "apple"]


def test_word_diff():
    assert word_diff("a red cup moves left", "a red ball moves left") == [
        ("a", False), ("red", False), ("ball", True), ("moves", False), ("left", False)]


def test_parse_methods():
    chosen = parse_methods("none, dycoke,fastv,dycoke-topk")
    assert [(c.value, c.method) for c in chosen] == [("none", Method.none), ("dycoke", Method.dycoke),
                                                     ("fastv", Method.fastv), ("dycoke-topk", Method.dycoke)]
    assert [c.options(CompressionOptions()).selection for c in chosen] == [None, None, None, Selection.topk]
    with pytest.raises(UsageError, match="listed twice"):
        parse_methods("none,none")
    with pytest.raises(UsageError) as err:
        parse_methods("none,topk")
    assert str(err.value) == ("--methods: unknown method 'topk' (choose from dycoke, fastv, random, frames, none, "
                              "dycoke-topk)")
