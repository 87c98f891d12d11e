import hydra
import pytest

from gpt.errors import EXIT_USER_ERROR, UserError, describe, exit_on_user_error


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


def test_missing_group_option_names_the_choices():
    from hydra.errors import MissingConfigException

    e = MissingConfigException(
        "In 'train': Could not find 'optim/sgd'\n\nAvailable options in 'optim':\n\t_schema\n\tadamw\n\tmuon",
        missing_cfg_file="optim/sgd",
        options=["_schema", "adamw", "muon"],
    )
    assert describe(e) == "there is no optim=sgd; choose one of adamw, muon"
    inner = MissingConfigException(
        "In 'experiment/mine': Could not find 'model/tiny'", missing_cfg_file="model/tiny", options=["nano"]
    )
    assert describe(inner) == "there is no model=tiny (asked for in experiment/mine); choose one of nano"


ANY_PROMPT = (
    "for any text, quotes and apostrophes included: prompt=- reads it from stdin ({}), "
    "prompt_file=FILE from a file (one per line)"
)


@pytest.mark.parametrize(
    "override, advice",
    [
        ("data.path=~/corpus", """put the value in quotes inside the argument: 'data.path="~/corpus"'"""),
        (
            "prompt=Où?",
            """put the value in quotes inside the argument: 'prompt="Où?"', or """
            + ANY_PROMPT.format('echo "Où?" | python generate.py prompt=-'),
        ),
        # An apostrophe: Hydra's quotes inside the shell's cannot carry it, stdin and a file can.
        ("prompt=it's", ANY_PROMPT.format('echo "it\'s" | python generate.py prompt=-')),
        ("prompt=it's $5", ANY_PROMPT.format("python generate.py prompt=- < FILE")),
        ('prompt=say "hi"', ANY_PROMPT.format("""echo 'say "hi"' | python generate.py prompt=-""")),
        ("++prompt=it's", ANY_PROMPT.format('echo "it\'s" | python generate.py prompt=-')),
        (
            "stop=[Où]",
            """put values with spaces or special characters in quotes inside the argument: """
            """'prompt="Hello, world!"'""",
        ),
    ],
)
def test_unparsable_override_says_how_to_quote_it(override: str, advice: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with pytest.raises(Exception) as info:
        OverridesParser.create().parse_overrides([override])
    assert describe(info.value) == f"could not parse the override {override!r}; " + advice


@pytest.mark.parametrize(
    "override, advice",
    [
        # The shell took the quotes of prompt="July 4, 1776": Hydra reads a list, then refuses it.
        (
            "prompt=July 4, 1776",
            """(Hydra reads its commas as a list of values); put the value in quotes inside the """
            """argument: 'prompt="July 4, 1776"', or """
            + ANY_PROMPT.format('echo "July 4, 1776" | python generate.py prompt=-'),
        ),
        (
            "runs_dir=a,b",
            """(Hydra reads its commas as a list of values); put the value in quotes inside the """
            """argument: 'runs_dir="a,b"' (a list: 'runs_dir=[a,b]'; a sweep: --multirun)""",
        ),
        (
            "prompt=range(1,3)",
            """(Hydra reads a sweep); put the value in quotes inside the argument: 'prompt="range(1,3)"', """
            "or " + ANY_PROMPT.format('echo "range(1,3)" | python generate.py prompt=-'),
        ),
    ],
)
def test_override_read_as_several_values_says_how_to_quote_it(override: str, advice: str, capsys):
    """Hydra parses these, and refuses them when it composes the config (generate.py runs once)."""
    from gpt.config import GenerateConfig
    from tests.helpers import command

    generate = command("generate", GenerateConfig, run=lambda cfg: None)
    with pytest.raises(SystemExit) as info:
        generate([override])
    assert info.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err == f"error: could not parse the override {override!r} {advice}\n"
