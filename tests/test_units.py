"""mmf.units: the unit follows the size (a 3 MB disk is not "0.00 GiB", a week is not "168 hours")."""

from mmf.units import human_bytes, human_seconds


def test_human_bytes_picks_the_unit():
    assert human_bytes(3_000_000) == "3 MB"
    assert human_bytes(3 * 2**20, binary=True) == "3 MiB"
    assert human_bytes(3_210_000_000) == "3.21 GB"
    assert human_bytes(12_400_000) == "12.4 MB"
    assert human_bytes(812_000) == "812 kB"
    assert human_bytes(17) == "17 B" and human_bytes(0) == "0 B"
    assert human_bytes(999_700_000) == "1 GB"  # not "1000 MB"
    assert human_bytes(26.5e12) == "26.5 TB" and human_bytes(2.5e15) == "2500 TB"
    assert human_bytes(-5_000_000) == "-5 MB"
    assert human_bytes(None) == "-"


def test_human_seconds_picks_the_unit():
    assert human_seconds(42) == "42 s" and human_seconds(720) == "12 min"
    assert human_seconds(5.2 * 3600) == "5.2 hours" and human_seconds(7 * 86400) == "7 days"
    assert human_seconds(12 * 86400) == "12 days" and human_seconds(2.4 * 365.25 * 86400) == "2.4 years"
    assert human_seconds(float("inf")) == "-"


def test_plural_says_1_step_not_1_steps():
    from mmf.units import plural

    assert [plural(n, "step") for n in (0, 1, 2, 1234)] == ["0 steps", "1 step", "2 steps", "1,234 steps"]
    from mmf.bench.model_bench_protocol import protocol_description

    text = protocol_description(batch=1, prompt_len=8, gen_len=2, repeat=1)
    assert "then 1 decode step. One untimed warm-up, then 1 timed repetition; figures" in text
    assert "then 7 decode steps. One untimed warm-up, then 2 timed repetitions;" in protocol_description(1, 8, 8, 2)

