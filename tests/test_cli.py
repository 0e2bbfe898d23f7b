import pytest

from tests.conftest import run_cli

VERBS = ["init", "import", "verify", "info"]


def test_help_lists_verbs_and_ends_with_example():
    p = run_cli("--help")
    assert p.returncode == 0
    for v in VERBS:
        assert v in p.stdout
    assert p.stdout.strip().splitlines()[-1].strip().startswith("odyssey")


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_help_ends_with_an_example(verb):
    p = run_cli(verb, "--help")
    assert p.returncode == 0
    lines = p.stdout.strip().splitlines()
    assert lines[-2].strip() == "example:" and lines[-1].strip().startswith("odyssey ")


def test_missing_model_dir(tmp_path):
    p = run_cli("info", tmp_path / "nope")
    assert p.returncode == 2 and "not found" in p.stderr and "Traceback" not in p.stderr
