"""Shared fixtures for the reference-numerics tests."""

import types

import pytest


def make_loss_scale(**kw):
    base = dict(kind="dynamic", init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                growth_interval=2000, min_scale=None, max_scale=None)
    base.update(kw)
    return types.SimpleNamespace(**base)


def make_recipe(**kw):
    base = dict(scaling="delayed", history_len=1024, margin=0, amax_algo="max", format="hybrid")
    base.update(kw)
    return types.SimpleNamespace(**base)


@pytest.fixture
def loss_scale_config():
    return make_loss_scale
