"""A float64 policy turning jax_enable_x64 on says so once: one warning, not also a log
line (the two together printed it twice, inside the conformance progress bar), and not
again for the next Precision."""

import logging
import warnings

import jax

from dualprec_jax import Precision


def test_x64_switch_is_said_once(x64, caplog):
    jax.config.update("jax_enable_x64", False)
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Precision("64-true")
        Precision("64-true")  # x64 is on now: nothing more to say
    said = [w for w in seen if "jax_enable_x64 is now ON" in str(w.message)]
    assert len(said) == 1
    assert "\n" not in str(said[0].message)
    assert not [r for r in caplog.records if "jax_enable_x64" in r.getMessage()]
    assert jax.config.read("jax_enable_x64")
