"""Every field of every config in configs/ is read by the package: none is decoration.

The package's source is parsed (AST) for the places a config field can be read from:
- an attribute, `["key"]` or `.get("key")` chain such as `config.data.store` or `data.store`,
  where a local name bound to a group (`data = config.data`, `train_config = config.train`)
  counts as that group;
- a dotted field name as a string (`"train.steps"`, the form config_checks validates by);
- a field of a dataclass the models and objectives build from their config section;
- a group read whole by a key tuple (the mesh, by `partitioning.MESH_AXES`).
A field is read when its last two names (`data.vocabulary`) appear as such a pair.
"""
import ast
import importlib.util
from pathlib import Path

import ml_collections
import pytest

from shared_helpers import REPO_ROOT
from scfm_jax.train import partitioning

PACKAGE = REPO_ROOT / "scfm_jax"
CONFIGS = sorted(p for p in (REPO_ROOT / "configs").glob("*.py") if p.name != "__init__.py")
# groups whose fields are read by iterating a tuple of their keys
READ_BY_KEYS = {"mesh": partitioning.MESH_AXES}
DATACLASS_GROUPS = ("model", "objective")


def _chain(node) -> list[str] | None:
    """['config', 'data', 'store'] for `config.data.store`, `config["data"].get("store")`..."""
    parts = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
              and isinstance(node.slice.value, str)):
            parts.append(node.slice.value)
            node = node.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "get" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            parts.append(node.args[0].value)
            node = node.func.value
        elif isinstance(node, ast.Name):
            parts.append(node.id)
            return parts[::-1]
        else:
            return None


def _is_dataclass(node: ast.ClassDef) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if getattr(target, "attr", getattr(target, "id", None)) == "dataclass":
            return True
    return False


@pytest.fixture(scope="module")
def reads():
    """(name pairs read as chains, string constants, dataclass field names) of the package."""
    pairs, strings, fields = set(), set(), set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        groups = {}   # local name -> the config group it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                target, value = node.targets[0], node.value
                bound = (zip(target.elts, value.elts) if isinstance(target, ast.Tuple)
                         and isinstance(value, ast.Tuple) else [(target, value)])
                for name, source in bound:
                    chain = _chain(source)
                    if isinstance(name, ast.Name) and chain and len(chain) >= 2:
                        groups[name.id] = chain[-1]
            elif isinstance(node, ast.ClassDef) and _is_dataclass(node):
                fields.update(item.target.id for item in node.body
                              if isinstance(item, ast.AnnAssign)
                              and isinstance(item.target, ast.Name))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
        for node in ast.walk(tree):
            chain = _chain(node) if isinstance(node, (ast.Attribute, ast.Subscript,
                                                      ast.Call)) else None
            if chain and len(chain) >= 2:
                chain = [groups.get(chain[0], chain[0]), *chain[1:]]
                pairs.update(f"{a}.{b}" for a, b in zip(chain, chain[1:]))
    return pairs, strings, fields


def _leaves(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def unread_fields(config, reads) -> list[str]:
    pairs, strings, fields = reads
    unread = []
    for field in _leaves(config):
        parts = field.split(".")
        last_two = ".".join(parts[-2:])
        read = (last_two in pairs or field in strings or last_two in strings
                or (len(parts) == 1 and f"config.{field}" in pairs)
                or parts[-1] in READ_BY_KEYS.get(parts[0], ())
                or (parts[0] in DATACLASS_GROUPS and parts[-1] in fields))
        if not read:
            unread.append(field)
    return unread


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_field_is_read_by_the_package(path, reads):
    assert unread_fields(_load(path), reads) == []


def test_the_walk_finds_a_field_nothing_reads(reads):
    config = _load(CONFIGS[0])
    with config.unlocked():
        config.data.decoration = 1
        config.train.nothing_reads_this = 2
    assert unread_fields(config, reads) == ["data.decoration", "train.nothing_reads_this"]


def test_config_data_vocabulary_is_enforced(tmp_path):
    """data.vocabulary names the vocabulary the store must carry ("" takes the store's)."""
    from train_helpers import make_store, tiny_config

    from scfm_jax.data.store import CellStore
    from scfm_jax.errors import UsageError
    from scfm_jax.train import config_checks

    config = tiny_config(make_store(tmp_path))
    store = CellStore.open(config.data.store)
    config_checks.check_store(config, store)   # "": any
    config.data.vocabulary = store.vocabulary.name
    config_checks.check_store(config, store)
    config.data.vocabulary = "scfoundation"
    with pytest.raises(UsageError, match="carries the vocabulary .*convert the data with "
                                         "--vocabulary scfoundation"):
        config_checks.check_store(config, store)



@pytest.mark.parametrize("config_name, group, misspelt", [
    ("scfoundation_tiny", "model", "n_heads"),
    ("scfoundation_tiny", "model.decoder", "head_dims"),
    ("scmulan_tiny", "model", "n_heads"),
])
def test_model_configs_refuse_unknown_fields(config_name, group, misspelt):
    """A misspelt architecture field is refused by name (one mechanism for every model), not
    silently ignored while the default is built."""
    from flax import nnx

    from scfm_jax.errors import UsageError
    from scfm_jax.objectives import get_objective
    from scfm_jax.train.plan import plan_config

    config = _load(REPO_ROOT / "configs" / f"{config_name}.py")
    if "num_genes" in config.model:
        config.model.num_genes = 30    # what a store would give; scMulan's plan_config builds its own
    config = plan_config(config)
    section = config
    for part in group.split("."):
        section = section[part]
    objective = get_objective(config.model.name)
    build = lambda: objective.build_model(config.model, rngs=nnx.Rngs(0))  # noqa: E731
    nnx.eval_shape(build)   # builds as configured
    section[misspelt] = 8
    with pytest.raises(UsageError, match=rf"config\.{group} has unknown field\(s\) "
                                         rf"\['{misspelt}'\]"):
        nnx.eval_shape(build)
