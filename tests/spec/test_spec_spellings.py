"""Unknown policy names that other libraries use get the dualprec policy they mean."""

import re

import pytest

from dualprec import Policy, PolicyError
from dualprec.spellings import SPELLINGS


@pytest.mark.parametrize("typed, meant", [
    ("fp16-mixed", '"16-mixed"'), ("FP16_MIXED", '"16-mixed"'), ("amp", '"16-mixed"'),
    ("fp8", '"transformer-engine"'), ("tf32", '"32-true"'), ("O2", '"16-true,master=true"'),
    ("bfloat16-mixed", '"bf16-mixed"'), ("4bit", '"nf4"'), ("qlora", '"nf4-dq"'), ("no", '"32-true"'),
])
def test_what_people_type_suggests_the_policy_they_mean(typed, meant):
    with pytest.raises(PolicyError, match=re.escape(f"did you mean {meant}")):
        Policy.parse(typed)


def test_edit_distance_still_suggests_for_typos():
    with pytest.raises(PolicyError, match='did you mean "bf16-mixed"'):
        Policy.parse("bf16-mixd")


def test_mixed_float16_and_friends_still_parse():
    # names that are presets or aliases never reach the table
    assert Policy.parse("mixed_float16").loss_scale.kind == "dynamic"
    assert Policy.parse("fp32") == Policy.parse("32-true")


@pytest.mark.parametrize("typed", sorted(SPELLINGS))
def test_every_table_entry_is_unknown_and_every_suggestion_parses(typed):
    with pytest.raises(PolicyError):
        Policy.parse(typed)  # a table entry that parsed would never be consulted
    for quoted in re.findall(r'"([^"]+)"', SPELLINGS[typed]):
        if "=" in quoted and "," not in quoted:
            continue  # a framework setting quoted in the explanation, e.g. mixed_precision="no"
        Policy.parse(quoted)
