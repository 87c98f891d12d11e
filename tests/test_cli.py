import hydra
import pytest

from gpt.cli import EXIT_USER_ERROR, describe, exit_on_user_error
from gpt.errors import UserError


def raising(exc: Exception):
    @exit_on_user_error
    def main():
        raise exc

    return main


def test_user_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        raising(UserError("data.path 'x' does not exist; pass a file"))()
    assert info.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: data.path 'x' does not exist; pass a file\n"


def test_bugs_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        raising(ZeroDivisionError("bug"))()


def test_failed_instantiation_names_target_and_cause():
    with pytest.raises(Exception) as info:
        hydra.utils.instantiate({"_target_": "math.sqrt", "bad": 1})
    assert describe(info.value).startswith(
        "Error in call to target 'math.sqrt': TypeError('math.sqrt() takes no keyword arguments')"
    )
