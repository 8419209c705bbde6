"""Re-measure the JAX hand-written vs Precision pairs on the GPU (bf16-mixed, bf16-true, 16-mixed)
after a fix, without the whole gpu_run.py plan.  `--smoke` runs tiny sizes on CPU."""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import jax
from bench import gpu_jax
small = "--smoke" in sys.argv
kw = dict(d_model=64, d_hidden=256, blocks=2, tokens=128, steps=3, warmup=1, repeats=2) if small else {}
out = {"device": str(jax.devices()[0]), "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "rows": {}}
for pol in ("bf16-mixed", "bf16-true", "16-mixed"):
    try:
        r = gpu_jax.measure(policy=pol, **kw)
    except Exception as e:
        r = {"error": repr(e)[:300]}
    out["rows"][pol] = r
    print(pol, json.dumps(r), flush=True)
    path = os.path.join(os.environ.get("OUT", "/tmp"), "jax-rerun.json")
    json.dump(out, open(path, "w"), indent=1, default=str)
