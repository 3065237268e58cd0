"""The shape of the house: imports point one way (model.py imports nothing of the project, no import cycle, no
function-local import of a project module), every policy is registered in one literal dict, and the Python API
the README shows works without argparse."""
import ast
from pathlib import Path

import torch

import policies
from cache import KVCache
from model import ModelArgs, random_model

REPO = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in REPO.glob("*.py")}


def project_imports(tree) -> list:
    """(module imported, inside a function?) for every import of a top-level project module."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name.split(".")[0], nested) for a in child.names if a.name.split(".")[0] in MODULES)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                if child.module.split(".")[0] in MODULES:
                    out.append((child.module.split(".")[0], nested))
            visit(child, nested)

    visit(tree, False)
    return out


GRAPH = {name: project_imports(ast.parse(path.read_text())) for name, path in MODULES.items()}


def test_model_imports_nothing_of_the_project():
    assert GRAPH["model"] == []


def test_no_function_local_imports_of_project_modules():
    local = {name: [m for m, nested in edges if nested] for name, edges in GRAPH.items()}
    assert {k: v for k, v in local.items() if v} == {}


def test_no_import_cycle():
    edges = {name: {m for m, _ in e if m != name} for name, e in GRAPH.items()}
    state = {}

    def visit(n, path):
        if state.get(n) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(path + [n])}")
        if state.get(n) == "done":
            return
        state[n] = "open"
        for m in sorted(edges.get(n, ())):
            visit(m, path + [n])
        state[n] = "done"

    for n in sorted(edges):
        visit(n, [])


def test_every_policy_is_a_kvcache_in_the_registry():
    assert all(issubclass(cls, KVCache) for cls in policies.POLICIES.values())
    names = [p.stem for p in (REPO / "cache_configs").glob("*.yaml")]
    strategies = {s for n in names for s in policies.read_config(n).get("cache_strategy", [])}
    assert strategies <= set(policies.POLICIES)


def test_setup_from_keyword_arguments_equals_setup_from_flags():
    """The Python API (keyword options) and the command line (a parsed Namespace) build the same caches."""
    import argparse

    model = random_model(ModelArgs(vocab_size=64, n_layer=2, n_head=4, n_local_heads=2, dim=32,
                                   intermediate_size=64, block_size=128), "cpu", torch.float32)
    a = policies.setup(model, cache_strategy="lsh", max_cache_length=0.5, lsh_dim=8, max_seq_length=64)
    p = argparse.ArgumentParser()
    policies.add_cache_args(p)
    ns = policies.parse_args(p, ["--cache_strategy", "lsh", "--max_cache_length", "0.5", "--lsh_dim", "8"])
    b = policies.setup(model, ns, max_seq_length=64)
    assert [(type(x), x.kv_budget, x.lsh_dim) for x in a] == [(type(y), y.kv_budget, y.lsh_dim) for y in b]
    assert a[0].kv_budget == 32 and a[0].lsh_dim == 8


def test_readme_python_example(smol_dir):
    """The README's five lines: load, set up caches from keywords, complete a prompt, read the statistics."""
    import generate

    model, tokenizer = generate.load(smol_dir / "model.pth", device="cpu", dtype="float32")
    policies.setup(model, cache_strategy="heavy_hitter", max_cache_length=32, max_seq_length=96, tokenizer=tokenizer)
    out = generate.complete(model, tokenizer, "What is the capital of France?", max_new_tokens=40)
    assert "Paris" in out["text"]
    assert out["stats"]["kept_tokens"] == 32 < len(out["prompt_token_ids"]) < out["stats"]["seen_tokens"]
