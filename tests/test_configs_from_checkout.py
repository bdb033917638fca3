"""The configs load from a plain checkout, without the package installed.

A copy of the checkout (package, configs, setup.py) is run by a fresh interpreter that sees only it
and the dependencies: `-I -S` leaves out PYTHONPATH, the user's site and the `.pth` files, so the
editable install's finder (which answers `scfm_jax.configs` with the files of the checkout it was
installed from) takes no part. Every config must load the way users load it (`--config FILE` of
`scfm-jax train`, ml_collections' `config_flags`, `import scfm_jax.configs.NAME`), all from the
copy: an edit to the copy's base config reaches every config built on it.
"""
import json
import shutil
import site
import subprocess
import sys
import textwrap

from shared_helpers import REPO_ROOT

CONFIG_NAMES = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py")
                      if p.name != "__init__.py")
CHANGED_SEED = 17

PROBE = textwrap.dedent("""
    import argparse, importlib, json, sys
    from pathlib import Path
    checkout, names = sys.argv[1], sys.argv[2].split(",")
    from absl import flags
    from ml_collections import config_flags
    from scfm_jax.train import config_checks

    out = {}
    for name in names:
        path = f"configs/{name}.py"
        # what `scfm-jax train/plan --config FILE` parse with
        by_cli = config_checks.parse_command(argparse.ArgumentParser(), ["--config", path]).config
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, flag_values=flag_values)
        flag_values(["probe", f"--config={path}"])
        imported = importlib.import_module(f"scfm_jax.configs.{name}").get_config()
        out[name] = [c.to_json(sort_keys=True) for c in (by_cli, flag_values.config, imported)]
    files = [getattr(m, "__file__", None) for n, m in list(sys.modules.items())
             if n.split(".")[0] == "scfm_jax" or n.startswith("scfm_config_")]
    out["outside"] = [f for f in files if f and not Path(f).resolve().is_relative_to(checkout)]
    print(json.dumps(out))
""")


def test_every_config_loads_from_a_plain_checkout(tmp_path):
    checkout = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO_ROOT / "scfm_jax", checkout / "scfm_jax", ignore=ignore)
    shutil.copytree(REPO_ROOT / "configs", checkout / "configs", ignore=ignore)
    shutil.copy(REPO_ROOT / "setup.py", checkout / "setup.py")
    base = checkout / "configs" / "scfoundation_tiny.py"
    assert base.read_text().count("config.seed = 0\n") == 1
    base.write_text(base.read_text().replace("config.seed = 0\n", f"config.seed = {CHANGED_SEED}\n"))

    dependencies = [*site.getsitepackages(), site.getusersitepackages()]
    bootstrap = (f"import sys; sys.path[:0] = [{str(checkout)!r}]; "
                 f"sys.path += {dependencies!r}; sys.argv[1:1] = [{str(checkout)!r}]; "
                 "exec(sys.argv.pop(3))")
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", bootstrap, ",".join(CONFIG_NAMES), PROBE],
        cwd=checkout, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])

    assert out.pop("outside") == []   # nothing of the package came from another copy
    assert sorted(out) == CONFIG_NAMES
    for name, (by_cli, by_config_flags, imported) in out.items():
        assert by_cli == by_config_flags == imported, name
        assert json.loads(by_cli)["seed"] == CHANGED_SEED, name   # the copy's base config
