"""dualprec_jax: carries a dualprec Policy out in JAX and Flax."""
