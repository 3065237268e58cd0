"""Random flag combinations through generate.py's parser and policies.build_caches (on the meta device, nothing is
allocated): each either fails with one clean error or yields caches whose slot counts are what the flags ask."""
import contextlib
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import generate
import policies

SCORED = ["recent_global", "random", "l2", "heavy_hitter", "keep_it_odd", "lsh", "keydiff", "tova",
          "expected_attention"]
N_LAYERS, HKV, D, H = 4, 2, 8, 4

budget_flags = st.one_of(
    st.tuples(st.just("--max_cache_length"), st.sampled_from(["0.5", "0.25", "1", "64", "3", "0", "-1", "inf", "nan",
                                                               "1.5", "abc", "100000"])),
    st.tuples(st.just("--compression_ratio"), st.sampled_from(["0.5", "0.75", "0", "1", "-0.1", "nan"])),
)
numeric = st.sampled_from([
    ("--global_tokens", "0"), ("--global_tokens", "-1"), ("--recent_window", "3"), ("--recent_window", "x"),
    ("--observation_window", "0"), ("--observation_window", "8"), ("--pooling_kernel", "0"), ("--lsh_dim", "65"),
    ("--cache_group_size", "0"), ("--cache_bits", "3"), ("--cache_bits", "8"), ("--keep_set", "adakv"),
    ("--keep_set", "chunkkv"), ("--keep_set", "nope"), ("--adakv_cap", "0.5"), ("--ea_future_positions", "0"),
    ("--temperature", "nan"), ("--temperature", "-1"), ("--top_p", "0"), ("--top_p", "1.5"), ("--max_new_tokens", "0"),
    ("--batch_size", "0"), ("--prefill_chunk", "-3"), ("--tova_heads", "group"), ("--min_recovery_frac", "2"),
])


def parse(argv):
    p = generate.build_parser()
    return policies.parse_args(p, argv)


def expected_budget(a, strategy, prompt_len, max_seq):
    if strategy == "full":
        return max_seq
    if a.compression_ratio is not None:
        b = max(1, int(prompt_len * (1 - a.compression_ratio)))
    else:
        x = a.max_cache_length[0]
        b = int(round(x * max_seq)) if x <= 1 else int(x)
    b = min(b, max_seq)
    if a.keep_set == "adakv":
        b = min(math.ceil(a.adakv_cap * b), max_seq)
    return b


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategy=st.sampled_from(SCORED + ["full"]), budget=budget_flags, extra=st.lists(numeric, max_size=3),
       prompt_len=st.integers(1, 300), new=st.integers(1, 200))
def test_a_flag_combination_fails_cleanly_or_sizes_the_caches_as_asked(strategy, budget, extra, prompt_len, new):
    argv = ["--cache_strategy", strategy, *budget] + [x for pair in extra for x in pair]
    max_seq = prompt_len + new
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            a = parse(argv)
        caches = policies.build_caches(policies.settings(a), N_LAYERS, HKV, D, 1, max_seq, torch.float32, "meta",
                                       prompt_len=prompt_len, n_heads=H)
    except SystemExit as e:  # argparse: one line, exit 2
        err = stderr.getvalue().strip()
        assert e.code == 2 and err.startswith("error: ") and "\n" not in err, err
        return
    except ValueError as e:  # a combination checked when the caches are built: one line
        assert "\n" not in str(e) and str(e), repr(e)
        return
    want = expected_budget(a, strategy, prompt_len, max_seq)
    assert [c.kv_budget for c in caches] == [want] * N_LAYERS, (argv, prompt_len, max_seq)
    for flag, value in dict(extra).items():  # every flag given was honoured (a repeated flag: its last value)
        name = flag[2:]
        if hasattr(caches[0], name):
            assert str(getattr(caches[0], name)) in (value, str(float(value)) if value[0].isdigit() else value)


@pytest.mark.parametrize("argv", [["--max_cache_length", "inf"], ["--pooling_kernel", "0"],
                                  ["--cache_group_size", "0"], ["--observation_window", "0"],
                                  ["--min_recovery_frac", "2"], ["--temperature", "nan"]])
def test_values_the_issue_named_are_refused_when_parsed(capsys, argv):
    with pytest.raises(SystemExit):
        parse(argv)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: argument " + argv[0]) and "\n" not in err


def test_keep_set_with_a_cache_that_keeps_everything_is_refused():
    """Found by the property test: full ignored --keep_set adakv silently; now one line."""
    with pytest.raises(ValueError, match="keeps everything"):
        policies.build_caches(policies.settings(parse(["--cache_strategy", "full", "--keep_set", "adakv"])),
                              N_LAYERS, HKV, D, 1, 16, torch.float32, "meta", prompt_len=4, n_heads=H)
