"""The packed codes of a fixed set of recipes stay bit-identical (``goldens.py``)."""


def test_recipes_write_the_recorded_bits():
    from .goldens import run_portable

    done = run_portable("--check")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "goldens hold" in done.stdout
